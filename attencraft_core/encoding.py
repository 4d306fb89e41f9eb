"""Prompt and image encoding with the component set (shared by masks, training and generation)."""

from __future__ import annotations

import torch

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


def encode_images(comps: SDComponents, pixels: torch.Tensor) -> torch.Tensor:
    """Scaled VAE latents (distribution mean) of pixels in [-1, 1], [B, 3, H, W]."""
    vae = comps.vae
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
