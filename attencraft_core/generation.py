"""Text-to-image generation with the components (the family's sampler and guidance), and the class-image cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from PIL import Image

from .concepts import tokenize_prompt
from .encoding import decode_latents
from .families import family_of
from .images import load_image
from .model_loading import SDComponents
from .outputs import atomic_write, ensure_out_dir, save_image
from .progress import Progress, no_progress
from .validation import require_number, require_seed


def make_pipeline(comps: SDComponents):
    """The family's diffusers pipeline over the same modules, with its sampling scheduler."""
    family = family_of(comps)
    pipe = family.pipeline(comps, family.sampling_scheduler(comps))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_settings(count: int, seed: int, steps: int, cfg: float, resolution: int | None = None,
                   strength: float = 1.0) -> None:
    """Refuse generation settings out of range (before any model is loaded), one clear error each."""
    require_number("Image count", count, 1, 10_000, integer=True)
    require_number("Sampling steps", steps, 1, 1000, integer=True)
    require_number("Guidance scale (cfg)", cfg, 0, 100)
    require_number("LoRA strength", strength, -10, 10)
    require_seed("Seed", seed)
    require_seed("Last seed (seed + count - 1)", seed + count - 1)
    if resolution is not None:
        require_number("Resolution", resolution, 8, 8192, integer=True, multiple_of=8)


def generate(comps: SDComponents, prompts: list[str], seed: int = 0, steps: int = 30, cfg: float | None = None,
             negative_prompt: str = "", resolution: int | None = None,
             progress: Progress = no_progress) -> list[Image.Image]:
    """One image per prompt; image i uses seed + i, so results do not depend on batch composition. The pipeline
    samples latents in the UNet's dtype; the (float32) VAE decodes them.
    `progress` is told ("generating", sampling steps done, len(prompts) x steps)."""
    cfg = family_of(comps).default_cfg if cfg is None else cfg
    check_settings(len(prompts), seed, steps, cfg, resolution)
    for prompt in prompts:
        tokenize_prompt(comps.tokenizer, prompt)  # readable error for over-long prompts
    tokenize_prompt(comps.tokenizer, negative_prompt, what="negative prompt")
    size = resolution or comps.native_resolution
    pipe, family = make_pipeline(comps), family_of(comps)
    images, total = [], len(prompts) * steps
    progress("generating", 0, total)
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            def step_done(pipe, step, timestep, tensors, done=i * steps):
                progress("generating", done + step + 1, total)
                return tensors

            generator = torch.Generator("cpu").manual_seed(seed + i)
            latents = torch.randn((1, comps.vae.config.latent_channels, size // comps.vae_scale_factor,
                                   size // comps.vae_scale_factor), generator=generator)
            result = family.sample(pipe, comps, prompt, negative_prompt, steps, cfg, latents, step_done)
            images += pipe.image_processor.postprocess(decode_latents(comps, result), output_type="pil")
    return images


def model_fingerprint(comps: SDComponents) -> str:
    """Short hash of a few weights of each module that makes an image (the VAE's decoder too: a checkpoint used
    with another VAE draws other pixels): tells two models apart without hashing gigabytes."""
    h = hashlib.sha256()
    first = getattr(comps.denoiser, "conv_in", None) or comps.denoiser.x_embedder  # a UNet's, a transformer's
    for tensor in (first.weight, comps.text_encoder.get_input_embeddings().weight[:64],
                   comps.vae.decoder.conv_out.weight):
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("ATTENCRAFT_CACHE", Path.home() / ".cache" / "attencraft"))


def class_images(comps: SDComponents, prompt: str, count: int, resolution: int, steps: int = 25,
                 cache_dir: str | Path | None = None, progress: Progress = no_progress) -> list[Image.Image]:
    """`count` base-model images of `prompt`, generated once and cached on disk by model, prompt and size;
    `progress` is told ("class images", sampling steps done, count x steps) at every sampling step, so a caller
    that cancels from it stops within one step."""
    key = hashlib.sha256(f"{model_fingerprint(comps)}|{prompt}|{resolution}|{steps}".encode()).hexdigest()[:16]
    folder = ensure_out_dir(Path(cache_dir or default_cache_dir()) / "class_images" / key)
    atomic_write(folder / "prompt.txt", lambda tmp: tmp.write_text(prompt))
    images, total = [], count * steps
    progress("class images", 0, total)
    for i in range(count):
        path = folder / f"{i:04d}.png"
        if not path.is_file():
            image = generate(comps, [prompt], seed=10_000 + i, steps=steps, resolution=resolution,
                             progress=lambda phase, done, _, first=i * steps: progress("class images", first + done,
                                                                                      total))[0]
            save_image(path, image)
        images.append(load_image(path)[0])  # a damaged cache file is one clear error naming it
        progress("class images", (i + 1) * steps, total)
    return images
