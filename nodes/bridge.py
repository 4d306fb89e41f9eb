"""ComfyUI MODEL / CLIP / VAE -> the core's diffusers component set, in memory, exactly.

ComfyUI runs every prompt under torch.inference_mode() and its weights are inference tensors: everything
here builds fresh modules inside inference_mode(False) from cloned state dicts, so training can take
gradients and nothing ComfyUI passed in is touched. Imports comfy where used (the unit tests import this module
without ComfyUI) and diffusers/transformers where used (a missing one is then a node error).
"""

from __future__ import annotations

import json
import os

import torch

from ..attencraft_core.api import (AttenCraftError, Progress, SDComponents, family_of, no_progress, resolve_dtype,
                                   sd_noise_scheduler)
from .flux_bridge import flux_scheduler, is_flux, t5_from_comfy, transformer_from_comfy


SUPPORTED = "SD 1.x, SD 2.x, SDXL (base and its fine-tunes) and Flux.1 (dev, schnell and their fine-tunes)"
SDXL_ADM = 1280 + 6 * 256  # SDXL's extra UNet input: OpenCLIP-bigG pooled text + 6 size/crop ids of 256 each


def is_sdxl(unet_config: dict) -> bool:
    return unet_config.get("adm_in_channels") == SDXL_ADM and unet_config.get("num_classes") == "sequential"


def per_layer(depths: list[int]):
    """One transformer depth for a block (diffusers takes an int) or one per layer when they differ."""
    return depths[0] if len(set(depths)) == 1 else depths


def unet_config_to_diffusers(unet_config: dict, sample_size: int = 64) -> dict:
    """A UNet2DConditionModel config for ComfyUI's SD 1.x/2.x or SDXL `unet_config` (from model detection)."""
    needed = ("model_channels", "channel_mult", "num_res_blocks", "transformer_depth", "context_dim")
    if any(k not in unet_config for k in needed) or (unet_config.get("adm_in_channels") and not is_sdxl(unet_config)):
        raise AttenCraftError(f"AttenCraft works on {SUPPORTED} checkpoints; this MODEL is another kind (the SDXL "
                              "refiner, SD3, Chroma, video...). Load one of those in Load Checkpoint.")
    levels = len(unet_config["channel_mult"])
    res = list(unet_config["num_res_blocks"])
    if len(set(res)) != 1:
        raise AttenCraftError("This UNet has a different number of res blocks per level; not supported.")
    depth = list(unet_config["transformer_depth"])
    depth_out = list(unet_config["transformer_depth_output"])
    down = [depth[i * res[0]:(i + 1) * res[0]] for i in range(levels)]
    up = [depth_out[i * (res[0] + 1):(i + 1) * (res[0] + 1)] for i in range(levels)][::-1]
    channels = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    if unet_config.get("num_head_channels", -1) not in (-1, None):
        heads = [c // unet_config["num_head_channels"] for c in channels]
    else:
        heads = unet_config["num_heads"]
    mid = unet_config.get("transformer_depth_middle", 1)
    config = dict(
        sample_size=sample_size, in_channels=unet_config.get("in_channels", 4),
        out_channels=unet_config.get("out_channels", 4), block_out_channels=channels, layers_per_block=res[0],
        down_block_types=["CrossAttnDownBlock2D" if max(d) else "DownBlock2D" for d in down],
        up_block_types=["CrossAttnUpBlock2D" if max(d) else "UpBlock2D" for d in up],
        transformer_layers_per_block=[per_layer([max(x, 1) for x in d]) for d in down],
        mid_block_type="UNetMidBlock2DCrossAttn" if mid and mid > 0 else None,
        cross_attention_dim=unet_config["context_dim"], attention_head_dim=heads,
        use_linear_projection=bool(unet_config.get("use_linear_in_transformer", False)))
    if any(len(set(d)) > 1 or set(u) != {d[0]} for d, u in zip(down[::-1], up)):  # up blocks as the down ones?
        config["reverse_transformer_layers_per_block"] = [[max(x, 1) for x in u] for u in up]
    if mid and mid != max(max(down[-1]), 1):  # diffusers gives the middle block the last level's depth
        raise AttenCraftError("This UNet's middle block depth differs from its last level's; not supported.")
    if is_sdxl(unet_config):
        config.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=SDXL_ADM)
    return config


