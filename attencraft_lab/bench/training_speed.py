"""Benchmark: seconds per AttenCraft training step vs a plain LoRA step, and mask extraction vs one forward.

Same UNet, latent size and LoRA targets for both steps (batch = instance + prior image); also the cost of one
training preview (--preview-every) as a share of the training time. Random weights with
the real SD geometry: `--family sd1` (SD 1.5 UNet, 860 M), `sd2` (SD 2.1-base) or `sdxl` (SDXL base, 2.6 B, with both text
towers). Prints a table; not a test.

    python -m attencraft_lab.bench.training_speed                                # CPU, SD 1.5 shape, 256 px
    python -m attencraft_lab.bench.training_speed --family sd2 --resolution 512 --device cuda \
        --precisions fp32,bf16,bf16+gc --steps 5                  # the GPU run (one call)
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from attencraft_core.api import (AttenCraftError, MaskOptions, SDComponents, Trainer, TrainOptions,
                                  ConceptTokens, concepts_prompt, encode_prompts, masks_from_latents, parse_concepts,
                                  resolve_device, sd_noise_scheduler)

from ..machine import machine_description
from ..tiny_models import build_word_tokenizer

SDXL_UNET = dict(  # SDXL base 1.0's UNet (2.6 B parameters)
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SHAPES = {  # UNet config and text towers (width, layers, heads)
    "sd1": (dict(cross_attention_dim=768, attention_head_dim=8), [(768, 12, 12)]),
    "sd2": (dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
            [(1024, 23, 16)]),
    "sdxl": (SDXL_UNET, [(768, 12, 12), (1280, 32, 20)]),
}


def build(family: str, resolution: int, dtype: torch.dtype = torch.float32) -> SDComponents:
    """Family-shaped random components: full-size UNet and text towers created in `dtype` (no float32 copy on
    the way, so peak RSS is that of the dtype), a small float32 VAE with the SD latent layout."""
    unet_config, towers = SHAPES[family]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        unet = UNet2DConditionModel(sample_size=resolution // 8, **unet_config)
        parts = [build_tower(i, *tower) for i, tower in enumerate(towers)]
    finally:
        torch.set_default_dtype(default)
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32)
    for m in (unet, vae, *(t for t, _ in parts)):
        m.requires_grad_(False).eval()
    (text, tokenizer), *second = parts
    return SDComponents(unet, vae, text, tokenizer, sd_noise_scheduler(), source=f"random-{family}",
                        text_encoder_2=second[0][0] if second else None, tokenizer_2=second[0][1] if second else None)


def build_tower(index: int, dim: int, layers: int, heads: int):
    """(text tower, word tokenizer): CLIP-L-like first, OpenCLIP-like (with projection, "!" padding) second."""
    tokenizer = build_word_tokenizer()
    if index:
        tokenizer.pad_token = "!"
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=dim, intermediate_size=4 * dim,
                            num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=77,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id, projection_dim=dim)
    return (CLIPTextModelWithProjection if index else CLIPTextModel)(config), tokenizer


def timed(fn, repeats: int, device: torch.device) -> float:
    sync = getattr(torch, device.type, None)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None and hasattr(sync, "synchronize"):
            sync.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]  # median


def peak_memory(device: torch.device) -> str:
    mod = getattr(torch, device.type, None)
    if mod is None or not hasattr(mod, "max_memory_allocated"):
        return "n/a"
    return f"{mod.max_memory_allocated() / 2**30:.2f} GiB"


def reset_peak(device: torch.device) -> None:
    mod = getattr(torch, device.type, None)
    if mod is not None and hasattr(mod, "reset_peak_memory_stats"):
        mod.reset_peak_memory_stats()


def measure_masks(args, device: torch.device, concepts, dtype: torch.dtype) -> None:
    """Mask extraction vs one UNet forward (batch 1), on a model of its own in `dtype`."""
    comps = build(args.family, args.resolution, dtype).to(device)
    print(f"UNet parameters: {sum(p.numel() for p in comps.denoiser.parameters()) / 1e6:.0f} M")
    ConceptTokens.add(comps, concepts)
    latents = torch.randn(1, 4, args.resolution // 8, args.resolution // 8, device=device, dtype=dtype)
    emb = encode_prompts(comps, [concepts_prompt(["<c0>", "<c1>"])], latents)
    t = torch.tensor([100], device=device)

    def forward():
        with torch.no_grad():
            comps.denoiser(latents, t, **emb)

    def extract():
        try:
            masks_from_latents(comps, latents, concepts, MaskOptions(), torch.Generator().manual_seed(0))
        except AttenCraftError:
            pass  # random attention may not separate the concepts; the work is done by then

    def above_weights(fn) -> tuple[float, str]:
        """Median seconds of `fn`, and its peak device memory above what was allocated before it."""
        mod = getattr(torch, device.type, None)
        before = mod.memory_allocated() if hasattr(mod, "memory_allocated") else None
        reset_peak(device)
        seconds = timed(fn, args.steps, device)
        extra = "n/a" if before is None else f"{(mod.max_memory_allocated() - before) / 2**30:.2f} GiB"
        return seconds, extra

    forward()
    (t_fwd, m_fwd), (t_mask, m_mask) = above_weights(forward), above_weights(extract)
    print("\n| measure | seconds | ratio | peak device memory above the weights |\n| --- | --- | --- | --- |")
    print(f"| one UNet forward (batch 1) | {t_fwd:.2f} | 1.00 | {m_fwd} |")
    print(f"| mask extraction | {t_mask:.2f} | {t_mask / t_fwd:.2f} | {m_mask} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd1", choices=list(SHAPES))
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    ap.add_argument("--precisions", default="fp32",
                    help="comma list of fp32, bf16, fp16, bf16+gc: the frozen weights' dtype (LoRA and concept "
                         "rows learn in fp32), gc = gradient checkpointing")
    ap.add_argument("--preview-every", type=int, default=100,
                    help="the training-preview interval whose cost is reported (0: not measured)")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    print(f"device: {device} ({machine_description(device)}); {args.family}-shaped random UNet, "
          f"{args.resolution} px")
    image = Image.new("RGB", (args.resolution, args.resolution), (128, 128, 128))
    masks = [torch.zeros(args.resolution, args.resolution) for _ in range(2)]
    masks[0][: args.resolution // 2] = 1
    masks[1][args.resolution // 2:] = 1
    concepts = parse_concepts("cat, dog")
    variants = args.precisions.split(",")
    measure_masks(args, device, concepts, DTYPES[variants[0].partition("+")[0]])
    gc.collect()  # one full model in memory at a time (SDXL's is 10 GB in fp32)

    print("\n| precision | AttenCraft step s | plain LoRA step s | ratio | peak device memory (AttenCraft) | "
          "peak RSS so far |")
    print("| --- | --- | --- | --- | --- | --- |")

    def measure(variant: str) -> str:
        """One row of the table; its model and optimizer are freed on return."""
        precision, _, gc = variant.partition("+")
        dtype = DTYPES[precision]  # frozen weights; bf16 is measured on the CPU too (RSS), never chosen there
        comps_v = build(args.family, args.resolution, dtype).to(device)
        opts = TrainOptions(steps=10_000, checkpoint_every=10_000, refresh_every=0,
                            gradient_checkpointing=gc == "gc", masks=MaskOptions())
        out = Path(os.environ.get("TMPDIR", "/tmp")) / "attencraft-bench"
        trainer = Trainer(comps_v, image, concepts, out, opts, user_masks=masks, class_images=[image],
                          log=lambda s: None)
        reset_peak(device)
        counter = iter(range(10_000))
        trainer.step(next(counter))  # warm-up
        t_ac = timed(lambda: trainer.step(next(counter)), args.steps, device)
        mem = peak_memory(device)
        if args.preview_every:
            t_preview = timed(lambda: trainer.preview("bench", 0), 1, device)
            previews.append(f"| {variant} | {t_preview:.2f} | {t_ac:.2f} | {args.preview_every} | "
                            f"{100 * t_preview / (args.preview_every * t_ac):.1f} % |")

        # plain LoRA fine-tuning step on the same UNet + LoRA: batch 2, MSE, fused attention, frozen text
        unet = comps_v.denoiser
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)
        lat = torch.randn(2, 4, args.resolution // 8, args.resolution // 8, device=device, dtype=dtype)
        with torch.no_grad():
            text = encode_prompts(comps_v, [concepts_prompt(["<c0>", "<c1>"]), opts.class_prompt], lat)

        def plain_step():
            noise = torch.randn_like(lat)
            ts = torch.randint(0, 1000, (2,), device=device)
            pred = unet(comps_v.noise_scheduler.add_noise(lat, noise, ts), ts, **text).sample
            F.mse_loss(pred.float(), noise).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        plain_step()
        t_plain = timed(plain_step, args.steps, device)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # Linux: KiB
        return f"| {variant} | {t_ac:.2f} | {t_plain:.2f} | {t_ac / t_plain:.2f} | {mem} | {rss:.1f} GiB |"

    previews: list[str] = []
    for variant in variants:
        print(measure(variant))
    if previews:
        print(f"\n| precision | one training preview s ({len(concepts)} concepts) | AttenCraft step s | every N "
              "steps | added training time |\n| --- | --- | --- | --- | --- |")
        print("\n".join(previews))


if __name__ == "__main__":
    main()
