"""Prompt and image encoding with the component set (shared by masks, training and generation)."""

from __future__ import annotations

import torch

from .concepts import tokenize_prompt
from .model_loading import SDComponents


def encode_prompts(comps: SDComponents, prompts: list[str]) -> torch.Tensor:
    """[B, max_length, dim] text features for the prompts (gradients flow when the encoder trains)."""
    ids = torch.cat([tokenize_prompt(comps.tokenizer, p) for p in prompts]).to(comps.device)
    return comps.text_encoder(ids)[0].to(comps.dtype)


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
