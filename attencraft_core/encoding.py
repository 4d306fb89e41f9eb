"""Prompt and image encoding with the component set (shared by masks, training and generation)."""

from __future__ import annotations

import torch

from .devices import free_memory
from .errors import AttenCraftError
from .families import family_of
from .model_loading import SDComponents


def encode_prompts(comps: SDComponents, prompts: list[str], latents: torch.Tensor) -> dict:
    """The UNet's text inputs for the prompts, as keyword arguments (`encoder_hidden_states`, and SDXL's
    `added_cond_kwargs`), for latents of the given shape; gradients flow when a token table trains."""
    image_hw = (latents.shape[-2] * comps.vae_scale_factor, latents.shape[-1] * comps.vae_scale_factor)
    return family_of(comps).conditioning(comps, prompts, image_hw)


def cat_conditioning(first: dict, second: dict) -> dict:
    """Two conditionings (as encode_prompts gives them) as one batch."""
    return {k: cat_conditioning(v, second[k]) if isinstance(v, dict) else torch.cat([v, second[k]])
            for k, v in first.items()}


def check_vae_memory(comps: SDComponents, pixels_hw: tuple[int, int], batch: int = 1) -> None:
    """Refuse, before allocating, an image size whose VAE pass would not fit in the device's free memory: its
    full-resolution activations (the first block's channels, float32, about four alive at once)."""
    need = 4 * batch * pixels_hw[0] * pixels_hw[1] * comps.vae.config.block_out_channels[0] * 4
    free = free_memory(comps.device)
    if free is not None and need > free:
        raise AttenCraftError(f"The VAE needs about {need / 2 ** 20:,.0f} MiB for a {pixels_hw[1]}x{pixels_hw[0]} "
                              f"image and {comps.device} has {free / 2 ** 20:,.0f} MiB free: use a smaller "
                              "resolution (the model's own is best).")


def encode_images(comps: SDComponents, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents (distribution mean) of pixels in [-1, 1], [B, 3, H, W]."""
    vae = comps.vae
    check_vae_memory(comps, tuple(pixels.shape[-2:]), len(pixels))
    with torch.no_grad():
        latents = vae.encode(pixels.to(comps.device, vae.dtype)).latent_dist.mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).to(comps.dtype)


def decode_latents(comps: SDComponents, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] from scaled latents."""
    vae = comps.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor + shift).sample.clamp(-1, 1)
