"""The toy world's diffusion transformer: Flux.1's component types at toy size (issue #22's DiT toy).

64x64 images through the UNet toy's trained VAE (factor 2, 4 channels; 32x32 latents packed 2x2 into 256 image
tokens), a FluxTransformer2DModel (4 double-stream and 6 single-stream blocks, 192 wide, rotary positions, no
guidance embedding: true classifier-free guidance as for Flux.1-schnell-style models), a T5 encoder and a CLIP
text encoder with word-level tokenizers over the world's vocabulary, flow matching with Flux's
resolution-dependent shift. Loads with FluxPipeline.from_pretrained(folder), offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from attencraft_core.api import check_loading_info

from ..tiny_flux import build_t5_word_tokenizer
from ..tiny_models import build_word_tokenizer
from .model import toy_model_dir
from .world import VOCABULARY

DIT_WEIGHTS_DIR = Path(__file__).resolve().parent / "dit_weights"
TEXT_DIM = 64
WIDTH, HEADS = 192, 6
WORDS = VOCABULARY + ("at", "the", "beach")
MAX_TOKENS = 32


def toy_vae() -> AutoencoderKL:
    """The UNet toy's trained VAE, with the shift factor a Flux pipeline reads (0: none)."""
    folder = toy_model_dir() / "vae"
    vae, info = AutoencoderKL.from_pretrained(folder, local_files_only=True, torch_dtype=torch.float32,
                                              output_loading_info=True)
    check_loading_info("vae", folder, info)  # never a partly random VAE
    vae.register_to_config(shift_factor=0.0)
    return vae.requires_grad_(False).eval()


def build_dit_pipeline(seed: int = 0) -> FluxPipeline:
    """An untrained DiT toy (the trained VAE, everything else random)."""
    torch.manual_seed(seed)
    head = WIDTH // HEADS
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=4, num_single_layers=6, attention_head_dim=head,
        num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False, axes_dims_rope=(head - 2 * (head // 8 * 3), head // 8 * 3, head // 8 * 3))
    tokenizer = build_word_tokenizer(WORDS, max_length=MAX_TOKENS)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    t5_tokenizer = build_t5_word_tokenizer(WORDS, max_length=MAX_TOKENS)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=TEXT_DIM, d_ff=4 * TEXT_DIM, num_layers=2,
                                 num_heads=4, d_kv=TEXT_DIM // 4, dropout_rate=0.0, pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=toy_vae(), text_encoder=clip, tokenizer=tokenizer,
                        text_encoder_2=t5, tokenizer_2=t5_tokenizer, transformer=transformer)
