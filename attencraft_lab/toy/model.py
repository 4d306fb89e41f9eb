"""The toy world's text-to-image model: Stable Diffusion's component types at toy size.

64x64 images, an AutoencoderKL with a factor-2 latent (32x32x4), a UNet2DConditionModel with cross-attention at
latent/2 (16x16) and latent/4 (8x8), a 2-layer CLIPTextModel and a word-level CLIPTokenizer over the world's
vocabulary, DDPM noise schedule. Loads with StableDiffusionPipeline.from_pretrained(folder), offline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from attencraft_core.api import SDComponents, TrainOptions, sd_noise_scheduler

from ..tiny_models import build_word_tokenizer
from .world import VOCABULARY

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
TEXT_DIM = 64


def build_toy_components(seed: int = 0) -> SDComponents:
    """Untrained components with the toy model's architecture."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(VOCABULARY + ("at", "the", "beach"), max_length=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        latent_channels=4, norm_num_groups=8, sample_size=64)
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(48, 96, 160),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=16)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_DIM, intermediate_size=4 * TEXT_DIM, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=32, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = sd_noise_scheduler()
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, source="toy")


def toy_model_dir() -> Path:
    """The shipped trained toy model (a diffusers folder inside the package)."""
    return WEIGHTS_DIR


CLASS_PROMPT = "a photo of a shape"


def concept_training_options(steps: int | None = None, **overrides) -> TrainOptions:
    """TrainOptions for learning concepts on the toy model (the demo's and attencraft_lab/bench/quality.py's).

    Wider and higher-rank LoRA than the SD default (all attention and feed-forward layers, rank 16) and a
    higher learning rate: with key/value LoRA at rank 8 the concepts kept their colour but mostly not their
    shape (docs/quality.md). The masked loss's masks grow by 4 latent pixels (8 image pixels), never into the
    other concept's mask: the attention masks cover about 70 % of a toy object, and the edges they miss are
    what makes its shape. No prior preservation: on eight held-out scenes x two seeds it cost concept fidelity
    (0.77 against 0.82 without it, lower in 4 runs of 16) and did not keep the concepts better beside another
    object (context fidelity 0.29 against 0.31); `prior_weight=1.0` turns it back on with the toy's class prompt.
    """
    steps = steps or 800
    settings = dict(steps=steps, lr=5e-4, rank=16, targets="all", loss_mask_margin=4, checkpoint_every=steps,
                    prior_weight=0.0, class_prompt=CLASS_PROMPT, num_class_images=4, class_steps=20)
    return TrainOptions(**{**settings, **overrides})
