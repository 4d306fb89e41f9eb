"""Loading a Stable Diffusion 1.x/2.x style component set from a local diffusers folder."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import AttenCraftError
from .progress import Progress, no_progress
from .validation import first_non_finite

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SD_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, steps_offset=1)  # Stable Diffusion 1.x/2.x's training schedule


def sd_noise_scheduler(prediction_type: str = "epsilon"):
    """A DDPM scheduler with Stable Diffusion's training noise schedule."""
    from diffusers import DDPMScheduler  # on use: the ComfyUI nodes import the core when ComfyUI starts

    return DDPMScheduler(**SD_NOISE_SCHEDULE, prediction_type=prediction_type)


@dataclass
class SDComponents:
    """The modules the method works on. The core may add tokens to `tokenizer`; callers own copies."""

    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    text_encoder: "torch.nn.Module"
    tokenizer: object
    noise_scheduler: object
    source: str = ""

    @property
    def family(self) -> str:
        return model_family(self.unet.config.cross_attention_dim)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def native_resolution(self) -> int:
        """Image side in pixels the UNet was built for (sample_size x VAE factor)."""
        size = self.unet.config.sample_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        return int(size) * self.vae_scale_factor

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "SDComponents":
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device)
            if dtype is not None and next(module.parameters()).dtype != dtype:
                module.to(dtype)
        return self


def model_family(cross_attention_dim: int) -> str:
    """"sd1" (768-d CLIP-L text), "sd2" (1024-d OpenCLIP-H text) or "custom-<dim>" for other models."""
    return {768: "sd1", 1024: "sd2"}.get(int(cross_attention_dim), f"custom-{int(cross_attention_dim)}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise AttenCraftError(f"Cannot read {path}: {exc}. Is the model folder complete?") from exc


def check_model_dir(model_dir: str | Path) -> Path:
    """Check that `model_dir` looks like a local diffusers SD 1.x/2.x folder, with a readable error if not."""
    root = Path(model_dir).expanduser()
    if not root.is_dir():
        raise AttenCraftError(
            f"Model folder {str(root)!r} does not exist. Pass a local diffusers folder "
            "(with unet/, vae/, text_encoder/, tokenizer/ and scheduler/); nothing is downloaded.")
    if (root / "transformer").is_dir() or (root / "text_encoder_3").is_dir():
        raise AttenCraftError(
            f"{root} holds a transformer-based model (SD3/Flux style). AttenCraft needs a Stable Diffusion "
            "1.x or 2.x style model with a UNet2DConditionModel.")
    index = root / "model_index.json"
    if index.is_file():
        cls = _read_json(index).get("_class_name", "")
        if cls and "StableDiffusion" not in cls:
            raise AttenCraftError(
                f"{root} is a {cls} model, not a Stable Diffusion 1.x/2.x style model (UNet + CLIP + VAE).")
        if "XL" in cls:
            raise AttenCraftError(f"{root} is an SDXL model ({cls}); only SD 1.x/2.x style models are supported.")
    missing = [p for p in REQUIRED_PARTS if not (root / p).is_dir()]
    if missing:
        raise AttenCraftError(
            f"Model folder {root} is missing {', '.join(missing)}. A Stable Diffusion diffusers folder has "
            f"the sub-folders {', '.join(REQUIRED_PARTS)}; re-export or re-copy the model.")
    unet_cfg = root / "unet" / "config.json"
    if not unet_cfg.is_file():
        raise AttenCraftError(f"{unet_cfg} is missing: the unet folder is incomplete.")
    unet_config = _read_json(unet_cfg)
    cls = unet_config.get("_class_name")
    if cls != "UNet2DConditionModel":
        raise AttenCraftError(
            f"{root}/unet is a {cls}, not a UNet2DConditionModel: not a Stable Diffusion 1.x/2.x style model.")
    if unet_config.get("addition_embed_type") == "text_time":
        raise AttenCraftError(f"{root}/unet is an SDXL UNet (size and crop conditioning); only SD 1.x/2.x style "
                              "models are supported so far.")
    return root


def check_loaded_weights(name: str, folder: Path, module: torch.nn.Module) -> None:
    """Refuse weights that did not load (a damaged or swapped file leaves tensors on the meta device) or that
    hold NaN or infinite values."""
    missing = [n for n, p in module.named_parameters() if p.is_meta]
    if missing:
        raise AttenCraftError(f"{folder}: {len(missing)} {name} weights are missing from its weight file (e.g. "
                              f"{missing[0]}); the file does not belong to this config.json (damaged or swapped). "
                              "Re-copy the model.")
    param_name = first_non_finite(module.named_parameters())
    if param_name is not None:
        raise AttenCraftError(f"{folder}: the {name} weight {param_name} holds NaN or infinite values; the "
                              "model file is damaged. Re-copy or re-export the model.")


@contextmanager
def quiet_library_logs():
    """diffusers/transformers list every unexpected key of a mismatched file (thousands of lines); our own
    check_loaded_weights says it in one line instead."""
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


def load_components(model_dir: str | Path, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, progress: Progress = no_progress) -> SDComponents:
    """Load UNet, VAE, CLIP text encoder, tokenizer and a DDPM noise scheduler, offline; `progress` is told
    ("loading <folder>", parts loaded, 5)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel  # on use (see lora.py)
    from transformers import CLIPTextModel, CLIPTokenizer

    root = check_model_dir(model_dir)
    parts = {}
    loaders = {
        "tokenizer": lambda p: CLIPTokenizer.from_pretrained(p, local_files_only=True),
        "text_encoder": lambda p: CLIPTextModel.from_pretrained(p, local_files_only=True, dtype=dtype),
        "vae": lambda p: AutoencoderKL.from_pretrained(p, local_files_only=True, torch_dtype=dtype),
        "unet": lambda p: UNet2DConditionModel.from_pretrained(p, local_files_only=True, torch_dtype=dtype),
        "scheduler": lambda p: DDPMScheduler.from_pretrained(p, local_files_only=True),
    }
    phase = f"loading {root.name}"
    progress(phase, 0, len(loaders))
    for i, (name, load) in enumerate(loaders.items(), 1):
        try:
            with quiet_library_logs():
                parts[name] = load(root / name)
        except Exception as exc:  # library errors become one readable message
            raise AttenCraftError(f"Could not load {name} from {root / name}: {exc}") from exc
        if isinstance(parts[name], torch.nn.Module):
            check_loaded_weights(name, root / name, parts[name])
        progress(phase, i, len(loaders))
    comps = SDComponents(parts["unet"], parts["vae"], parts["text_encoder"], parts["tokenizer"],
                         parts["scheduler"], source=str(root))
    if comps.unet.config.cross_attention_dim != comps.text_encoder.config.hidden_size:
        raise AttenCraftError(
            f"{root}: the UNet expects {comps.unet.config.cross_attention_dim}-d text features but the text "
            f"encoder gives {comps.text_encoder.config.hidden_size}-d: components from different models.")
    for module in (comps.unet, comps.vae, comps.text_encoder):
        module.requires_grad_(False).eval()
    comps.to(torch.device(device), dtype)
    return comps
