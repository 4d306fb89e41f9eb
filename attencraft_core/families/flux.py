"""Flux.1 (dev and schnell): a diffusion transformer with joint attention over [T5 text tokens; image tokens].

Context = T5's last hidden state, pooled = CLIP-L's pooled output, as diffusers' FluxPipeline computes them, T5
padded to 256 tokens as ComfyUI's CLIP Text Encode pads it for Flux; dev's guidance embedding gets a fixed
guidance value. Rectified flow: noisy = (1 - s) x + s e with s logit-normal and shifted for the image's token
count as Flux's scheduler shifts it, target e - x. The transformer reads latents packed into 2x2 patches.

Attention: the image-query x text-key attention of the last quarter of the double-stream blocks is the
cross-attention the method reads, and image-query x image-key the self-attention, both on the 2x2-patch grid
(latent/2). T5 has no start token, so no token stands for the background: the masks derive it from the concepts'
maps (see masks.py), and the attention loss has no background term. Timestep t of the mask options is the noise
level sigma = t / 1000.
LoRA goes on the double-stream blocks' attention (`kv`: the key and value projections of both streams), and on
the single-stream blocks' too with `attn`/`all`; it is exported with diffusers' `transformer.<module>` names,
which ComfyUI's LoRA loader reads for Flux.
"""

from __future__ import annotations

import math

import torch

from ..concepts import token_positions, tokenize_prompt
from ..joint_attention import double_stream_processors, record_joint_attention

GUIDANCE = 3.5  # FluxPipeline's default embedded guidance (dev)
T5_TOKENS = 256  # ComfyUI's Flux T5 tokenizer pads to at least 256 tokens (diffusers' FluxPipeline to 512)
PATCH = 2  # the transformer's tokens are 2x2 latent patches
DOUBLE = r"transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
SINGLE = r"single_transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)"
FEED_FORWARD = r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
LORA_TARGETS = {  # regexes over the transformer's module names (PEFT matches them in full)
    "kv": r"transformer_blocks\.\d+\.attn\.(to_k|to_v|add_k_proj|add_v_proj)",
    "qkvo": DOUBLE,
    "attn": f"{DOUBLE}|{SINGLE}",
    "all": f"{DOUBLE}|{SINGLE}|{FEED_FORWARD}",
}


