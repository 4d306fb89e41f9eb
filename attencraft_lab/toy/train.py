"""Train the toy model from scratch on the procedural world (resumable, seeded, progress bar).

    python -m attencraft_lab.toy.train --work out/toy-train --minutes 60 --export attencraft_lab/toy/weights

Stage 1 trains the VAE to reconstruct scenes; stage 2 sharpens its decoder alone (the latent space stays fixed,
so a UNet already trained on it stays valid); stage 3 trains UNet + text encoder on the latents' means (DDPM
epsilon loss with min-SNR-5 weighting, captions with words dropped at random, 10% empty captions for
classifier-free guidance) on scenes that never show the held-out appearances, and exports an exponential moving
average of those weights. Stage 3 also teaches the attention to localise (--attention-weight): on steps with
t < 500, each object word's cross-attention over pixels is pulled towards its object's exact mask (the start
token towards the background), and each pixel's self-attention at latent/2 towards the pixels of its own
region. Large text-to-image models learn this from scale; a toy trained for an hour on two CPU cores does not
(its attention stayed at chance without it), and the method reads exactly these maps. Checkpoints go to --work
every few minutes; rerunning continues from the last one. On an accelerator (--device auto picks it) worker
processes render the scenes ahead; --init continues an exported model's stage 3.

Stage 4 then teaches the VAE every appearance, the held-out ones too (half of each batch), like the image codec
of a large model that was trained on far more than its UNet ever draws: without it the toy's latents have no
room for the held-out dots, so no customisation could bring them back. The pretraining half's latents are
pulled towards where the VAE put them before the stage, so the UNet trained on them stays valid.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import multiprocessing
import os
import random
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.training_utils import EMAModel, compute_snr
from tqdm import tqdm

from attencraft_core.api import (AttentionStore, atomic_write, capture_attention, encode_images, load_components,
                                  resolve_device)

from ..machine import machine_description
from ..tiny_models import save_components
from .model import build_toy_components
from .world import random_scene, training_caption


ATTENTION_T_MAX = 500  # localisation is supervised on steps where the image is still visible
CODEC_STAGE = "vae-all"  # stage 4: the VAE on every appearance, held-out ones in the second half of each batch


def make_batch(seed: int, stage: str, step: int, size: int) -> tuple[np.ndarray, list[str], list[np.ndarray]]:
    """Step `step` of `stage`'s batch, the same on every run: uint8 pixels [B, 64, 64, 3], captions, exact masks."""
    rng = random.Random(f"{seed}:{stage}:{step}")
    novel = size // 2 if stage == CODEC_STAGE else 0  # the last `novel` scenes show held-out appearances
    scenes = [random_scene(rng, held_out=i >= size - novel) for i in range(size)]
    pixels = np.stack([np.asarray(s.image, np.uint8) for s in scenes])
    captions = [training_caption(s, rng) if rng.random() > 0.1 else "" for s in scenes]
    return pixels, captions, [s.masks for s in scenes]


class BatchStream:
    """A stage's batches from step `start` on, made ahead by `workers` processes (in this process when 0).

    Rendering scenes takes about 0.6 ms each on one core: on a GPU that, not the model, would set the pace. The
    processes start with the first batch asked for, so a stage that is already done starts none.
    """

    def __init__(self, seed: int, stage: str, start: int, size: int, workers: int, device: torch.device):
        self.seed, self.stage, self.size, self.workers, self.device = seed, stage, size, workers, device
        self.next_step = start
        self.pool: ProcessPoolExecutor | None = None
        self.ahead: deque = deque()

    def _submit(self) -> None:
        self.ahead.append(self.pool.submit(make_batch, self.seed, self.stage, self.next_step, self.size))
        self.next_step += 1

    def next(self) -> tuple[torch.Tensor, list[str], list[np.ndarray]]:
        """Pixels in [-1, 1], [B, 3, 64, 64] on the device; captions; masks."""
        if self.workers and self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
            for _ in range(2 * self.workers):
                self._submit()
        if self.pool:
            pixels, captions, masks = self.ahead.popleft().result()
            self._submit()
        else:
            pixels, captions, masks = make_batch(self.seed, self.stage, self.next_step, self.size)
            self.next_step += 1
        pixels = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        return pixels, captions, masks

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(wait=False, cancel_futures=True)


