"""Loading a Stable Diffusion 1.x/2.x, SDXL or Flux.1 component set from a local diffusers folder."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AttenCraftError
from .families import family_of
from .frozen_fp8 import compute_dtype
from .progress import Progress, no_progress
from .reading import read_json_object, require_regular_file
from .validation import first_non_finite, require_number

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
FLUX_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")
SD_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, steps_offset=1)  # Stable Diffusion 1.x/2.x's training schedule


def sd_noise_scheduler(prediction_type: str = "epsilon"):
    """A DDPM scheduler with Stable Diffusion's training noise schedule."""
    from diffusers import DDPMScheduler  # on use: the ComfyUI nodes import the core when ComfyUI starts

    return DDPMScheduler(**SD_NOISE_SCHEDULE, prediction_type=prediction_type)


@dataclass
class SDComponents:
    """The modules the method works on. The core may add tokens to `tokenizer`; callers own copies."""

    denoiser: "torch.nn.Module"  # the UNet (SD 1.x/2.x, SDXL) or the transformer (Flux)
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    noise_scheduler: object
    source: str = ""
    text_encoder_2: "torch.nn.Module | None" = None  # SDXL's OpenCLIP-bigG (with projection), Flux's T5
    tokenizer_2: object = None

    @property
    def family(self) -> str:
        """"sd1", "sd2", "custom-<dim>", "sdxl" or "flux" (see families/)."""
        return family_of(self).name(self)

    @property
    def text_modules(self) -> list["torch.nn.Module"]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """Image side in pixels the model was built for (see families/)."""
        return family_of(self).native_resolution(self)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the denoiser computes in (its frozen linear weights may be stored in float8)."""
        return compute_dtype(self.denoiser)

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "SDComponents":
        """Move every module to `device`; the UNet and text towers also to `dtype`. The VAE stays float32 (it is
        small, runs once per image, and SDXL's overflows in fp16)."""
        for module in (self.denoiser, self.vae, *self.text_modules):
            module.to(device)
            if dtype is not None and module is not self.vae and next(module.parameters()).dtype != dtype:
                module.to(dtype)
        return self


def _read_json(path: Path) -> dict:
    return read_json_object(path, "Model file")


def check_part_files(root: Path, parts: tuple[str, ...]) -> None:
    """Every file in the model's part folders is a regular file (a FIFO would block the loader forever) and
    every JSON file in them holds an object."""
    for part in parts:
        for path in sorted((root / part).iterdir()):
            if path.is_dir():
                continue
            require_regular_file(path, "Model file")
            if path.suffix == ".json":
                _read_json(path)


SUPPORTED = "Stable Diffusion 1.x, 2.x, SDXL (base and its fine-tunes) or Flux.1 (dev, schnell and their fine-tunes)"


def check_flux_dir(root: Path) -> Path:
    """Check a diffusers folder with a transformer: Flux.1 text-to-image (FluxPipeline) only."""
    index = root / "model_index.json"
    cls = str(_read_json(index).get("_class_name", "")) if index.is_file() else ""
    if cls and cls != "FluxPipeline":
        raise AttenCraftError(f"{root} is a {cls} model; AttenCraft supports {SUPPORTED} text-to-image models "
                              "(Flux Fill, Canny, Depth, Kontext and Redux are other tasks).")
    missing = [p for p in FLUX_PARTS if not (root / p).is_dir()]
    if missing:
        raise AttenCraftError(f"Flux model folder {root} is missing {', '.join(missing)}. A diffusers Flux folder "
                              f"has the sub-folders {', '.join(FLUX_PARTS)}; re-export or re-copy the model.")
    check_part_files(root, FLUX_PARTS)
    config = _read_json(root / "transformer" / "config.json")
    packed = 4 * _read_json(root / "vae" / "config.json").get("latent_channels", 16)  # 2x2 patches of latents
    if config.get("_class_name") != "FluxTransformer2DModel" or config.get("in_channels") != packed:
        raise AttenCraftError(f"{root}/transformer is a {config.get('_class_name')} with "
                              f"{config.get('in_channels')} input channels, not Flux.1's text-to-image "
                              f"FluxTransformer2DModel ({packed}: the VAE's latents alone, no control or fill "
                              f"image); AttenCraft supports {SUPPORTED}.")
    return root


def check_model_dir(model_dir: str | Path) -> Path:
    """Check that `model_dir` looks like a local diffusers SD 1.x/2.x, SDXL or Flux.1 folder, with a readable
    error if not (SD3, Flux's other tasks, the SDXL refiner, EDM-type models such as Playground 2.5 and video
    models are refused)."""
    root = Path(model_dir).expanduser()
    if root.is_file() and root.suffix.lower() in (".safetensors", ".ckpt", ".pt", ".bin"):
        raise AttenCraftError(
            f"{root} is a single-file checkpoint; the command line reads diffusers folders (diffusers' single-file "
            "loader fetches the model's config from the Hugging Face hub, which is never contacted). Convert it once "
            "with diffusers (StableDiffusionXLPipeline.from_single_file(...).save_pretrained(folder), or "
            "StableDiffusionPipeline for SD 1.x/2.x) on a machine with the config, or use the ComfyUI nodes, which "
            "take it from Load Checkpoint.")
    if not root.is_dir():
        raise AttenCraftError(
            f"Model folder {str(root)!r} does not exist. Pass a local diffusers folder "
            "(with unet/, vae/, text_encoder/, tokenizer/ and scheduler/); nothing is downloaded.")
    if (root / "text_encoder_3").is_dir():
        raise AttenCraftError(f"{root} is a Stable Diffusion 3 model (three text encoders); AttenCraft supports "
                              f"{SUPPORTED}.")
    if (root / "transformer").is_dir():
        return check_flux_dir(root)
    index = root / "model_index.json"
    if index.is_file():
        cls = str(_read_json(index).get("_class_name", ""))
        if cls and "StableDiffusion" not in cls:
            raise AttenCraftError(f"{root} is a {cls} model; AttenCraft supports {SUPPORTED} models.")
        if "Img2Img" in cls or "Video" in cls or "Upscale" in cls:
            raise AttenCraftError(f"{root} is a {cls} model; AttenCraft supports {SUPPORTED} text-to-image models.")
    sdxl = (root / "text_encoder_2").is_dir()
    if sdxl and not (root / "text_encoder").is_dir():
        raise AttenCraftError(f"{root} is the SDXL refiner (one OpenCLIP text encoder, aesthetic-score "
                              f"conditioning); AttenCraft supports {SUPPORTED}: use the SDXL base model.")
    parts = REQUIRED_PARTS + (SDXL_PARTS if sdxl else ())
    missing = [p for p in parts if not (root / p).is_dir()]
    if missing:
        raise AttenCraftError(
            f"Model folder {root} is missing {', '.join(missing)}. A diffusers folder of this model has the "
            f"sub-folders {', '.join(parts)}; re-export or re-copy the model.")
    check_part_files(root, parts)
    unet_cfg = root / "unet" / "config.json"
    if not unet_cfg.is_file():
        raise AttenCraftError(f"{unet_cfg} is missing: the unet folder is incomplete.")
    unet_config = _read_json(unet_cfg)
    cls = unet_config.get("_class_name")
    if cls != "UNet2DConditionModel":
        raise AttenCraftError(f"{root}/unet is a {cls}, not a UNet2DConditionModel; AttenCraft supports "
                              f"{SUPPORTED} models.")
    if (unet_config.get("addition_embed_type") == "text_time") != sdxl:
        raise AttenCraftError(f"{root}: the UNet and the text encoders belong to different model kinds (an SDXL "
                              "UNet needs text_encoder_2/tokenizer_2, and only an SDXL UNet takes them).")
    scheduler_cfg = root / "scheduler" / "scheduler_config.json"
    if scheduler_cfg.is_file() and "EDM" in _read_json(scheduler_cfg).get("_class_name", ""):
        raise AttenCraftError(f"{root} is an EDM-type model (e.g. Playground 2.5): its noise schedule is not "
                              f"the DDPM one AttenCraft trains with. Supported: {SUPPORTED} (epsilon or "
                              "v-prediction).")
    return root


def check_loaded_weights(name: str, folder: Path, module: torch.nn.Module) -> None:
    """Refuse weights that hold NaN or infinite values (weights missing from the file: check_loading_info)."""
    param_name = first_non_finite(module.named_parameters())
    if param_name is not None:
        raise AttenCraftError(f"{folder}: the {name} weight {param_name} holds NaN or infinite values; the "
                              "model file is damaged. Re-copy or re-export the model.")


MAX_TIMESTEPS = 100_000
MAX_NATIVE_SIDE = 4096  # px; real models are built for 512 to 2048 (a larger size is asked with --resolution)


def check_model_constants(comps: SDComponents) -> None:
    """Refuse a model whose configs give sizes or constants the method cannot work with (a damaged or edited
    config.json), before anything is allocated from them: the native resolution, the VAE's scaling, the noise
    schedule. One error names the file and the value."""
    source = comps.source or "the model"
    try:
        side = comps.native_resolution
    except (TypeError, ValueError, IndexError) as exc:
        raise AttenCraftError(f"{source}: the model's sample_size in its config is not a size ({exc}).") from exc
    try:
        require_number("The model's native resolution (sample_size in its config x the VAE factor)", side, 8,
                       MAX_NATIVE_SIDE, integer=True, multiple_of=8)
        vae = comps.vae.config
        require_number("The VAE's scaling_factor (vae/config.json)", vae.scaling_factor, 0, 100, low_open=True)
        require_number("The VAE's shift_factor (vae/config.json)", getattr(vae, "shift_factor", None) or 0.0, -100,
                       100)
        sched = comps.noise_scheduler
        require_number("num_train_timesteps (scheduler_config.json)", sched.config.num_train_timesteps, 1,
                       MAX_TIMESTEPS, integer=True)
        for key in ("beta_start", "beta_end", "shift", "base_shift", "max_shift"):
            value = sched.config.get(key)
            if value is not None:
                require_number(f"{key} (scheduler_config.json)", value, 0, 100)
        alphas = getattr(sched, "alphas_cumprod", None)
        if alphas is not None and not (torch.isfinite(alphas).all() and (alphas > 0).all() and (alphas <= 1).all()):
            raise AttenCraftError("its noise schedule (beta_start, beta_end, beta_schedule in scheduler_config.json) "
                                  "gives noise levels outside (0, 1].")
    except AttenCraftError as exc:
        raise AttenCraftError(f"{source}: {exc} The config is damaged or edited: re-copy the model.") from None


@contextmanager
def quiet_library_logs():
    """diffusers/transformers list every unexpected key of a mismatched file (thousands of lines); our own
    check_loading_info says it in one line instead."""
    from diffusers.utils import logging as diffusers_logging  # on use (see lora.py)
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def part_loaders(root: Path, dtype: torch.dtype) -> dict:
    """How to load each sub-folder of the model (offline): the denoiser and text towers in `dtype`, the VAE in
    float32, the training noise scheduler."""
    from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler,  # on use (see lora.py)
                           FluxTransformer2DModel, UNet2DConditionModel)
    from transformers import (CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                              T5TokenizerFast)

    # models come back with their loading info ((model, info)): see check_loading_info
    loaders = {
        "tokenizer": lambda p: CLIPTokenizer.from_pretrained(p, local_files_only=True),
        "text_encoder": lambda p: CLIPTextModel.from_pretrained(p, local_files_only=True, dtype=dtype,
                                                                output_loading_info=True),
        "vae": lambda p: AutoencoderKL.from_pretrained(p, local_files_only=True, torch_dtype=torch.float32,
                                                       output_loading_info=True),
    }
    if (root / "transformer").is_dir():
        return loaders | {
            "tokenizer_2": lambda p: T5TokenizerFast.from_pretrained(p, local_files_only=True),
            "text_encoder_2": lambda p: T5EncoderModel.from_pretrained(p, local_files_only=True, dtype=dtype,
                                                                       output_loading_info=True),
            "transformer": lambda p: FluxTransformer2DModel.from_pretrained(p, local_files_only=True,
                                                                            torch_dtype=dtype,
                                                                            output_loading_info=True),
            "scheduler": lambda p: FlowMatchEulerDiscreteScheduler.from_pretrained(p, local_files_only=True)}
    loaders |= {
        "unet": lambda p: UNet2DConditionModel.from_pretrained(p, local_files_only=True, torch_dtype=dtype,
                                                               output_loading_info=True),
        "scheduler": lambda p: DDPMScheduler.from_pretrained(p, local_files_only=True)}
    if (root / "text_encoder_2").is_dir():
        loaders["tokenizer_2"] = lambda p: CLIPTokenizer.from_pretrained(p, local_files_only=True)
        loaders["text_encoder_2"] = lambda p: CLIPTextModelWithProjection.from_pretrained(
            p, local_files_only=True, dtype=dtype, output_loading_info=True)
    return loaders


