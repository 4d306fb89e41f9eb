"""Train the DiT toy (dit.py) on the procedural world: resumable, seeded, time-budgeted, progress bar.

    python -m attencraft_lab.toy.train_dit --work out/dit-train --minutes 60 --export attencraft_lab/toy/dit_weights

The VAE is the UNet toy's, already trained and frozen; the transformer and both text encoders learn together,
as the UNet toy's stage 3: rectified-flow matching (noisy = (1 - s) x + s e, target e - x, s logit-normal and
shifted as Flux shifts it for 256 image tokens), captions with words dropped at random and 10 % empty ones for
classifier-free guidance, AdamW with a short warm-up, an exponential moving average exported. The same
attention-localisation loss as the UNet toy (--attention-weight), read from the double-stream blocks' joint
attention: each object word's attention over the image tokens is pulled towards its object's mask, and each image
token's attention over the image towards its own region. No token is pulled towards the background: T5 has no
start token, and real Flux models have none that does that. Checkpoints go to --work every five minutes;
rerunning continues from the last one.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import FluxPipeline
from diffusers.training_utils import EMAModel
from tqdm import tqdm

from attencraft_core.api import atomic_write, record_joint_attention, resolve_device

from ..machine import machine_description
from .dit import MAX_TOKENS, build_dit_pipeline
from .train import (ATTENTION_T_MAX, BatchStream, SizedStore, localisation_loss, object_word_positions,
                    write_training_log)

TRAINED = ("transformer", "text_encoder", "text_encoder_2")


def t5_word_groups(caption: str) -> list[list[int] | None]:
    """Each region's token positions in a T5-tokenized caption (one token per word, no start token): none for
    the background, then each object's words."""
    return [None] + [[p - 1 for p in group] for group in object_word_positions(caption)]


def flow_sample(latents: torch.Tensor, generator: torch.Generator, mu: float) -> tuple[torch.Tensor, ...]:
    """(noisy, sigma, target) of rectified flow: sigma = shift(sigmoid(n)), n ~ N(0, 1), Flux's time shift
    exp(mu) / (exp(mu) + 1 / s - 1); noisy = (1 - sigma) x + sigma e; target = e - x."""
    u = torch.sigmoid(torch.randn(len(latents), generator=generator))
    sigma = (math.exp(mu) / (math.exp(mu) + (1 / u - 1))).to(latents)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    s = sigma.view(-1, *[1] * (latents.dim() - 1))
    return (1 - s) * latents + s * noise, sigma, noise - latents


def packed_latents(pipe: FluxPipeline, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled VAE latent means packed into 2x2 patches [B, tokens, 4C], and the image token ids."""
    vae = pipe.vae
    with torch.no_grad():
        latents = (vae.encode(pixels).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
    b, c, h, w = latents.shape
    ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
    return FluxPipeline._pack_latents(latents, b, c, h, w), ids


def train(work: Path, minutes: float, batch: int, seed: int, export: Path | None, max_steps: int | None = None,
          lr: float = 6e-4, ema_decay: float = 0.999, attention_weight: float = 0.03, device: str = "cpu",
          workers: int = 0) -> dict:
    """Train until the time budget or max_steps; checkpoint to `work`; export an EMA FluxPipeline folder."""
    work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    print(f"training the DiT toy on {device}: {machine_description(device)}")
    torch.manual_seed(seed)
    pipe = build_dit_pipeline(seed)
    pipe.to(device)
    modules = [getattr(pipe, name) for name in TRAINED]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.requires_grad_(True).train()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    ema = EMAModel(params, decay=ema_decay, foreach=True)
    generator = torch.Generator().manual_seed(seed)
    log = {"step": 0, "seconds": 0.0, "losses": [], "attention_losses": []}
    ckpt_path = work / "dit_checkpoint.pt"
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        for name, module in zip(TRAINED, modules):
            module.load_state_dict(state[name])
        opt.load_state_dict(state["opt"])
        ema.load_state_dict(state["ema"])
        ema.to(device)
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        log = state["log"]
        print(f"resumed at step {log['step']}, {log['seconds'] / 60:.1f} min")

    def save():
        data = {**{name: m.state_dict() for name, m in zip(TRAINED, modules)}, "opt": opt.state_dict(),
                "ema": ema.state_dict(), "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                "log": log}
        atomic_write(ckpt_path, lambda tmp: torch.save(data, tmp))

    sched = pipe.scheduler.config
    tokens = 256  # 32x32 latents in 2x2 patches
    slope = (sched.max_shift - sched.base_shift) / (sched.max_image_seq_len - sched.base_image_seq_len)
    mu = sched.base_shift + slope * (tokens - sched.base_image_seq_len)
    start, last_save = time.time() - log["seconds"], time.time()
    bar = tqdm(desc="DiT", unit="step", initial=log["step"])
    stream = BatchStream(seed, "dit", log["step"], batch, workers, device)
    while time.time() - start < minutes * 60 and (max_steps is None or log["step"] < max_steps):
        pixels, captions, masks = stream.next()
        latents, image_ids = packed_latents(pipe, pixels)
        text, pooled, text_ids = pipe.encode_prompt(captions, None, device=device, max_sequence_length=MAX_TOKENS)
        noisy, sigma, target = flow_sample(latents, generator, mu)
        store = SizedStore(rows=list(range(len(captions))))
        with record_joint_attention(pipe.transformer, store):
            pred = pipe.transformer(hidden_states=noisy, timestep=sigma, pooled_projections=pooled,
                                    encoder_hidden_states=text, txt_ids=text_ids, img_ids=image_ids).sample
        diffusion = F.mse_loss(pred.float(), target.float())
        loss = diffusion
        if attention_weight:
            attention = localisation_loss(store, masks, captions, (sigma * 1000).long(), t5_word_groups)
            loss = loss + attention_weight * attention
            log["attention_losses"].append(round(attention.item(), 5))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (log["step"] + 1) / 100)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        log["losses"].append(round(diffusion.item(), 5))
        log["step"] += 1
        log["seconds"] = time.time() - start
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(log['losses'][-50:]):.4f}",
                        attn=f"{np.mean(log['attention_losses'][-50:] or [0]):.3f}")
        if time.time() - last_save > 300:
            save()
            last_save = time.time()
    stream.close()
    bar.close()
    save()
    if export:
        ema.copy_to(params)
        for m in modules:
            m.eval().requires_grad_(False)
        pipe.to("cpu")
        for name in TRAINED:  # fp16 on disk keeps the package small; loads in fp32
            getattr(pipe, name).half()
        pipe.save_pretrained(export)
        for name in TRAINED:
            getattr(pipe, name).float()
        write_training_log(export, log, device, attention_t_max=ATTENTION_T_MAX)
        print(f"exported to {export}")
    return log


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/dit-train", help="checkpoint folder (rerun to resume)")
    p.add_argument("--minutes", type=float, default=60, help="wall-clock budget, resumed runs included")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--attention-weight", type=float, default=0.03,
                   help="weight of the attention-localisation loss (0 = plain flow matching)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (the accelerator if there is one), cpu, cuda, mps...")
    p.add_argument("--workers", type=int, default=0, help="processes rendering scenes ahead (worth it on a GPU)")
    p.add_argument("--export", default=None, help="write the EMA model as a FluxPipeline folder here")
    args = p.parse_args(argv)
    train(Path(args.work), args.minutes, args.batch, args.seed, Path(args.export) if args.export else None,
          args.max_steps, args.lr, attention_weight=args.attention_weight, device=args.device,
          workers=args.workers)


if __name__ == "__main__":
    main()