def object_word_positions(caption: str) -> list[list[int]]:
    """Token positions of each object's words in a pretraining caption (one token per word, after <sot>)."""
    groups: list[list[int]] = [[]] if caption else []
    for i, word in enumerate(caption.split()[3:], start=3):  # after "a photo of"
        if word == "and":
            groups.append([])
        elif word != "a":
            groups[-1].append(i + 1)
    return groups


class SizedStore(AttentionStore):
    """Keeps every kind and map size apart: "cross16", "cross8", "self16"."""

    def add(self, kind: str, probs: torch.Tensor, heads: int) -> None:
        super().add(f"{kind}{round(math.sqrt(probs.shape[1]))}", probs, heads)


def clip_word_groups(caption: str) -> list[list[int] | None]:
    """The token positions of each region in a CLIP-tokenized caption: the start token for the background,
    then each object's words."""
    return [[0]] + object_word_positions(caption)


def localisation_loss(store: SizedStore, masks: list[np.ndarray], captions: list[str],
                      t: torch.Tensor, word_groups=clip_word_groups) -> torch.Tensor:
    """Mean KL(target || attention) over the recorded maps of the captioned rows with t < ATTENTION_T_MAX.

    One term per (row, map size, region) for cross-attention (region = background or an object: each of its
    words' attention over pixels against the region's area fractions, averaged over the words), one per
    (row, map size) for self-attention (each pixel's attention against its own region's pixels).
    `word_groups(caption)` gives each region's token positions (None: no token stands for that region).
    """
    eps = 1e-8
    rows = [b for b, (caption, step) in enumerate(zip(captions, t.tolist())) if caption and step < ATTENTION_T_MAX]
    if not rows:
        return torch.zeros(())
    maps_by_key = {key: store.mean(key)[rows] for key in store.sums}  # [N, Q, tokens] or [N, Q, Q]
    device = next(iter(maps_by_key.values())).device
    groups = [word_groups(captions[b]) for b in rows]
    regions_count = max(len(g) for g in groups)
    objects = torch.zeros(len(rows), regions_count - 1, *masks[rows[0]].shape[-2:])
    tokens = max(maps.shape[-1] for key, maps in maps_by_key.items() if key.startswith("cross"))
    select = torch.zeros(len(rows), regions_count, tokens)
    present = torch.zeros(len(rows), regions_count, dtype=torch.bool)
    for i, (b, positions) in enumerate(zip(rows, groups)):
        objects[i, : len(masks[b])] = torch.from_numpy(masks[b])
        for r, group in enumerate(positions):
            if group is not None:
                select[i, r, group], present[i, r] = 1.0, True
    objects, select, present = objects.to(device), select.to(device), present.to(device)
    total, count, regions_by_side = torch.zeros((), device=device), 0, {}
    for key, maps in maps_by_key.items():
        side = round(math.sqrt(maps.shape[1]))
        if side not in regions_by_side:  # [N, regions, Q] area fractions: background, then each object
            pooled = F.adaptive_avg_pool2d(objects, side)
            background = (1 - pooled.sum(1, keepdim=True)).clamp_min(0)
            regions_by_side[side] = torch.cat([background, pooled], 1).flatten(2)
        regions = regions_by_side[side]
        if key.startswith("cross"):
            q = regions / regions.sum(2, keepdim=True).clamp_min(eps)  # [N, regions, Q]
            p = maps / maps.sum(1, keepdim=True).clamp_min(eps)  # each token's attention over pixels
            kl = (q * (q + eps).log()).sum(2, keepdim=True) - q @ (p + eps).log()  # [N, regions, tokens]
            per_region = (kl * select).sum(2) / select.sum(2).clamp_min(1)  # mean over the region's words
            total, count = total + per_region[present].sum(), count + int(present.sum())
        else:
            labels = regions.argmax(1)
            same = (labels[:, :, None] == labels[:, None, :]).float()
            q = same / same.sum(2, keepdim=True)
            total, count = total + (q * ((q + eps).log() - (maps + eps).log())).sum(2).mean(1).sum(), count + len(rows)
    return total / count


