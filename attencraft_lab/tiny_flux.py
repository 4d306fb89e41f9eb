"""Tiny Flux-shaped pipelines built from configs (random weights), with Flux.1's component types.

`FluxTransformer2DModel` (double- and single-stream blocks, rotary positions, guidance embedding for "dev"),
flow matching (`FlowMatchEulerDiscreteScheduler` with Flux's resolution-dependent shift), a T5 encoder and a
CLIP text encoder with word-level tokenizers, and a 16-channel VAE. Saved with `save_pretrained`, the folder
loads offline with `FluxPipeline.from_pretrained(folder)`. The groundwork of the Flux family (issue #22) and of
its DiT toy: what runs here says nothing about quality.
"""

from __future__ import annotations

import string

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel, T5Tokenizer

from attencraft_core.api import SDComponents

from .tiny_models import BASE_WORDS, build_word_tokenizer

T5_MAX_LENGTH = 32  # Flux.1 uses 512 (dev) or 256 (schnell) T5 tokens; the toy's captions are short
T5_SPARE_ROWS = 28  # T5's table has rows no token uses (32,128 for 32,100 tokens): added tokens need no resize


def build_t5_word_tokenizer(words=BASE_WORDS, max_length: int = T5_MAX_LENGTH) -> T5Tokenizer:
    """A T5 (unigram) tokenizer in which every given word is one piece ("▁word"); other words spell out in
    letters. Appends "</s>" as T5 does; pads with "<pad>" (id 0)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    pieces += [(f"▁{w}", -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in string.ascii_lowercase + string.digits + ".,!?'-<>"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def build_tiny_flux_pipeline(seed: int = 0, width: int = 32, words=BASE_WORDS, guidance: bool = True,
                             sample_size: int = 64) -> FluxPipeline:
    """A Flux-shaped pipeline: 1 double- and 1 single-stream block of `width` channels (2 heads), T5 and CLIP
    towers of `width`, a small VAE with Flux's 16 latent channels and its scale/shift. `guidance` gives the
    transformer the guidance embedding of Flux.1-dev (schnell has none)."""
    torch.manual_seed(seed)
    heads = 2
    head = width // heads
    third = head // 8 * 3  # rotary dims per axis (time, height, width), as Flux's 16/56/56 of 128
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head,
        num_attention_heads=heads, joint_attention_dim=width, pooled_projection_dim=width, guidance_embeds=guidance,
        axes_dims_rope=(head - 2 * third, third, third))
    tokenizer = build_word_tokenizer(words)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
        num_attention_heads=heads, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, projection_dim=width))
    t5_tokenizer = build_t5_word_tokenizer(words)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer) + T5_SPARE_ROWS, d_model=width, d_ff=2 * width, num_layers=2,
                                 num_heads=heads, d_kv=width // heads, pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0))
    vae = AutoencoderKL(block_out_channels=(16, 32), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=16, norm_num_groups=8,
                        sample_size=sample_size, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    for module in (transformer, clip, t5, vae):
        module.requires_grad_(False).eval()
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                        tokenizer_2=t5_tokenizer, transformer=transformer)


def flux_components(pipe: FluxPipeline, source: str = "tiny-flux") -> SDComponents:
    """The core's component set over a Flux pipeline's modules (the transformer is the denoiser)."""
    return SDComponents(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, source=source,
                        text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2)