def unet_from_comfy(model, device: torch.device, dtype: torch.dtype = torch.float32) -> "torch.nn.Module":
    """A diffusers UNet with the MODEL's base weights, copied straight onto `device` in `dtype` (the module is
    built without weights of its own first, so no second full copy exists); LoRA patches on the MODEL are not
    baked in."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    base = model.model
    unet_config = base.model_config.unet_config
    kind = str(getattr(base, "model_type", "")).split(".")[-1]
    if kind not in ("EPS", "V_PREDICTION"):
        raise AttenCraftError(f"This MODEL is {type(base.model_config).__name__} ({kind.lower().replace('_', '-')} "
                              f"prediction); AttenCraft supports {SUPPORTED}: load one of those.")
    v_pred = kind == "V_PREDICTION"
    sample_size = 128 if is_sdxl(unet_config) else 96 if v_pred else 64
    config = unet_config_to_diffusers(unet_config, sample_size=sample_size)
    comfy_sd = base.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    with torch.inference_mode(False):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config)
        target = unet.state_dict()
        missing = sorted(k for k in target if mapping.get(k) not in comfy_sd)
        if missing:
            raise AttenCraftError(f"Could not map {len(missing)} UNet weights from ComfyUI (e.g. {missing[0]}); "
                                  "this checkpoint layout is not supported.")
        state = {k: comfy_sd[mapping[k]].detach().to(device=device, dtype=dtype, copy=True) for k in target}
        unet.load_state_dict(state, assign=True)
        unet.requires_grad_(False).eval()
    return unet, ("v_prediction" if v_pred else "epsilon")


def _tokenizer(comfy_dir: str, pad: str | None = None):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(comfy_dir, "sd1_tokenizer"))
    tokenizer.model_max_length = 77  # ComfyUI's file says 8192 (it chunks)
    if pad is not None:
        tokenizer.pad_token = pad  # OpenCLIP towers pad with token 0 ("!"), as ComfyUI does
    return tokenizer


def _tower(sd: dict, prefix: str, config_path: str, dtype: torch.dtype, drop_last_layer: bool = False,
           projection: bool = False):
    """One CLIP text tower from the CLIP's state dict (keys under `prefix`), as a transformers model in `dtype`."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = json.loads(open(config_path).read())
    if drop_last_layer:
        config["num_hidden_layers"] -= 1  # SD 2.x uses the penultimate layer, then the final layer norm
    with torch.inference_mode(False):
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        model = cls(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")})).to(dtype)
        # ComfyUI keeps HF's "text_model." prefix; transformers 5 dropped it from CLIPTextModel's own keys.
        inner = "" if "text_model.embeddings.token_embedding.weight" in model.state_dict() else "text_model."
        head = f"{prefix}transformer."
        state = {k[len(head) + len(inner):]: v for k, v in sd.items()
                 if k.startswith(head + inner) and "text_projection" not in k}
        if projection:
            state["text_projection.weight"] = sd[f"{head}text_projection.weight"]
        state = {k: v.detach().to("cpu", dtype, copy=True) for k, v in state.items()}
        result = model.load_state_dict(state, strict=False)
        needed = [k for k in result.missing_keys if "position_ids" not in k]
        if needed:
            raise AttenCraftError(f"The CLIP lacks {len(needed)} text-encoder weights (e.g. {needed[0]}).")
    return model


def text_encoder_from_comfy(clip, device: torch.device, dtype: torch.dtype = torch.float32,
                            flux: bool = False) -> list[tuple["torch.nn.Module", object]]:
    """(text encoder, tokenizer) per tower, equal to the CLIP's: SD 1.x clip_l; SD 2.x clip_h (penultimate layer
    + final norm); SDXL clip_l and clip_g (with its projection; the family reads their penultimate layers);
    Flux (`flux`) clip_l (its pooled output) and t5xxl."""
    import comfy.sd1_clip

    sd = clip.get_sd()
    comfy_dir = os.path.dirname(os.path.realpath(comfy.sd1_clip.__file__))
    has = {p: f"{p}.transformer.text_model.embeddings.token_embedding.weight" in sd for p in ("clip_l", "clip_h",
                                                                                         "clip_g")}
    t5 = any(k.startswith("t5xxl.") for k in sd)
    if flux != (t5 and has["clip_l"]) or not (has["clip_l"] or has["clip_h"]):
        wanted = ("Flux needs clip_l and t5xxl: load both in DualCLIPLoader with type flux" if flux
                  else "connect the CLIP of the same checkpoint")
        raise AttenCraftError(f"This CLIP is not the text encoder of the MODEL's family ({wanted}).")
    if flux:
        towers = [(_tower(sd, "clip_l.", os.path.join(comfy_dir, "sd1_clip_config.json"), dtype),
                   _tokenizer(comfy_dir)), t5_from_comfy(sd, comfy_dir, device, dtype)]
    elif has["clip_g"]:
        towers = [(_tower(sd, "clip_l.", os.path.join(comfy_dir, "sd1_clip_config.json"), dtype),
                   _tokenizer(comfy_dir)),
                  (_tower(sd, "clip_g.", os.path.join(comfy_dir, "clip_config_bigg.json"), dtype, projection=True),
                   _tokenizer(comfy_dir, pad="!"))]
    elif has["clip_l"]:
        towers = [(_tower(sd, "clip_l.", os.path.join(comfy_dir, "sd1_clip_config.json"), dtype),
                   _tokenizer(comfy_dir))]
    else:
        towers = [(_tower(sd, "clip_h.", os.path.join(comfy_dir, "text_encoders", "sd2_clip_config.json"), dtype,
                          drop_last_layer=True), _tokenizer(comfy_dir, pad="!"))]
    for model, _ in towers:
        model.to(device).requires_grad_(False).eval()
    return towers


def vae_from_comfy(vae, latent_format, device: torch.device, sample_size: int = 512):
    """A diffusers AutoencoderKL with the VAE's weights (LDM layout converted by diffusers' own converter), with
    the MODEL's latent scale and shift (Flux's VAE: 16 channels, no quant convs, a shift)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = vae.get_sd()
    if "encoder.conv_in.weight" not in sd or "decoder.conv_in.weight" not in sd:
        raise AttenCraftError("This VAE is not an SD/SDXL/Flux style AutoencoderKL: connect the VAE of the same "
                              "model (for Flux, ae.safetensors in Load VAE).")
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    channels = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    config = dict(in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=layers,
                  down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                  latent_channels=sd["decoder.conv_in.weight"].shape[1], sample_size=sample_size,
                  scaling_factor=float(getattr(latent_format, "scale_factor", 0.18215)),
                  shift_factor=getattr(latent_format, "shift_factor", None),
                  use_quant_conv="quant_conv.weight" in sd, use_post_quant_conv="post_quant_conv.weight" in sd)
    with torch.inference_mode(False):
        state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}
        model = AutoencoderKL(**config)
        model.load_state_dict(convert_ldm_vae_checkpoint(state, config))
        model.to(device).requires_grad_(False).eval()
    return model


def model_text_width(model) -> int | None:
    """How wide the MODEL's text features are, all towers together (what a concept set's embeddings must be)."""
    config = model.model.model_config.unet_config
    if is_flux(model):
        return config["vec_in_dim"] + config["context_in_dim"]  # CLIP-L pooled + T5-XXL
    return config.get("context_dim")


def components_from_comfy(model, clip, vae, progress: Progress = no_progress, precision: str = "auto"):
    """The core's SDComponents from ComfyUI objects (SD 1.x/2.x, SDXL or Flux.1), on ComfyUI's torch device, free of
    inference mode; denoiser and text towers in the dtype `precision` names there (auto: bf16 on a GPU that has it,
    else fp16; fp32 on the CPU), the VAE float32. ComfyUI's own copies leave the device first. `progress` is told
    ("converting the model", parts done, 3)."""
    import comfy.model_management as mm

    progress("converting the model", 0, 3)
    mm.unload_all_models()  # ComfyUI's copies leave the device; patches are restored before we read weights
    mm.soft_empty_cache()
    device = mm.get_torch_device()
    dtype = resolve_dtype(precision, device)
    name = getattr(model.model.model_config, "__class__", type(None)).__name__
    if is_flux(model):
        denoiser = transformer_from_comfy(model, device, dtype)
        scheduler = flux_scheduler(model.model.model_config.unet_config)
    else:
        denoiser, prediction = unet_from_comfy(model, device, dtype)
        scheduler = sd_noise_scheduler(prediction)
    progress("converting the model", 1, 3)
    towers = text_encoder_from_comfy(clip, device, dtype, flux=is_flux(model))
    progress("converting the model", 2, 3)
    # Flux's native resolution is its VAE's sample size (the transformer has none): 1024, as diffusers' Flux VAE
    vae_module = vae_from_comfy(vae, model.model.latent_format, device, 1024 if is_flux(model) else 512)
    progress("converting the model", 3, 3)
    (text_encoder, tokenizer), *second = towers
    comps = SDComponents(denoiser, vae_module, text_encoder, tokenizer, scheduler, source=f"comfyui:{name}",
                         text_encoder_2=second[0][0] if second else None, tokenizer_2=second[0][1] if second else None)
    mismatch = family_of(comps).text_width_mismatch(comps)
    if not mismatch and not is_flux(model) and (len(towers) == 2) != bool(denoiser.config.addition_embed_type):
        mismatch = "an SDXL UNet takes both SDXL text encoders, and only it does"
    if mismatch:
        raise AttenCraftError(f"The MODEL and CLIP come from different model families ({mismatch}): connect the "
                              "CLIP of the same checkpoint.")
    if vae_module.config.latent_channels != model.model.latent_format.latent_channels:
        raise AttenCraftError(f"The VAE makes {vae_module.config.latent_channels}-channel latents but the MODEL "
                              f"takes {model.model.latent_format.latent_channels}: connect the VAE of the same model.")
    return comps