def reconstruction_loss(recon: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """The VAE's pixel loss in the decoder and every-appearance stages: MSE plus a little L1 (keeps edges sharp)."""
    return F.mse_loss(recon, pixels) + 0.1 * F.l1_loss(recon, pixels)


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample epsilon-loss weights min(SNR, gamma) / SNR (Hang et al., 2023): less weight on nearly clean steps;
    the SNR is diffusers' compute_snr."""
    snr = compute_snr(scheduler, t)
    return snr.clamp(max=gamma) / snr


def train(work: Path, minutes: float, vae_steps: int, batch: int, seed: int, export: Path | None,
          vae_batch: int = 16, max_steps: int | None = None, decoder_steps: int = 0, lr: float = 6e-4,
          ema_decay: float = 0.999, attention_weight: float = 0.03, device: str | None = "cpu",
          workers: int = 0, init: Path | None = None, vae_all_steps: int = 0) -> dict:
    """All four stages; the UNet stage stops at the time budget or at max_steps UNet steps, whichever first.

    `init`: start from an exported toy model instead (its VAE counts as trained; stage 3 continues its UNet and
    text encoder). `workers`: processes that render the scenes ahead (worth it on a GPU).
    """
    work.mkdir(parents=True, exist_ok=True)
    device = resolve_device(device)
    print(f"training on {device}: {machine_description(device)}")
    if device.type != "cpu":
        torch.set_float32_matmul_precision("high")  # TF32 where the accelerator has it
    torch.manual_seed(seed)
    ckpt_path = work / "toy_checkpoint.pt"
    state = torch.load(ckpt_path, weights_only=True, map_location="cpu") if ckpt_path.is_file() else None
    log = {"vae_step": 0, "decoder_step": 0, "unet_step": 0, "vae_all_step": 0, "seconds": 0.0, "losses": []}
    comps = build_toy_components(seed)
    if init and not state:  # its weights into fresh modules, so the export has the same files as any other
        trained = load_components(init)
        for name in ("denoiser", "vae", "text_encoder"):
            getattr(comps, name).load_state_dict(getattr(trained, name).state_dict())
        done = init / "training_log.json"  # an export whose VAE already learnt every appearance keeps it
        vae_all = json.loads(done.read_text()).get("vae_all_step", 0) if done.is_file() else 0
        log.update(vae_step=vae_steps, decoder_step=decoder_steps, vae_all_step=vae_all, init=str(init),
                   scaling_factor=float(trained.vae.config.scaling_factor))
    comps.to(device)
    vae_opt = torch.optim.AdamW(comps.vae.parameters(), lr=1e-3)
    params = list(comps.denoiser.parameters()) + list(comps.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    dec_params = list(comps.vae.post_quant_conv.parameters()) + list(comps.vae.decoder.parameters())
    dec_opt = torch.optim.AdamW(dec_params, lr=5e-4)
    codec_opt = torch.optim.AdamW(comps.vae.parameters(), lr=5e-4)
    anchor = None  # stage 4's reference: the VAE as stage 3 used it
    if state:
        comps.vae.load_state_dict(state["vae"])
        comps.denoiser.load_state_dict(state["unet"])
        comps.text_encoder.load_state_dict(state["text_encoder"])
        vae_opt.load_state_dict(state["vae_opt"])
        opt.load_state_dict(state["opt"])
        if "dec_opt" in state:
            dec_opt.load_state_dict(state["dec_opt"])
        if "vae_anchor" in state:
            codec_opt.load_state_dict(state["codec_opt"])
            anchor = copy.deepcopy(comps.vae).requires_grad_(False)
            anchor.load_state_dict(state["vae_anchor"])
        torch.set_rng_state(state["torch_rng"])
        log = {"decoder_step": 0, "vae_all_step": 0, **state["log"]}
        print(f"resumed: VAE step {log['vae_step']}, UNet step {log['unet_step']}, {log['seconds'] / 60:.1f} min")

    ema = EMAModel(params, decay=ema_decay, foreach=True)  # decay min(ema_decay, (1 + n) / (10 + n)) at step n
    if state and "ema" in state:
        ema.load_state_dict(state["ema"])
        ema.to(device)

    def save():
        data = {"vae": comps.vae.state_dict(), "unet": comps.denoiser.state_dict(),
                "text_encoder": comps.text_encoder.state_dict(), "vae_opt": vae_opt.state_dict(),
                "opt": opt.state_dict(), "dec_opt": dec_opt.state_dict(), "ema": ema.state_dict(),
                "torch_rng": torch.get_rng_state(), "log": log}
        if anchor is not None:
            data.update(vae_anchor=anchor.state_dict(), codec_opt=codec_opt.state_dict())
        atomic_write(ckpt_path, lambda tmp: torch.save(data, tmp))

    def step_done(counter: str, bar, **postfix) -> None:
        """Count a finished step of a stage, show it, and checkpoint every five minutes."""
        nonlocal last_save
        log[counter] += 1
        log["seconds"] = time.time() - start
        bar.update(1)
        bar.set_postfix(**postfix)
        if time.time() - last_save > 300:
            save()
            last_save = time.time()

    budget = minutes * 60
    start, last_save = time.time() - log["seconds"], time.time()
    comps.vae.train()
    bar = tqdm(total=vae_steps, initial=log["vae_step"], desc="VAE", unit="step")
    stream = BatchStream(seed, "vae", log["vae_step"], vae_batch, workers, device)
    while log["vae_step"] < vae_steps:
        pixels = stream.next()[0]
        posterior = comps.vae.encode(pixels).latent_dist
        recon = comps.vae.decode(posterior.sample()).sample
        loss = F.mse_loss(recon, pixels) + 1e-6 * posterior.kl().mean()
        loss.backward()
        vae_opt.step()
        vae_opt.zero_grad(set_to_none=True)
        step_done("vae_step", bar, loss=f"{loss.item():.4f}")
    stream.close()
    bar.close()
    comps.vae.eval().requires_grad_(False)
    comps.vae.decoder.train()
    for p in dec_params:
        p.requires_grad_(True)
    bar = tqdm(total=decoder_steps, initial=log["decoder_step"], desc="VAE decoder", unit="step")
    stream = BatchStream(seed, "decoder", log["decoder_step"], vae_batch, workers, device)
    while log["decoder_step"] < decoder_steps:
        pixels = stream.next()[0]
        with torch.no_grad():
            latents = comps.vae.encode(pixels).latent_dist.mean
        recon = comps.vae.decode(latents).sample
        loss = reconstruction_loss(recon, pixels)
        loss.backward()
        dec_opt.step()
        dec_opt.zero_grad(set_to_none=True)
        step_done("decoder_step", bar, loss=f"{loss.item():.4f}")
    stream.close()
    bar.close()
    comps.vae.eval().requires_grad_(False)
    if "scaling_factor" not in log:
        stream = BatchStream(seed, "scale", 0, batch, 0, device)
        with torch.no_grad():
            latents = torch.cat([comps.vae.encode(stream.next()[0]).latent_dist.mean for _ in range(8)])
        log["scaling_factor"] = float(1.0 / latents.std())
    comps.vae.register_to_config(scaling_factor=log["scaling_factor"])

    comps.denoiser.train()
    comps.text_encoder.train()
    bar = tqdm(desc="UNet", unit="step", initial=log["unet_step"])
    stream = BatchStream(seed, "unet", log["unet_step"], batch, workers, device)
    while time.time() - start < budget and (max_steps is None or log["unet_step"] < max_steps):
        pixels, captions, masks = stream.next()
        latents = encode_images(comps, pixels)
        ids = comps.tokenizer(captions, padding="max_length", max_length=comps.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(device)
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (batch,), device=device)
        store = SizedStore(rows=list(range(batch)))
        recording = capture_attention(comps.denoiser, store, cross_factor=(2, 4), self_factor=2) if attention_weight \
            else contextlib.nullcontext()
        with recording:
            pred = comps.denoiser(comps.noise_scheduler.add_noise(latents, noise, t), t,
                              comps.text_encoder(ids)[0]).sample
        per_sample = F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))
        loss = (per_sample * min_snr_weights(comps.noise_scheduler, t)).mean()
        if attention_weight:
            attn = localisation_loss(store, masks, captions, t)
            loss = loss + attention_weight * attn
            log.setdefault("attention_losses", []).append(round(attn.item(), 5))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:  # short warm-up, also after a resume with a new rate
            group["lr"] = lr * min(1.0, (log["unet_step"] + 1) / 100)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.step(params)
        log["losses"].append(round(per_sample.mean().item(), 5))
        step_done("unet_step", bar, loss=f"{np.mean(log['losses'][-50:]):.4f}",
                  minutes=f"{(time.time() - start) / 60:.1f}",
                  attn=f"{np.mean(log.get('attention_losses', [0])[-50:]):.3f}")
    stream.close()
    bar.close()
    if log["vae_all_step"] < vae_all_steps:
        if anchor is None:
            anchor = copy.deepcopy(comps.vae).eval().requires_grad_(False)
        comps.vae.train().requires_grad_(True)
        kept = vae_batch - vae_batch // 2  # the pretraining scenes of each batch (make_batch)
        bar = tqdm(total=vae_all_steps, initial=log["vae_all_step"], desc="VAE, every appearance", unit="step")
        stream = BatchStream(seed, CODEC_STAGE, log["vae_all_step"], vae_batch, workers, device)
        while log["vae_all_step"] < vae_all_steps:
            pixels = stream.next()[0]
            latents = comps.vae.encode(pixels).latent_dist.mean
            recon = comps.vae.decode(latents).sample
            with torch.no_grad():
                reference = anchor.encode(pixels[:kept]).latent_dist.mean
            drift = F.mse_loss(latents[:kept], reference) / reference.var()  # relative to the latents' spread
            loss = reconstruction_loss(recon, pixels) + drift
            loss.backward()
            codec_opt.step()
            codec_opt.zero_grad(set_to_none=True)
            step_done("vae_all_step", bar, loss=f"{loss.item():.4f}", drift=f"{drift.item():.4f}")
        stream.close()
        bar.close()
        comps.vae.eval().requires_grad_(False)
    log["seconds"] = time.time() - start
    save()
    if export:
        ema.copy_to(params)
        comps.denoiser.eval()
        comps.text_encoder.eval()
        comps.to(torch.device("cpu"))
        out = save_components(comps, export)
        for sub, module in (("unet", comps.denoiser), ("vae", comps.vae), ("text_encoder", comps.text_encoder)):
            # fp16 on disk keeps the package small
            module.half().save_pretrained(out / sub)
            module.float()
        write_training_log(out, log, device)
        print(f"exported to {out}")
    return log


