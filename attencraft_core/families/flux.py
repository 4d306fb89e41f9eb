"""Flux.1 (dev and schnell): a diffusion transformer with joint attention over [T5 text tokens; image tokens].

Context = T5's last hidden state, pooled = CLIP-L's pooled output, as diffusers' FluxPipeline computes them (T5
padded to its tokenizer's model_max_length); dev's guidance embedding gets a fixed guidance value. Rectified
flow: noisy = (1 - s) x + s e with s logit-normal and shifted for the image's token count as Flux's scheduler
shifts it, target e - x. The transformer reads latents packed into 2x2 patches. Groundwork of issue #22: masks
and training do not run on Flux yet, and the model loader and the ComfyUI bridge still refuse Flux models.
"""

from __future__ import annotations

import math

import torch

from ..concepts import tokenize_prompt

GUIDANCE = 3.5  # FluxPipeline's default embedded guidance (dev)


class Flux:
    def recognises(self, config) -> bool:
        return getattr(config, "joint_attention_dim", None) is not None

    def owns_name(self, name: str) -> bool:
        return name == "flux"

    def name(self, comps) -> str:
        return "flux"

    def towers(self, comps) -> list[tuple[object, torch.nn.Module]]:
        return [(comps.tokenizer, comps.text_encoder), (comps.tokenizer_2, comps.text_encoder_2)]

    def embedding_keys(self, name: str) -> list[str]:
        return ["clip_l", "t5xxl"]

    def native_resolution(self, comps) -> int:
        return int(comps.vae.config.sample_size)  # the transformer has no size of its own

    def conditioning(self, comps, prompts: list[str], image_hw: tuple[int, int]) -> dict:
        clip_ids = torch.cat([tokenize_prompt(comps.tokenizer, p) for p in prompts]).to(comps.device)
        t5_ids = torch.cat([tokenize_prompt(comps.tokenizer_2, p) for p in prompts]).to(comps.device)
        conditioning = {"encoder_hidden_states": comps.text_encoder_2(t5_ids)[0].to(comps.dtype),
                        "pooled_projections": comps.text_encoder(clip_ids).pooler_output.to(comps.dtype)}
        if comps.denoiser.config.guidance_embeds:
            conditioning["guidance"] = torch.full([len(prompts)], GUIDANCE, device=comps.device)
        return conditioning

    def training_sample(self, comps, latents: torch.Tensor, generator: torch.Generator):
        """(noisy latents, sigmas, target) of rectified flow; the sigmas are what the transformer takes as its
        timestep."""
        config = comps.noise_scheduler.config
        tokens = latents.shape[-2] * latents.shape[-1] // 4
        slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
        mu = config.base_shift + slope * (tokens - config.base_image_seq_len)
        u = torch.sigmoid(torch.randn(len(latents), generator=generator))
        sigma = (math.exp(mu) / (math.exp(mu) + (1 / u - 1))).to(latents)
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * latents + s * noise, sigma, noise - latents

    def predict(self, comps, noisy: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The transformer's velocity for noisy latents [B, C, h, w], packed into 2x2 patches and back."""
        from diffusers import FluxPipeline  # on use (see lora.py)

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(conditioning["encoder_hidden_states"].shape[1], 3, device=noisy.device,
                               dtype=noisy.dtype)
        out = comps.denoiser(hidden_states=packed, timestep=t, img_ids=image_ids, txt_ids=text_ids,
                             **conditioning).sample
        return FluxPipeline._unpack_latents(out, h * comps.vae_scale_factor, w * comps.vae_scale_factor,
                                            comps.vae_scale_factor)

    def pipeline(self, comps, scheduler):
        from diffusers import FluxPipeline  # on use (see lora.py)

        return FluxPipeline(scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder,
                            tokenizer=comps.tokenizer, text_encoder_2=comps.text_encoder_2,
                            tokenizer_2=comps.tokenizer_2, transformer=comps.denoiser)
