"""Helpers for the tests that run against a real ComfyUI (COMFYUI_DIR): the pack as a package, a tiny
SD-1.5-detected checkpoint, and a server on 127.0.0.1."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import types
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PACK = "attencraft_pack"


def load_pack():
    """The repository as the package ComfyUI sees (relative imports), without running its __init__."""
    if PACK not in sys.modules:
        module = types.ModuleType(PACK)
        module.__path__ = [str(ROOT)]
        sys.modules[PACK] = module
    return importlib.import_module(PACK)


def comfy_dir() -> Path | None:
    value = os.environ.get("COMFYUI_DIR")
    return Path(value) if value else None


def add_comfy_to_path() -> None:
    """Make ComfyUI importable in this process, set to the CPU (as `main.py --cpu`)."""
    path = str(comfy_dir())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


TINY_UNET = dict(sample_size=64, block_out_channels=(320, 320, 320), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
                 cross_attention_dim=768, attention_head_dim=8)
# SD 2.x: 1024-d OpenCLIP-H context, linear projections, 64-channel heads (5 heads at 320 channels)
TINY_UNET_SD2 = {**TINY_UNET, "cross_attention_dim": 1024, "attention_head_dim": 5, "use_linear_projection": True}
COMFY_UNET_CONFIG = dict(num_res_blocks=[1, 1, 1], channel_mult=[1, 1, 1], transformer_depth=[1, 1, 1],
                         transformer_depth_output=[1] * 6, transformer_depth_middle=1)


def build_sd15_checkpoint(path: Path, seed: int = 0, family: str = "sd1") -> Path:
    """A single-file checkpoint ComfyUI detects as SD 1.5 (or SD 2.x with family="sd2"): small UNet (320
    channels), full-size random CLIP-L (OpenCLIP-H) and VAE, as detection requires. 0.5-0.9 GB in fp16;
    written at test time, never committed."""
    add_comfy_to_path()
    import comfy.diffusers_convert
    import comfy.utils
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**(TINY_UNET if family == "sd1" else TINY_UNET_SD2))
    diff_sd = unet.state_dict()
    state = {f"model.diffusion_model.{v}": diff_sd[k] for k, v in
             comfy.utils.unet_to_diffusers(COMFY_UNET_CONFIG).items() if k in diff_sd}
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4)
    vae_sd = comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())
    state.update({f"first_stage_model.{k}": v for k, v in vae_sd.items()})
    config_file = "sd1_clip_config.json" if family == "sd1" else "text_encoders/sd2_clip_config.json"
    config = json.loads((comfy_dir() / "comfy" / config_file).read_text())
    text = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
    hf = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in text.state_dict().items()}
    if family == "sd1":
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in hf.items()})
    else:  # SD 2.x checkpoints store OpenCLIP keys; ComfyUI's own converter writes them
        openclip = comfy.diffusers_convert.convert_text_enc_state_dict_v20(
            {f"cond_stage_model.model.transformer.{k}": v for k, v in hf.items()})
        state.update(openclip)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))
    return path


# SDXL base 1.0's layout (transformer depths 2 and 10, 64-channel heads, 2048-d context, size conditioning) at
# 320 channels on every level: ComfyUI's model detection reads it as SDXL (it matches on the depths, not the
# channel multipliers), at a tenth of the UNet's parameters.
SDXL_LAYOUT = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
               "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
               "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
               "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "channel_mult": [1, 1, 1],
               "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
               "num_head_channels": 64, "use_temporal_attention": False, "use_temporal_resblock": False}


def test_cache() -> Path:
    """Where generated test checkpoints are kept between runs (outside the repository)."""
    return Path(os.environ.get("ATTENCRAFT_TEST_CACHE", Path.home() / ".cache" / "attencraft-tests"))


def build_sdxl_checkpoint(path: Path | None = None, seed: int = 0) -> Path:
    """A single-file SDXL checkpoint (SGM layout, as ComfyUI saves one) that ComfyUI's own model detection loads
    as SDXL: the SDXL_LAYOUT UNet and full-size random CLIP-L, OpenCLIP-bigG and VAE. About 2 GB in fp16; built
    once into test_cache() (or `path`), never committed."""
    path = path or test_cache() / f"tiny_sdxl_{seed}.safetensors"
    if path.is_file():
        return path
    add_comfy_to_path()
    import comfy.diffusers_convert
    import comfy.supported_models
    import comfy.utils
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(  # initialised by diffusers, then mapped into ComfyUI's module
        sample_size=128, block_out_channels=(320, 320, 320), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 5, 5), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    diff_sd = unet.state_dict()
    model = comfy.supported_models.SDXL(dict(SDXL_LAYOUT)).get_model({})
    model.diffusion_model.load_state_dict(
        {v: diff_sd[k] for k, v in comfy.utils.unet_to_diffusers(SDXL_LAYOUT).items() if k in diff_sd}, strict=True)
    towers = {}
    for prefix, file, cls in (("clip_l", "sd1_clip_config.json", CLIPTextModel),
                              ("clip_g", "clip_config_bigg.json", CLIPTextModelWithProjection)):
        cfg = json.loads((comfy_dir() / "comfy" / file).read_text())
        text = cls(CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
        towers.update({f"{prefix}.transformer.{k if k.startswith(('text_model.', 'text_projection')) else 'text_model.' + k}": v
                       for k, v in text.state_dict().items()})
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=4)
    vae_sd = comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict())
    state = model.state_dict_for_saving(towers, vae_sd)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in state.items()},
              str(tmp))
    tmp.replace(path)
    return path


FLUX_FILES = ("flux_tiny_dev.safetensors", "clip_l_random.safetensors", "t5xxl_fp8_random.safetensors",
              "flux_ae_random.safetensors")


def build_flux_files(folder: Path | None = None, seed: int = 0) -> dict[str, Path]:
    """The four files ComfyUI users load Flux.1-dev from (Load Diffusion Model, DualCLIPLoader type flux, Load
    VAE), random: a Flux transformer ComfyUI detects as Flux (its fixed 3072 width, one double- and one
    single-stream block, guidance embedding), full-size CLIP-L, full-size T5-XXL in fp8 (4.8 GB: ComfyUI's Flux
    text encoder has one size) and Flux's VAE (16 channels, no quant convs). Built once into test_cache(), never
    committed; returns {"unet", "clip_l", "t5xxl", "vae"} -> path."""
    folder = folder or test_cache() / f"flux_{seed}"
    paths = dict(zip(("unet", "clip_l", "t5xxl", "vae"), (folder / name for name in FLUX_FILES)))
    if all(path.is_file() for path in paths.values()):
        return paths
    add_comfy_to_path()
    import comfy.diffusers_convert
    import comfy.supported_models
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)

    def save(path: Path, state: dict) -> None:
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
        tmp.replace(path)

    def random_like(shape, std, dtype):
        return (torch.randn(shape, generator=generator) * std).to(dtype)

    flux = comfy.supported_models.Flux(dict(FLUX_DEV_LAYOUT)).get_model({})  # ComfyUI's own module, for key names
    save(paths["unet"], {k: (torch.ones(v.shape) if k.endswith(".scale") else random_like(v.shape, 0.02, torch.float32)
                             ).to(torch.bfloat16) for k, v in flux.diffusion_model.state_dict().items()})
    del flux
    cfg = json.loads((comfy_dir() / "comfy" / "sd1_clip_config.json").read_text())
    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    save(paths["clip_l"], {(k if k.startswith("text_model.") else f"text_model.{k}"): v.half()
                           for k, v in clip.state_dict().items()})
    t5 = json.loads((comfy_dir() / "comfy" / "text_encoders" / "t5_config_xxl.json").read_text())
    d, ff, heads, kv = t5["d_model"], t5["d_ff"], t5["num_heads"], t5["d_kv"]
    fp8 = torch.float8_e4m3fn
    state = {"shared.weight": random_like((t5["vocab_size"], d), 1.0, fp8),
             "encoder.final_layer_norm.weight": torch.ones(d).to(fp8),
             "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
                 random_like((t5["relative_attention_num_buckets"], heads), 0.5, fp8)}
    for i in range(t5["num_layers"]):
        block = f"encoder.block.{i}.layer."
        for name in "qkv":
            state[f"{block}0.SelfAttention.{name}.weight"] = random_like((heads * kv, d), 0.01, fp8)
        state[f"{block}0.SelfAttention.o.weight"] = random_like((d, heads * kv), 0.01, fp8)
        state[f"{block}0.layer_norm.weight"] = torch.ones(d).to(fp8)
        state[f"{block}1.DenseReluDense.wi_0.weight"] = random_like((ff, d), 0.01, fp8)
        state[f"{block}1.DenseReluDense.wi_1.weight"] = random_like((ff, d), 0.01, fp8)
        state[f"{block}1.DenseReluDense.wo.weight"] = random_like((d, ff), 0.01, fp8)
        state[f"{block}1.layer_norm.weight"] = torch.ones(d).to(fp8)
    save(paths["t5xxl"], state)
    del state
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    save(paths["vae"], {k: v.half() for k, v in comfy.diffusers_convert.convert_vae_state_dict(vae.state_dict()).items()})
    return paths


def build_flux_checkpoint(seed: int = 0) -> Path:
    """The four Flux files (build_flux_files) as one single-file checkpoint, as ComfyUI's Load Checkpoint reads an
    all-in-one Flux file: model.diffusion_model., text_encoders.clip_l/t5xxl.transformer., vae. (6.2 GB, cached)."""
    from safetensors.torch import load_file, save_file

    path = test_cache() / f"flux_{seed}" / "flux_tiny_dev_checkpoint.safetensors"
    if path.is_file():
        return path
    files = build_flux_files(seed=seed)
    state = {}
    for kind, prefix in (("unet", "model.diffusion_model."), ("clip_l", "text_encoders.clip_l.transformer."),
                         ("t5xxl", "text_encoders.t5xxl.transformer."), ("vae", "vae.")):
        state.update({prefix + k: v for k, v in load_file(str(files[kind])).items()})
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(path)
    return path


# Flux.1-dev as ComfyUI's detection reads it, at depth one (ComfyUI fixes the width: 3072, 24 heads)
FLUX_DEV_LAYOUT = {"image_model": "flux", "guidance_embed": True, "in_channels": 16, "patch_size": 2,
                   "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072,
                   "mlp_ratio": 4.0, "num_heads": 24, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56],
                   "theta": 10000, "qkv_bias": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """ComfyUI started headless on 127.0.0.1 with --cpu and the pack loaded via --extra-model-paths-config."""

    def __init__(self, base: Path, extra_args: tuple[str, ...] = ()):
        self.base = base
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        nodes = base / "pack_dir"
        nodes.mkdir(parents=True, exist_ok=True)
        link = nodes / "attencraft"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        (base / "custom_nodes").mkdir(exist_ok=True)
        self.config = base / "extra_model_paths.yaml"
        self.config.write_text(f"attencraft_test:\n  custom_nodes: {nodes}\n")
        self.log = open(base / "comfyui.log", "w")
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        self.process = subprocess.Popen(
            [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), "--extra-model-paths-config", str(self.config),
             "--disable-auto-launch", *extra_args],
            cwd=comfy_dir(), stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited: {(base / 'comfyui.log').read_text()[-3000:]}")
            try:
                urllib.request.urlopen(self.url + "/system_stats", timeout=2)
                return
            except OSError:
                time.sleep(1)
        raise RuntimeError("ComfyUI did not start in 180 s")

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def load_client():
    """scripts/run_workflow.py (the headless client) as a module."""
    spec = importlib.util.spec_from_file_location("run_workflow", ROOT / "scripts" / "run_workflow.py")
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    return client


def api_workflow(name: str, ckpt: str, **overrides) -> dict:
    """A bundled API workflow on checkpoint `ckpt`, 2 sampling steps, with `node.input=value` overrides."""
    wf = json.loads((ROOT / "workflows" / "api" / f"{name}.json").read_text())
    for node in wf.values():
        if node["class_type"] == "CheckpointLoaderSimple":
            node["inputs"]["ckpt_name"] = ckpt
        if node["class_type"] == "KSampler":
            node["inputs"]["steps"] = 2
    return load_client().apply_overrides(wf, [f"{k}={json.dumps(v)}" for k, v in overrides.items()])


def with_user_masks(wf: dict, input_dir: Path, prefix: str) -> dict:
    """A full-pipeline API workflow whose Train LoRA takes the user's masks (the left and right halves of the
    example image, "ball, cube", written into `input_dir`) instead of Extract's: Extract and its overlay go."""
    from PIL import Image

    for side, box in (("left", (0, 0, 256, 512)), ("right", (256, 0, 512, 512))):
        mask = Image.new("RGB", (512, 512))
        mask.paste((255, 255, 255), box)
        mask.save(input_dir / f"{prefix}_{side}.png")
    del wf["3"], wf["4"], wf["5"]["inputs"]["concepts"]
    wf["5"]["inputs"].update({"masks": ["93", 0], "concept_words": "ball, cube"})
    wf.update({"90": {"class_type": "LoadImage", "inputs": {"image": f"{prefix}_left.png"}},
               "91": {"class_type": "LoadImage", "inputs": {"image": f"{prefix}_right.png"}},
               "92": {"class_type": "ImageBatch", "inputs": {"image1": ["90", 0], "image2": ["91", 0]}},
               "93": {"class_type": "ImageToMask", "inputs": {"image": ["92", 0], "channel": "red"}}})
    return wf


def find_mask_seed(run, ckpt: str) -> int:
    """A tiny checkpoint has random attention: the first mask seed whose masks separate the two concepts.
    `run(workflow)` returns the history entry."""
    client = load_client()
    for seed in range(12):
        entry = run(api_workflow("attencraft_masks_only", ckpt, **{"3.seed": seed, "3.threshold": 0.0}))
        message = client.failure_message(entry)
        if message is None:
            return seed
        assert "Try another seed" in message or "No pixel" in message, message
    raise AssertionError("no seed separated the concepts on the random tiny checkpoint")
