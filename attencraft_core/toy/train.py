"""Train the toy model from scratch on the procedural world (resumable, seeded, progress bar).

    python -m attencraft_core.toy.train --work out/toy-train --minutes 60 --export attencraft_core/toy/weights

Stage 1 trains the VAE to reconstruct scenes; stage 2 trains UNet + text encoder (DDPM epsilon loss, captions
with words dropped at random, 10% empty captions for classifier-free guidance) on scenes that never show the
held-out appearances. Checkpoints go to --work every few minutes; rerunning continues from the last one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..outputs import atomic_write
from ..tiny_models import save_components
from .model import build_toy_components
from .world import random_scene, training_caption


def scene_batch(rng: random.Random, size: int) -> tuple[torch.Tensor, list[str]]:
    scenes = [random_scene(rng) for _ in range(size)]
    pixels = torch.from_numpy(np.stack([np.asarray(s.image, np.float32) for s in scenes]) / 127.5 - 1)
    captions = [training_caption(s, rng) if rng.random() > 0.1 else "" for s in scenes]
    return pixels.permute(0, 3, 1, 2), captions


def train(work: Path, minutes: float, vae_steps: int, batch: int, seed: int, export: Path | None,
          vae_batch: int = 16, max_steps: int | None = None) -> dict:
    """Both stages; the UNet stage stops at the time budget or at max_steps UNet steps, whichever comes first."""
    work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    comps = build_toy_components(seed)
    ckpt_path = work / "toy_checkpoint.pt"
    state = torch.load(ckpt_path, weights_only=False) if ckpt_path.is_file() else None
    rng = random.Random(seed)
    vae_opt = torch.optim.AdamW(comps.vae.parameters(), lr=1e-3)
    params = list(comps.unet.parameters()) + list(comps.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=4e-4, weight_decay=1e-2)
    log = {"vae_step": 0, "unet_step": 0, "seconds": 0.0, "losses": []}
    if state:
        comps.vae.load_state_dict(state["vae"])
        comps.unet.load_state_dict(state["unet"])
        comps.text_encoder.load_state_dict(state["text_encoder"])
        vae_opt.load_state_dict(state["vae_opt"])
        opt.load_state_dict(state["opt"])
        rng.setstate(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        log = state["log"]
        print(f"resumed: VAE step {log['vae_step']}, UNet step {log['unet_step']}, {log['seconds'] / 60:.1f} min")

    def save():
        data = {"vae": comps.vae.state_dict(), "unet": comps.unet.state_dict(),
                "text_encoder": comps.text_encoder.state_dict(), "vae_opt": vae_opt.state_dict(),
                "opt": opt.state_dict(), "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "log": log}
        atomic_write(ckpt_path, lambda tmp: torch.save(data, tmp))

    budget = minutes * 60
    start, last_save = time.time() - log["seconds"], time.time()
    comps.vae.train()
    bar = tqdm(total=vae_steps, initial=log["vae_step"], desc="VAE", unit="step")
    while log["vae_step"] < vae_steps:
        pixels, _ = scene_batch(rng, vae_batch)
        posterior = comps.vae.encode(pixels).latent_dist
        recon = comps.vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        loss.backward()
        vae_opt.step()
        vae_opt.zero_grad(set_to_none=True)
        log["vae_step"] += 1
        log["seconds"] = time.time() - start
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if time.time() - last_save > 300:
            save()
            last_save = time.time()
    bar.close()
    comps.vae.eval().requires_grad_(False)
    if "scaling_factor" not in log:
        with torch.no_grad():
            latents = torch.cat([comps.vae.encode(scene_batch(rng, batch)[0]).latent_dist.mean for _ in range(8)])
        log["scaling_factor"] = float(1.0 / latents.std())
    comps.vae.register_to_config(scaling_factor=log["scaling_factor"])
    scale = log["scaling_factor"]

    comps.unet.train()
    comps.text_encoder.train()
    bar = tqdm(desc="UNet", unit="step", initial=log["unet_step"])
    while time.time() - start < budget and (max_steps is None or log["unet_step"] < max_steps):
        pixels, captions = scene_batch(rng, batch)
        with torch.no_grad():
            latents = comps.vae.encode(pixels).latent_dist.sample() * scale
        ids = comps.tokenizer(captions, padding="max_length", max_length=comps.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,))
        pred = comps.unet(comps.noise_scheduler.add_noise(latents, noise, t), t, comps.text_encoder(ids)[0]).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log["unet_step"] += 1
        log["losses"].append(round(loss.item(), 5))
        log["seconds"] = time.time() - start
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(log['losses'][-50:]):.4f}", minutes=f"{log['seconds'] / 60:.1f}")
        if time.time() - last_save > 300:
            save()
            last_save = time.time()
    bar.close()
    log["seconds"] = time.time() - start
    save()
    if export:
        comps.unet.eval()
        comps.text_encoder.eval()
        out = save_components(comps, export)
        for sub in ("unet", "vae", "text_encoder"):  # fp16 on disk keeps the package small
            module = getattr(comps, sub)
            module.half().save_pretrained(out / sub)
            module.float()
        summary = {k: v for k, v in log.items() if k != "losses"}
        summary["final_loss_mean_last_200"] = float(np.mean(log["losses"][-200:]))
        (out / "training_log.json").write_text(json.dumps(summary, indent=2))
        print(f"exported to {out}")
    return log


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/toy-train", help="checkpoint folder (rerun to resume)")
    p.add_argument("--minutes", type=float, default=60, help="total wall-clock budget, both stages")
    p.add_argument("--vae-steps", type=int, default=500, help="VAE reconstruction steps (stage 1)")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many UNet steps in all")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export", default=None, help="write the trained model as a diffusers folder here")
    args = p.parse_args(argv)
    train(Path(args.work), args.minutes, args.vae_steps, args.batch, args.seed,
          Path(args.export) if args.export else None, args.vae_batch, args.max_steps)


if __name__ == "__main__":
    main()
