"""SDXL: two text towers (CLIP-L and OpenCLIP-bigG). Context = both penultimate hidden states side by side;
the UNet also takes the second tower's pooled projection and the size/crop/target time ids, exactly as
diffusers' StableDiffusionXLPipeline and ComfyUI's CLIP Text Encode compute them."""

from __future__ import annotations

import torch

from ..concepts import tokenize_prompt
from .sd import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    def recognises(self, unet_config) -> bool:
        return getattr(unet_config, "addition_embed_type", None) == "text_time"

    def owns_name(self, name: str) -> bool:
        return name == "sdxl"

    def name(self, comps) -> str:
        return "sdxl"

    def towers(self, comps) -> list[tuple[object, torch.nn.Module]]:
        return [(comps.tokenizer, comps.text_encoder), (comps.tokenizer_2, comps.text_encoder_2)]

    def embedding_keys(self, name: str) -> list[str]:
        return ["clip_l", "clip_g"]

    def conditioning(self, comps, prompts: list[str], image_hw: tuple[int, int]) -> dict:
        """Penultimate hidden states of both towers concatenated, the pooled projection of the second, and time
        ids (original size, crop top-left (0, 0), target size) = the image's size, as for an uncropped image."""
        hidden, pooled = [], None
        for tokenizer, encoder in self.towers(comps):
            ids = torch.cat([tokenize_prompt(tokenizer, p) for p in prompts]).to(comps.device)
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the last tower's text_embeds (CLIPTextModelWithProjection)
        height, width = image_hw
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=comps.device, dtype=comps.dtype)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1).to(comps.dtype),
                "added_cond_kwargs": {"text_embeds": pooled.to(comps.dtype),
                                      "time_ids": time_ids.repeat(len(prompts), 1)}}

    def pipeline(self, comps, scheduler):
        from diffusers import StableDiffusionXLPipeline  # on use (see lora.py)

        return StableDiffusionXLPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, text_encoder_2=comps.text_encoder_2,
            tokenizer=comps.tokenizer, tokenizer_2=comps.tokenizer_2, unet=comps.denoiser, scheduler=scheduler,
            force_zeros_for_empty_prompt=True)