def write_training_log(folder: Path, log: dict, device: torch.device, **extra) -> None:
    """An exported model's training_log.json: the run's counters and settings without the per-step losses, the
    mean of the last 200 losses, the device."""
    summary = {k: v for k, v in log.items() if k not in ("losses", "attention_losses")}
    if log["losses"]:  # none when this run trained no denoiser step
        summary["final_loss_mean_last_200"] = float(np.mean(log["losses"][-200:]))
    summary.update(device=str(device), **extra)
    (Path(folder) / "training_log.json").write_text(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/toy-train", help="checkpoint folder (rerun to resume)")
    p.add_argument("--minutes", type=float, default=60, help="wall-clock budget of stages 1-3 (stage 4 runs after it)")
    p.add_argument("--vae-steps", type=int, default=500, help="VAE reconstruction steps (stage 1)")
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many UNet steps in all")
    p.add_argument("--decoder-steps", type=int, default=500, help="decoder-only steps (stage 2)")
    p.add_argument("--vae-all-steps", type=int, default=2000,
                   help="stage 4: VAE steps on every appearance, after the UNet (an --init export that had them "
                        "skips them)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=6e-4, help="UNet + text encoder learning rate")
    p.add_argument("--attention-weight", type=float, default=0.03,
                   help="weight of the attention-localisation loss (0 = plain diffusion training)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (the accelerator if there is one), cpu, cuda, mps...")
    p.add_argument("--workers", type=int, default=None,
                   help="processes rendering scenes ahead (default: none on the CPU, up to 8 on an accelerator)")
    p.add_argument("--init", default=None, help="continue from an exported toy model (skips stages 1-2)")
    p.add_argument("--export", default=None, help="write the trained model as a diffusers folder here")
    args = p.parse_args(argv)
    workers = args.workers
    if workers is None:
        workers = 0 if resolve_device(args.device).type == "cpu" else min(8, max(0, (os.cpu_count() or 1) - 2))
    train(Path(args.work), args.minutes, args.vae_steps, args.batch, args.seed,
          Path(args.export) if args.export else None, args.vae_batch, args.max_steps, args.decoder_steps, args.lr,
          attention_weight=args.attention_weight, device=args.device, workers=workers,
          init=Path(args.init) if args.init else None, vae_all_steps=args.vae_all_steps)


if __name__ == "__main__":
    main()
