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

from ..attencraft_core.api import AttenCraftError, Progress, SDComponents, no_progress, sd_noise_scheduler


def unet_config_to_diffusers(unet_config: dict, sample_size: int = 64) -> dict:
    """A UNet2DConditionModel config for ComfyUI's SD 1.x/2.x `unet_config` (from model detection)."""
    needed = ("model_channels", "channel_mult", "num_res_blocks", "transformer_depth", "context_dim")
    if any(k not in unet_config for k in needed) or unet_config.get("adm_in_channels"):
        raise AttenCraftError("AttenCraft works on SD 1.x and SD 2.x checkpoints; this MODEL is another kind "
                              "(SDXL, SD3, Flux, video...). Load an SD 1.5 or SD 2.x checkpoint.")
    levels = len(unet_config["channel_mult"])
    res = list(unet_config["num_res_blocks"])
    if len(set(res)) != 1:
        raise AttenCraftError("This UNet has a different number of res blocks per level; not supported.")
    depth = list(unet_config["transformer_depth"])
    depth_out = list(unet_config["transformer_depth_output"])
    down_depth = [depth[i * res[0]] for i in range(levels)]
    up_depth = [depth_out[i * (res[0] + 1)] for i in range(levels)][::-1]
    channels = [unet_config["model_channels"] * m for m in unet_config["channel_mult"]]
    if unet_config.get("num_head_channels", -1) not in (-1, None):
        heads = [c // unet_config["num_head_channels"] for c in channels]
    else:
        heads = unet_config["num_heads"]
    mid = unet_config.get("transformer_depth_middle", 1)
    return dict(
        sample_size=sample_size, in_channels=unet_config.get("in_channels", 4),
        out_channels=unet_config.get("out_channels", 4), block_out_channels=channels, layers_per_block=res[0],
        down_block_types=["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in down_depth],
        up_block_types=["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depth],
        transformer_layers_per_block=[max(d, 1) for d in down_depth],
        mid_block_type="UNetMidBlock2DCrossAttn" if mid and mid > 0 else None,
        cross_attention_dim=unet_config["context_dim"], attention_head_dim=heads,
        use_linear_projection=bool(unet_config.get("use_linear_in_transformer", False)))


def unet_from_comfy(model, device: torch.device) -> "torch.nn.Module":
    """A diffusers UNet with the MODEL's base weights (fp32 clones); LoRA patches on the MODEL are not baked in."""
    import comfy.utils
    from diffusers import UNet2DConditionModel

    base = model.model
    unet_config = base.model_config.unet_config
    v_pred = "V_PREDICTION" in str(getattr(base, "model_type", ""))
    config = unet_config_to_diffusers(unet_config, sample_size=96 if v_pred else 64)
    comfy_sd = base.diffusion_model.state_dict()
    mapping = comfy.utils.unet_to_diffusers(unet_config)
    with torch.inference_mode(False):
        unet = UNet2DConditionModel(**config)
        target = unet.state_dict()
        state = {k: comfy_sd[v].detach().to(device="cpu", dtype=torch.float32).clone()
                 for k, v in mapping.items() if v in comfy_sd and k in target}
        missing = sorted(set(target) - set(state))
        if missing:
            raise AttenCraftError(f"Could not map {len(missing)} UNet weights from ComfyUI (e.g. {missing[0]}); "
                                  "this checkpoint layout is not supported.")
        unet.load_state_dict(state)
        unet.to(device).requires_grad_(False).eval()
    return unet, ("v_prediction" if v_pred else "epsilon")


def text_encoder_from_comfy(clip, device: torch.device):
    """(CLIPTextModel, CLIPTokenizer) equal to the CLIP's text tower (SD1: clip_l, SD2: clip_h penultimate)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    sd = clip.get_sd()
    prefix = next((p for p in ("clip_l.", "clip_h.") if f"{p}transformer.text_model.embeddings.token_embedding.weight" in sd), None)
    if prefix is None or any(k.startswith(("clip_g.", "t5xxl.")) for k in sd):
        raise AttenCraftError("This CLIP is not an SD 1.x (CLIP-L) or SD 2.x (OpenCLIP-H) text encoder.")
    import comfy.sd1_clip
    comfy_dir = os.path.dirname(os.path.realpath(comfy.sd1_clip.__file__))
    if prefix == "clip_l.":
        config_path = os.path.join(comfy_dir, "sd1_clip_config.json")
    else:
        config_path = os.path.join(comfy_dir, "text_encoders", "sd2_clip_config.json")
    config = json.loads(open(config_path).read())
    if prefix == "clip_h.":
        config["num_hidden_layers"] -= 1  # SD 2.x uses the penultimate layer, then the final layer norm
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(comfy_dir, "sd1_tokenizer"))
    tokenizer.model_max_length = config["max_position_embeddings"]  # ComfyUI's file says 8192 (it chunks)
    if prefix == "clip_h.":
        tokenizer.pad_token = "!"  # SD 2.x pads with token 0, as ComfyUI does
    with torch.inference_mode(False):
        model = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in config.items() if not k.startswith("_")}))
        # ComfyUI keeps HF's "text_model." prefix; transformers 5 dropped it from CLIPTextModel's own keys.
        head = f"{prefix}transformer." + ("" if "text_model.embeddings.token_embedding.weight"
                                           in model.state_dict() else "text_model.")
        state = {k[len(head):]: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()
                 if k.startswith(head) and "text_projection" not in k}
        result = model.load_state_dict(state, strict=False)
        needed = [k for k in result.missing_keys if "position_ids" not in k]
        if needed:
            raise AttenCraftError(f"The CLIP lacks {len(needed)} text-encoder weights (e.g. {needed[0]}).")
        model.to(device).requires_grad_(False).eval()
    return model, tokenizer, prefix.rstrip(".")


def vae_from_comfy(vae, scale_factor: float, device: torch.device):
    """A diffusers AutoencoderKL with the VAE's weights (LDM layout converted by diffusers' own converter)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sd = vae.get_sd()
    if "encoder.conv_in.weight" not in sd or "post_quant_conv.weight" not in sd:
        raise AttenCraftError("This VAE is not an SD 1.x/2.x style AutoencoderKL.")
    levels = len({k.split(".")[2] for k in sd if k.startswith("encoder.down.")})
    channels = [sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in range(levels)]
    layers = len({k.split(".")[4] for k in sd if k.startswith("encoder.down.0.block.")})
    config = dict(in_channels=3, out_channels=3, block_out_channels=channels, layers_per_block=layers,
                  down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
                  latent_channels=sd["decoder.conv_in.weight"].shape[1], sample_size=512,
                  scaling_factor=scale_factor)
    with torch.inference_mode(False):
        state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in sd.items()}
        model = AutoencoderKL(**config)
        model.load_state_dict(convert_ldm_vae_checkpoint(state, config))
        model.to(device).requires_grad_(False).eval()
    return model


def components_from_comfy(model, clip, vae, progress: Progress = no_progress):
    """The core's SDComponents from ComfyUI objects, on ComfyUI's torch device, fp32, free of inference mode.
    `progress` is told ("converting the model", parts done, 3)."""
    import comfy.model_management as mm

    progress("converting the model", 0, 3)
    mm.unload_all_models()  # ComfyUI's copies leave the device; patches are restored before we read weights
    mm.soft_empty_cache()
    device = mm.get_torch_device()
    unet, prediction = unet_from_comfy(model, device)
    progress("converting the model", 1, 3)
    text_encoder, tokenizer, _ = text_encoder_from_comfy(clip, device)
    progress("converting the model", 2, 3)
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise AttenCraftError("The MODEL and CLIP come from different model families (text width "
                              f"{text_encoder.config.hidden_size} vs UNet context {unet.config.cross_attention_dim}).")
    scale = float(getattr(model.model.latent_format, "scale_factor", 0.18215))
    vae_module = vae_from_comfy(vae, scale, device)
    progress("converting the model", 3, 3)
    scheduler = sd_noise_scheduler(prediction)
    name = getattr(model.model.model_config, "__class__", type(None)).__name__
    return SDComponents(unet, vae_module, text_encoder, tokenizer, scheduler, source=f"comfyui:{name}")