def check_loading_info(name: str, folder: Path, info: dict) -> None:
    """Refuse weights that do not match their config: a weight the file lacks would be initialised at random
    (transformers does so without an error), one it has too many belongs to another model."""
    problems = {kind: sorted(map(str, info.get(f"{kind}_keys") or [])) for kind in ("missing", "unexpected",
                                                                                   "mismatched")}
    found = [f"{len(keys)} {kind} (e.g. {keys[0]})" for kind, keys in problems.items() if keys]
    if found:
        raise AttenCraftError(f"{folder}: the {name} weight file does not match its config.json: "
                              f"{', '.join(found)} weights. It is damaged or belongs to another model (loading it "
                              "would leave weights at random): re-copy or re-export the model.")


def load_components(model_dir: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, progress: Progress = no_progress) -> SDComponents:
    """Load the denoiser (UNet or Flux transformer), VAE, text encoder(s), tokenizer(s) and the training noise
    scheduler, offline; `progress` is told ("loading <folder>", parts loaded, parts)."""
    root = check_model_dir(model_dir)
    parts = {}
    loaders = part_loaders(root, dtype)
    phase = f"loading {root.name}"
    progress(phase, 0, len(loaders))
    for i, (name, load) in enumerate(loaders.items(), 1):
        try:
            with quiet_library_logs():
                parts[name] = load(root / name)
        except Exception as exc:  # library errors become one readable message
            raise AttenCraftError(f"Could not load {name} from {root / name}: {exc}") from exc
        if isinstance(parts[name], tuple):
            parts[name], info = parts[name]
            check_loading_info(name, root / name, info)
        if isinstance(parts[name], torch.nn.Module):
            check_loaded_weights(name, root / name, parts[name])
        progress(phase, i, len(loaders))
    denoiser = parts.get("unet", parts.get("transformer"))
    comps = SDComponents(denoiser, parts["vae"], parts["text_encoder"], parts["tokenizer"],
                         parts["scheduler"], source=str(root), text_encoder_2=parts.get("text_encoder_2"),
                         tokenizer_2=parts.get("tokenizer_2"))
    mismatch = family_of(comps).text_width_mismatch(comps)
    if mismatch:
        raise AttenCraftError(f"{root}: {mismatch}: components from different models.")
    check_model_constants(comps)
    for module in (comps.denoiser, comps.vae, *comps.text_modules):
        module.requires_grad_(False).eval()
    comps.to(torch.device(device), dtype)
    return comps