def last_quarter(blocks: int) -> list[int]:
    """The last quarter of `blocks` double-stream blocks, at least one (Flux.1: 15-18 of 19)."""
    return list(range(blocks - max(1, blocks // 4), blocks))


def t5_length(comps) -> int:
    """The T5 sequence length the transformer sees: ComfyUI's (padding changes a Flux image: the padding tokens
    take part in the joint attention), or the tokenizer's limit if lower."""
    return min(T5_TOKENS, comps.tokenizer_2.model_max_length)


class Flux:
    lora_format = "diffusers"
    default_cfg = GUIDANCE
    # the double-stream blocks whose attention the method reads; None: the last quarter (docs/quality.md measures it)
    mask_blocks: list[int] | None = None
    background_level: float | None = None  # the derived background (mask_math.derived_background)

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

    def text_width_mismatch(self, comps) -> str | None:
        config = comps.denoiser.config
        t5, clip = comps.text_encoder_2.config.d_model, comps.text_encoder.config.hidden_size
        if (t5, clip) == (config.joint_attention_dim, config.pooled_projection_dim):
            return None
        return (f"the transformer expects {config.joint_attention_dim}-d T5 and {config.pooled_projection_dim}-d "
                f"pooled CLIP features but the text encoders give {t5}-d and {clip}-d")

    def native_resolution(self, comps) -> int:
        return int(comps.vae.config.sample_size)  # the transformer has no size of its own

    def conditioning(self, comps, prompts: list[str], image_hw: tuple[int, int]) -> dict:
        clip_ids = torch.cat([tokenize_prompt(comps.tokenizer, p) for p in prompts]).to(comps.device)
        t5_ids = torch.cat([tokenize_prompt(comps.tokenizer_2, p, t5_length(comps)) for p in prompts])
        t5_ids = t5_ids.to(comps.device)
        conditioning = {"encoder_hidden_states": comps.text_encoder_2(t5_ids)[0].to(comps.dtype),
                        "pooled_projections": comps.text_encoder(clip_ids).pooler_output.to(comps.dtype)}
        if comps.denoiser.config.guidance_embeds:
            conditioning["guidance"] = torch.full([len(prompts)], GUIDANCE, device=comps.device)
        return conditioning

    def token_positions(self, comps, prompt: str, placeholders: list[str]) -> dict[str, int]:
        """Each placeholder's index among the T5 tokens (the text keys of the joint attention); no "<sot>"."""
        return token_positions(comps.tokenizer_2, prompt, placeholders, start_token=False)

    def self_attention_factor(self, opts) -> int:
        return PATCH

    def record_attention(self, comps, store, opts, kinds=("cross", "self"), detach_background: bool = False):
        blocks = len(double_stream_processors(comps.denoiser))
        chosen = self.mask_blocks if self.mask_blocks is not None else last_quarter(blocks)
        return record_joint_attention(comps.denoiser, store, chosen, kinds)

    def noised(self, comps, latents: torch.Tensor, noise: torch.Tensor, t: int):
        sigma = torch.full((len(latents),), t / comps.noise_scheduler.config.num_train_timesteps,
                           device=latents.device, dtype=latents.dtype)
        s = sigma.view(-1, 1, 1, 1)
        return (1 - s) * latents + s * noise, sigma

    def lora_targets(self) -> dict[str, str]:
        return LORA_TARGETS

    def export_lora(self, state: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        """diffusers' names under `transformer.` (what ComfyUI reads for Flux), with each module's alpha."""
        out = {f"transformer.{k}": v for k, v in state.items()}
        for key in state:
            if key.endswith(".lora_A.weight"):
                out[f"transformer.{key.removesuffix('.lora_A.weight')}.alpha"] = torch.tensor(float(alpha))
        return out

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

    def sampling_scheduler(self, comps):
        from diffusers import FlowMatchEulerDiscreteScheduler  # on use (see lora.py)

        return FlowMatchEulerDiscreteScheduler.from_config(comps.noise_scheduler.config)

    def sample(self, pipe, comps, prompt: str, negative_prompt: str, steps: int, cfg: float, noise: torch.Tensor,
               callback) -> torch.Tensor:
        """Flow-matching Euler sampling. `cfg` is the embedded guidance of a model that has it (dev; no negative
        prompt then), else true classifier-free guidance with the negative prompt (schnell-like models)."""
        from diffusers import FluxPipeline  # on use (see lora.py)

        b, c, h, w = noise.shape
        scale = comps.vae_scale_factor
        if comps.denoiser.config.guidance_embeds:
            guidance = {"guidance_scale": cfg}
        else:
            guidance = {"true_cfg_scale": cfg, "negative_prompt": negative_prompt}
        packed = pipe(prompt, num_inference_steps=steps, height=h * scale, width=w * scale,
                      latents=FluxPipeline._pack_latents(noise, b, c, h, w).to(comps.device, comps.dtype),
                      max_sequence_length=t5_length(comps), callback_on_step_end=callback,
                      output_type="latent", **guidance).images
        return FluxPipeline._unpack_latents(packed, h * scale, w * scale, scale)

    def pipeline(self, comps, scheduler):
        from diffusers import FluxPipeline  # on use (see lora.py)

        return FluxPipeline(scheduler=scheduler, vae=comps.vae, text_encoder=comps.text_encoder,
                            tokenizer=comps.tokenizer, text_encoder_2=comps.text_encoder_2,
                            tokenizer_2=comps.tokenizer_2, transformer=comps.denoiser)
