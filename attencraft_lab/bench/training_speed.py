"""Benchmark: seconds per AttenCraft training step vs a plain LoRA step, and mask extraction vs one forward.

Same denoiser, latent size and LoRA targets for both steps (batch = instance + prior image); also the cost of one
training preview (--preview-every) as a share of the training time. Random weights with
the real geometry: `--family sd1` (SD 1.5 UNet, 860 M), `sd2` (SD 2.1-base), `sdxl` (SDXL base, 2.6 B, with both
text towers) or `flux` (Flux.1-dev's block widths, T5-XXL's width and CLIP-L; --flux-depth sets how many double-
and single-stream blocks and T5 layers: 19,38,24 is the full 12 B + 4.7 B model). Prints a table; not a test.

    python -m attencraft_lab.bench.training_speed                                # CPU, SD 1.5 shape, 256 px
    python -m attencraft_lab.bench.training_speed --family sd2 --resolution 512 --device cuda \
        --precisions fp32,bf16,bf16+gc --steps 5                  # the GPU run (one call)
    python -m attencraft_lab.bench.training_speed --family flux --flux-depth 19,38,24 --resolution 1024 \
        --device cuda --precisions fp8+gc,bf16+gc --steps 5       # Flux.1-dev on a GPU (one call)
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
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel, UNet2DConditionModel
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

from attencraft_core.api import (AttenCraftError, MaskOptions, SDComponents, Trainer, TrainOptions,
                                  ConceptTokens, concepts_prompt, encode_prompts, family_of, keep_float8_linears,
                                  masks_from_latents, parse_concepts, resolve_device, sd_noise_scheduler)

from ..machine import machine_description
from ..tiny_flux import build_t5_word_tokenizer
from ..tiny_models import build_word_tokenizer

SDXL_UNET = dict(  # SDXL base 1.0's UNet (2.6 B parameters)
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
# fp8: frozen linear weights stored in float8 (as ComfyUI loads an fp8 Flux file), computed in bf16


def to_float8(comps: SDComponents) -> SDComponents:
    """The denoiser's and text towers' linear weights in float8 (T5's `wo` stays wide, as the bridge keeps it),
    each layer widened to bf16 only for its product (what the bridge builds from an fp8 file)."""
    for module in (comps.denoiser, *comps.text_modules):
        wide = set(getattr(module, "_keep_in_fp32_modules", None) or ())
        for name, layer in module.named_modules():
            if isinstance(layer, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in wide:
                layer.weight.data = layer.weight.data.to(torch.float8_e4m3fn)
        keep_float8_linears(module, torch.bfloat16)
    return comps
SHAPES = {  # UNet config and text towers (width, layers, heads)
    "sd1": (dict(cross_attention_dim=768, attention_head_dim=8), [(768, 12, 12)]),
    "sd2": (dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
            [(1024, 23, 16)]),
    "sdxl": (SDXL_UNET, [(768, 12, 12), (1280, 32, 20)]),
    "flux": (None, [(768, 12, 12)]),  # + T5 (build_flux)
}
FLUX_DEPTH = (2, 4, 2)  # double-stream blocks, single-stream blocks, T5 layers; Flux.1: 19, 38, 24


def build_flux(resolution: int, depth: tuple[int, int, int]):
    """(transformer, T5, T5 tokenizer) with Flux.1-dev's and T5-XXL's widths at the given depths, in the
    default dtype; the tokenizer pads to 512 tokens as Flux.1-dev's does."""
    double, single, t5_layers = depth
    transformer = FluxTransformer2DModel(in_channels=64, num_layers=double, num_single_layers=single,
                                         attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                         pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    tokenizer = build_t5_word_tokenizer(max_length=512)
    t5 = T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=4096, d_ff=10240, num_layers=t5_layers,
                                 num_heads=64, d_kv=64, feed_forward_proj="gated-gelu", pad_token_id=0,
                                 eos_token_id=1, decoder_start_token_id=0))
    return transformer, t5, tokenizer


