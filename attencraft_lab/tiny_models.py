"""Tiny Stable-Diffusion-shaped component sets built from configs (random weights).

They have the real component types and layer layout, so every code path runs on them in seconds; their
attention is meaningless, so masks made with them say nothing about quality. Tests, benchmarks and the
`make-tiny-model` command use them.
"""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from attencraft_core.api import SDComponents, sd_noise_scheduler

BASE_WORDS = ("a", "photo", "of", "and", "at", "the", "beach", "on", "in", "with", "cat", "dog", "bird",
              "teddy", "bear", "ball", "red", "blue", "green", "circle", "star", "square", "background")


def bpe_merges(words) -> list[tuple[str, str]]:
    """Byte-pair merges learned on the word list itself, run until every word is one symbol.

    Encoding a listed word with these merges replays its training segmentation, so it always ends as one
    token (chaining each word's letters independently does not: one word's merge can break another's chain).
    """
    corpus = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words))]
    merges = []
    while any(len(w) > 1 for w in corpus):
        pairs: dict[tuple[str, str], int] = {}
        for w in corpus:
            for pair in zip(w, w[1:]):
                pairs[pair] = pairs.get(pair, 0) + 1
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for w in corpus:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(tuple(out))
        corpus = merged
    return merges


def build_word_tokenizer(words=BASE_WORDS, max_length: int = 77):
    """A CLIPTokenizer whose BPE merges make each given word one token; other words split into pieces."""
    vocab: dict[str, int] = {}

    def add(token: str) -> None:
        vocab.setdefault(token, len(vocab))

    chars = string.ascii_lowercase + string.digits + ".,!?'-"
    for c in chars:
        add(c)
    for c in chars:
        add(c + "</w>")
    merges = bpe_merges(words)
    for left, right in merges:
        add(left + right)
    add("<|startoftext|>")
    add("<|endoftext|>")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
        return CLIPTokenizer(vocab=str(Path(tmp) / "vocab.json"), merges=str(Path(tmp) / "merges.txt"),
                             model_max_length=max_length)


def build_tiny_components(seed: int = 0, text_dim: int = 32, prediction_type: str = "epsilon",
                          sample_size: int = 32, words=BASE_WORDS) -> SDComponents:
    """A random SD-style set: 64 px images, 32x32 latents, cross/self-attention at every UNet level but the last."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(words)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=text_dim, attention_head_dim=2)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=sample_size * 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_dim, intermediate_size=2 * text_dim, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = sd_noise_scheduler(prediction_type)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False).eval()
    return SDComponents(unet, vae, text_encoder, tokenizer, scheduler, source="tiny")


def text_config(tokenizer, width: int, **extra) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id, **extra)


def build_tiny_sdxl_components(seed: int = 0, widths: tuple[int, int] = (32, 64), prediction_type: str = "epsilon",
                               sample_size: int = 32, words=BASE_WORDS) -> SDComponents:
    """A random SDXL-style set: two text towers (CLIP-L-like, and OpenCLIP-bigG-like with a projection, padding
    with "!"), a UNet with size/crop conditioning and no attention at its top level (as SDXL), 64 px images."""
    torch.manual_seed(seed)
    tokenizer = build_word_tokenizer(words)
    tokenizer_2 = build_word_tokenizer(words)
    tokenizer_2.pad_token = "!"
    text_encoder = CLIPTextModel(text_config(tokenizer, widths[0]))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(tokenizer_2, widths[1], projection_dim=widths[1]))
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(16, 32, 32), norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=sum(widths), attention_head_dim=2,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=widths[1] + 6 * time_dim)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=sample_size * 2)
    for module in (unet, vae, text_encoder, text_encoder_2):
        module.requires_grad_(False).eval()
    return SDComponents(unet, vae, text_encoder, tokenizer, sd_noise_scheduler(prediction_type), source="tiny-sdxl",
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)


def save_components(comps: SDComponents, out_dir: str | Path) -> Path:
    """Write a component set as a diffusers StableDiffusionPipeline (or StableDiffusionXLPipeline) folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    comps.denoiser.save_pretrained(out / "unet")
    comps.vae.save_pretrained(out / "vae")
    comps.text_encoder.save_pretrained(out / "text_encoder")
    comps.tokenizer.save_pretrained(out / "tokenizer")
    comps.noise_scheduler.save_pretrained(out / "scheduler")
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", type(comps.noise_scheduler).__name__],
             "safety_checker": [None, None], "feature_extractor": [None, None],
             "requires_safety_checker": False}
    if comps.text_encoder_2 is not None:
        comps.text_encoder_2.save_pretrained(out / "text_encoder_2")
        comps.tokenizer_2.save_pretrained(out / "tokenizer_2")
        index = {k: v for k, v in index.items() if k not in ("safety_checker", "feature_extractor",
                                                                 "requires_safety_checker")}
        index.update({"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": True,
                      "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                      "tokenizer_2": ["transformers", "CLIPTokenizer"]})
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    return out
