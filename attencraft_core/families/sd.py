"""Stable Diffusion 1.x/2.x (and other UNets conditioned by one CLIP text encoder): one tokenizer and text tower,
the text encoder's last hidden state as context, no extra UNet inputs."""

from __future__ import annotations

import torch

from ..concepts import tokenize_prompt

EMBEDDING_KEYS = {"sd1": "clip_l", "sd2": "clip_h"}  # what ComfyUI reads from a textual-inversion file


class StableDiffusion:
    def recognises(self, unet_config) -> bool:
        return True

    def owns_name(self, name: str) -> bool:
        return name in EMBEDDING_KEYS or name.startswith("custom-")

    def name(self, comps) -> str:
        """"sd1" (768-d CLIP-L text), "sd2" (1024-d OpenCLIP-H text) or "custom-<dim>" for other models."""
        dim = int(comps.denoiser.config.cross_attention_dim)
        return {768: "sd1", 1024: "sd2"}.get(dim, f"custom-{dim}")

    def towers(self, comps) -> list[tuple[object, torch.nn.Module]]:
        """(tokenizer, text encoder) pairs whose token tables hold the concept tokens."""
        return [(comps.tokenizer, comps.text_encoder)]

    def embedding_keys(self, name: str) -> list[str]:
        """The key of each tower's row in a textual-inversion file."""
        return [EMBEDDING_KEYS.get(name, "emb_params")]

    def native_resolution(self, comps) -> int:
        """Image side in pixels the model was built for (the UNet's sample size x the VAE factor)."""
        size = comps.denoiser.config.sample_size
        return int(size[0] if isinstance(size, (tuple, list)) else size) * comps.vae_scale_factor

    def training_sample(self, comps, latents: torch.Tensor, generator: torch.Generator):
        """(noisy latents, timesteps, target) of the DDPM objective: Gaussian noise and a uniform timestep per
        image from `generator` (CPU); the target is the noise, the velocity or the sample, as the model
        predicts."""
        sched = comps.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=generator).to(latents.device)
        noisy = sched.add_noise(latents, noise, t)
        kind = sched.config.prediction_type
        if kind == "v_prediction":
            return noisy, t, sched.get_velocity(latents, noise, t)
        return noisy, t, latents if kind == "sample" else noise

    def predict(self, comps, noisy: torch.Tensor, t: torch.Tensor, conditioning: dict) -> torch.Tensor:
        """The denoiser's output for noisy latents [B, C, h, w] (the same layout)."""
        return comps.denoiser(noisy, t, **conditioning).sample

    def conditioning(self, comps, prompts: list[str], image_hw: tuple[int, int]) -> dict:
        """The UNet's text inputs for the prompts (gradients flow when a token table trains)."""
        ids = torch.cat([tokenize_prompt(comps.tokenizer, p) for p in prompts]).to(comps.device)
        return {"encoder_hidden_states": comps.text_encoder(ids)[0].to(comps.dtype)}

    def pipeline(self, comps, scheduler):
        """A diffusers text-to-image pipeline over the same modules."""
        from diffusers import StableDiffusionPipeline  # on use (see lora.py)

        return StableDiffusionPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.denoiser,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