def build(family: str, resolution: int, dtype: torch.dtype = torch.float32,
          flux_depth: tuple[int, int, int] = FLUX_DEPTH) -> SDComponents:
    """Family-shaped random components: full-size denoiser and text towers created in `dtype` (no float32 copy on
    the way, so peak RSS is that of the dtype), a small float32 VAE with the family's latent layout."""
    unet_config, towers = SHAPES[family]
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        parts = [build_tower(i, *tower) for i, tower in enumerate(towers)]
        if family == "flux":
            denoiser, t5, t5_tokenizer = build_flux(resolution, flux_depth)
            parts.append((t5, t5_tokenizer))
        else:
            denoiser = UNet2DConditionModel(sample_size=resolution // 8, **unet_config)
    finally:
        torch.set_default_dtype(default)
    flux = family == "flux"
    vae = AutoencoderKL(block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=16 if flux else 4,
                        norm_num_groups=32, sample_size=resolution, scaling_factor=0.3611 if flux else 0.18215,
                        shift_factor=0.1159 if flux else None)
    for m in (denoiser, vae, *(t for t, _ in parts)):
        m.requires_grad_(False).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096) if flux else None
    (text, tokenizer), *second = parts
    return SDComponents(denoiser, vae, text, tokenizer, scheduler or sd_noise_scheduler(), source=f"random-{family}",
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
    """Mask extraction vs one denoiser forward (batch 1), on a model of its own in `dtype`."""
    comps = build(args.family, args.resolution, dtype, args.flux_depth).to(device)
    family = family_of(comps)
    print(f"denoiser parameters: {sum(p.numel() for p in comps.denoiser.parameters()) / 1e6:.0f} M; text towers "
          f"{sum(p.numel() for m in comps.text_modules for p in m.parameters()) / 1e6:.0f} M")
    ConceptTokens.add(comps, concepts)
    latents = torch.randn(1, comps.vae.config.latent_channels, args.resolution // 8, args.resolution // 8,
                          device=device, dtype=dtype)
    emb = encode_prompts(comps, [concepts_prompt(["<c0>", "<c1>"])], latents)
    noisy, t = family.noised(comps, latents, torch.randn_like(latents), 100)

    def forward():
        with torch.no_grad():
            family.predict(comps, noisy, t, emb)

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
    print(f"| one denoiser forward (batch 1) | {t_fwd:.2f} | 1.00 | {m_fwd} |")
    print(f"| mask extraction | {t_mask:.2f} | {t_mask / t_fwd:.2f} | {m_mask} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd1", choices=list(SHAPES))
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--flux-depth", default=",".join(map(str, FLUX_DEPTH)),
                    help="flux: double-stream blocks, single-stream blocks, T5 layers (Flux.1: 19,38,24)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median reported)")
    ap.add_argument("--precisions", default="fp32",
                    help="comma list of fp32, bf16, fp16, fp8, bf16+gc, fp8+gc: the frozen weights' dtype (LoRA "
                         "and concept rows learn in fp32; fp8 computes in bf16), gc = gradient checkpointing")
    ap.add_argument("--preview-every", type=int, default=100,
                    help="the training-preview interval whose cost is reported (0: not measured)")
    args = ap.parse_args()
    args.flux_depth = tuple(int(x) for x in args.flux_depth.split(","))
    device = resolve_device(args.device)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    depth = f" (depth {args.flux_depth})" if args.family == "flux" else ""
    print(f"device: {device} ({machine_description(device)}); {args.family}-shaped random model{depth}, "
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
        comps_v = build(args.family, args.resolution, dtype, args.flux_depth)
        comps_v = (to_float8(comps_v) if precision == "fp8" else comps_v).to(device)
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

        # plain LoRA fine-tuning step on the same denoiser + LoRA: batch 2, MSE, fused attention, frozen text
        family = family_of(comps_v)
        params = [p for n, p in comps_v.denoiser.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=1e-4)
        lat = torch.randn(2, comps_v.vae.config.latent_channels, args.resolution // 8, args.resolution // 8,
                          device=device, dtype=dtype)
        with torch.no_grad():
            text = encode_prompts(comps_v, [concepts_prompt(["<c0>", "<c1>"]), opts.class_prompt], lat)
        generator = torch.Generator().manual_seed(0)

        def plain_step():
            noisy, ts, target = family.training_sample(comps_v, lat, generator)
            pred = family.predict(comps_v, noisy, ts, text)
            F.mse_loss(pred.float(), target.float()).backward()
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
