"""Stable Diffusion 1.x/2.x (and other UNets conditioned by one CLIP text encoder): one tokenizer and text tower,
the text encoder's last hidden state as context, no extra UNet inputs."""

from __future__ import annotations

import torch

from ..attention import capture_attention
from ..concepts import token_positions, tokenize_prompt
from ..lora import TARGETS, to_kohya

EMBEDDING_KEYS = {"sd1": "clip_l", "sd2": "clip_h"}  # what ComfyUI reads from a textual-inversion file


class StableDiffusion:
    lora_format = "kohya"  # how export_lora names the LoRA's tensors
    default_cfg = 7.5  # generation's guidance scale when none is given

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

    def text_width_mismatch(self, comps) -> str | None:
        """What in the text towers does not fit the denoiser (None: they fit)."""
        width = sum(m.config.hidden_size for m in comps.text_modules)
        expected = comps.denoiser.config.cross_attention_dim
        if width == expected:
            return None
        return f"the UNet expects {expected}-d text features but the text encoders give {width}-d"

    def native_resolution(self, comps) -> int:
        """Image side in pixels the model was built for (the UNet's sample size x the VAE factor)."""
        size = comps.denoiser.config.sample_size
        return int(size[0] if isinstance(size, (tuple, list)) else size) * comps.vae_scale_factor

    def token_positions(self, comps, prompt: str, placeholders: list[str]) -> dict[str, int]:
        """Each placeholder's index among the text keys the recorded cross-attention reads, and "<sot>": the
        start token, whose attention stands for the background."""
        return token_positions(comps.tokenizer, prompt, placeholders)

    def self_attention_factor(self, opts) -> int:
        """Latent side / side of the self-attention map the masks read."""
        return opts.self_factor

    def record_attention(self, comps, store, opts, kinds=("cross", "self"), detach_background: bool = False):
        """Context manager recording the mask options' cross- and self-attention layers (`kinds`) into `store`;
        `detach_background`: the start token's key and value carry no gradient (training)."""
        return capture_attention(comps.denoiser, store, opts.cross_factor if "cross" in kinds else None,
                                 opts.self_factor if "self" in kinds else None, detach_sot=detach_background)

    def noised(self, comps, latents: torch.Tensor, noise: torch.Tensor, t: int):
        """(latents noised to training timestep t, the timestep as the denoiser takes it)."""
        timesteps = torch.full((len(latents),), t, device=latents.device)
        return comps.noise_scheduler.add_noise(latents, noise, timesteps), timesteps

    def lora_targets(self) -> dict[str, str]:
        """LoRA target choice -> regex over the denoiser's module names."""
        return TARGETS

    def export_lora(self, state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """The LoRA as ComfyUI's LoraLoader reads it (kohya names for a UNet)."""
        return to_kohya(state, alpha)

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

    def sampling_scheduler(self, comps):
        """The scheduler generation samples with (DDIM, from the training schedule)."""
        from diffusers import DDIMScheduler  # on use (see lora.py)

        return DDIMScheduler.from_config(comps.noise_scheduler.config)

    def sample(self, pipe, comps, prompt: str, negative_prompt: str, steps: int, cfg: float, noise: torch.Tensor,
               callback) -> torch.Tensor:
        """Scaled latents [1, C, h, w] the pipeline draws from `noise` (the same shape) with classifier-free
        guidance `cfg`; `callback` is diffusers' callback_on_step_end."""
        height, width = (side * comps.vae_scale_factor for side in noise.shape[-2:])
        return pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=cfg,
                    height=height, width=width, latents=noise.to(comps.device, comps.dtype),
                    callback_on_step_end=callback, output_type="latent").images

    def pipeline(self, comps, scheduler):
        """A diffusers text-to-image pipeline over the same modules."""
        from diffusers import StableDiffusionPipeline  # on use (see lora.py)

        return StableDiffusionPipeline(
            vae=comps.vae, text_encoder=comps.text_encoder, tokenizer=comps.tokenizer, unet=comps.denoiser,
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
