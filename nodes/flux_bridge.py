"""ComfyUI's Flux MODEL / CLIP (clip_l + t5xxl) -> the core's diffusers modules, in memory, exactly.

The transformer's weights are renamed with ComfyUI's own diffusers map (`comfy.utils.flux_to_diffusers`, the one
its LoRA loader uses), so a LoRA trained on the result loads onto the MODEL key for key. Linear weights ComfyUI
holds in fp8 stay fp8 (FrozenFloat8Linear: computed in the training dtype, never widened for good); fp8 weights
with a per-tensor scale, and all other weights, are copied into the training dtype. As in bridge.py: fresh
modules built outside inference mode, nothing ComfyUI passed in is touched, comfy and diffusers imported where
used.
"""

from __future__ import annotations

import json
import os

import torch

from ..attencraft_core.api import FLOAT8, AttenCraftError, keep_float8_linears

SUPPORTED = "Flux.1 (dev, schnell and their fine-tunes)"


def is_flux(model) -> bool:
    """A MODEL whose diffusion model ComfyUI detected as Flux.1 (text-to-image)."""
    return model.model.model_config.unet_config.get("image_model") == "flux"


def _weight(sd: dict, key: str, dtype: torch.dtype, device, keep_float8: bool = False) -> torch.Tensor:
    """sd[key] in `dtype` on `device`, multiplied by its fp8 scale if ComfyUI keeps one (`<name>.scale_weight`);
    with `keep_float8`, an unscaled float8 tensor is copied as it is."""
    tensor = sd[key]
    scale = sd.get(key.removesuffix(".weight") + ".scale_weight") if key.endswith(".weight") else None
    if keep_float8 and scale is None and tensor.dtype in FLOAT8:
        return tensor.detach().to(device=device, copy=True)
    if scale is not None:
        tensor = tensor.to(torch.float32) * scale.to(torch.float32)
    return tensor.detach().to(device=device, dtype=dtype, copy=True)


def _mapped(sd: dict, source, dtype: torch.dtype, device, keep_float8: bool) -> torch.Tensor:
    """One diffusers tensor from ComfyUI's map entry: a key, (key, (dim, start, length)) or (key, None, fn)."""
    if isinstance(source, str):
        return _weight(sd, source, dtype, device, keep_float8)
    key, part, *fn = source
    if fn:
        return fn[0](_weight(sd, key, torch.float32, device)).to(dtype)
    return _weight(sd, key, dtype, device, keep_float8).narrow(*part).clone()


def _linear_weights(module: torch.nn.Module) -> set[str]:
    """The linear layers' weight names, but for those the model keeps wide (T5's `wo`: transformers casts its
    input to that layer's weight dtype, which would round activations to float8)."""
    wide = set(getattr(module, "_keep_in_fp32_modules", None) or ())
    return {f"{name}.weight" for name, m in module.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in wide}


def transformer_config(unet_config: dict) -> dict:
    """A FluxTransformer2DModel config for ComfyUI's detected Flux `unet_config`."""
    if unet_config.get("in_channels", 16) != unet_config.get("out_channels", 16):
        raise AttenCraftError(f"This MODEL is a Flux with an extra image input (Fill, Canny or Depth); AttenCraft "
                              f"trains {SUPPORTED} text-to-image models: load one of those.")
    patch = unet_config.get("patch_size", 2)
    hidden, heads = unet_config["hidden_size"], unet_config["num_heads"]
    return dict(patch_size=1, in_channels=unet_config["in_channels"] * patch * patch,
                num_layers=unet_config["depth"], num_single_layers=unet_config["depth_single_blocks"],
                attention_head_dim=hidden // heads, num_attention_heads=heads,
                joint_attention_dim=unet_config["context_in_dim"], pooled_projection_dim=unet_config["vec_in_dim"],
                guidance_embeds=bool(unet_config.get("guidance_embed")), axes_dims_rope=tuple(unet_config["axes_dim"]))


def transformer_from_comfy(model, device: torch.device, dtype: torch.dtype):
    """A diffusers FluxTransformer2DModel with the MODEL's base weights, built on the meta device and filled
    straight on `device` in `dtype` (no second full copy); LoRA patches on the MODEL are not baked in."""
    import comfy.utils
    from diffusers import FluxTransformer2DModel

    unet_config = model.model.model_config.unet_config
    config = transformer_config(unet_config)
    comfy_sd = model.model.diffusion_model.state_dict()
    mapping = comfy.utils.flux_to_diffusers(unet_config)
    with torch.inference_mode(False):
        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**config)
        target = transformer.state_dict()
        missing = sorted(k for k in target if k not in mapping)
        if missing:
            raise AttenCraftError(f"Could not map {len(missing)} Flux weights from ComfyUI (e.g. {missing[0]}); "
                                  "this Flux variant is not supported.")
        linear = _linear_weights(transformer)
        state = {k: _mapped(comfy_sd, mapping[k], dtype, device, k in linear) for k in target}
        transformer.load_state_dict(state, assign=True)
        keep_float8_linears(transformer, dtype)
        transformer.requires_grad_(False).eval()
    return transformer


def t5_from_comfy(sd: dict, comfy_dir: str, device: torch.device, dtype: torch.dtype):
    """(T5 encoder, tokenizer) equal to the CLIP's t5xxl: ComfyUI's T5-XXL config and tokenizer files, the CLIP's
    weights (keys under `t5xxl.transformer.`)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    config = json.loads(open(os.path.join(comfy_dir, "text_encoders", "t5_config_xxl.json")).read())
    keep = ("d_ff", "d_kv", "d_model", "num_heads", "num_layers", "vocab_size", "relative_attention_num_buckets",
            "layer_norm_epsilon", "pad_token_id", "eos_token_id", "decoder_start_token_id")
    config = T5Config(**{k: config[k] for k in keep}, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
    head = "t5xxl.transformer."
    with torch.inference_mode(False):
        with torch.device("meta"):
            model = T5EncoderModel(config)
        wanted = [k for k in model.state_dict() if k != "encoder.embed_tokens.weight"]  # tied to shared.weight
        missing = [k for k in wanted if head + k not in sd]
        if missing:
            raise AttenCraftError(f"The CLIP's t5xxl lacks {len(missing)} T5-XXL weights (e.g. {missing[0]}): load "
                                  "the T5-XXL text encoder (t5xxl_fp16 or t5xxl_fp8) in DualCLIPLoader, type flux.")
        linear = _linear_weights(model)
        model.load_state_dict({k: _weight(sd, head + k, dtype, device, k in linear) for k in wanted}, assign=True,
                              strict=False)
        model.tie_weights()
        keep_float8_linears(model, dtype)
        model.requires_grad_(False).eval()
    tokenizer = T5TokenizerFast.from_pretrained(os.path.join(comfy_dir, "text_encoders", "t5_tokenizer"))
    return model, tokenizer


def flux_scheduler(unet_config: dict):
    """The flow-matching schedule of the MODEL: resolution-dependent shift for dev, none for schnell (no
    guidance embedding), as diffusers' Flux.1 scheduler configs."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    if unet_config.get("guidance_embed"):
        return FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                               base_image_seq_len=256, max_image_seq_len=4096)
    return FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
                                           base_image_seq_len=256, max_image_seq_len=4096)
