"""Command line: `python -m attencraft_core <command> --help` documents every option."""

from __future__ import annotations

import argparse
import os
import sys

from .errors import AttenCraftError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="local diffusers folder of an SD 1.x/2.x style model (unet/, vae/, text_encoder/, "
                        "tokenizer/, scheduler/); nothing is downloaded")
    p.add_argument("--device", default="auto",
                   help="torch device, e.g. cpu or cuda:0; auto picks the available accelerator (default auto)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="weight precision on an accelerator; the CPU always uses fp32 (default fp32)")


def _add_mask_args(p: argparse.ArgumentParser) -> None:
    from .masks import MaskOptions

    d = MaskOptions()
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the timestep and noise (default {d.seed})")
    p.add_argument("--t-min", type=int, default=d.t_min, help=f"smallest timestep drawn (default {d.t_min})")
    p.add_argument("--t-max", type=int, default=d.t_max,
                   help=f"timesteps are drawn from [t-min, t-max) (default {d.t_max})")
    p.add_argument("--threshold", type=float, default=d.threshold,
                   help=f"margin tau by which a concept's map must beat every other map (default {d.threshold})")
    p.add_argument("--affinity-power", type=int, default=d.affinity_power,
                   help=f"matrix power of the self-attention affinity (default {d.affinity_power})")
    p.add_argument("--cross-factor", type=int, default=d.cross_factor,
                   help=f"cross-attention layers at latent/FACTOR are used (default {d.cross_factor}: 16x16 at 512 px)")
    p.add_argument("--self-factor", type=int, default=d.self_factor,
                   help=f"self-attention layers at latent/FACTOR are used (default {d.self_factor}: 32x32 at 512 px)")
    p.add_argument("--resolution", type=int, default=None,
                   help="square side in px the image is resized to (default: the model's own, 512 for SD 1.5)")


def _mask_options(args):
    from .masks import MaskOptions

    return MaskOptions(seed=args.seed, t_min=args.t_min, t_max=args.t_max, threshold=args.threshold,
                       affinity_power=args.affinity_power, cross_factor=args.cross_factor,
                       self_factor=args.self_factor, resolution=args.resolution)


def _load(args):
    from .devices import resolve_device, resolve_dtype
    from .model_loading import load_components

    device = resolve_device(args.device)
    return load_components(args.model, device, resolve_dtype(args.precision, device), progress=True)


def cmd_masks(args) -> int:
    from .concepts import parse_concepts
    from .images import load_image
    from .masks import extract_masks
    from .outputs import ensure_out_dir, save_mask_outputs

    concepts = parse_concepts(args.concepts)
    image, notes = load_image(args.image)
    opts = _mask_options(args)
    out = ensure_out_dir(args.out)
    comps = _load(args)
    result = extract_masks(comps, image, concepts, opts)
    result.notes[:0] = notes
    summary = save_mask_outputs(out, image, result)
    for note in result.notes:
        print(f"note: {note}")
    for entry in summary["concepts"]:
        print(f"{entry['placeholder']} {entry['word']}: score {entry['score']:.3f}, "
              f"{100 * entry['mask_fraction']:.1f}% of the image -> {out / entry['mask_file']}")
    print(f"overlay: {out / 'overlay.png'}; timestep {result.timestep}")
    return 0


def cmd_make_tiny_model(args) -> int:
    from .tiny_models import build_tiny_components, save_components

    out = save_components(build_tiny_components(seed=args.seed), args.out)
    print(f"wrote a random tiny SD-style model to {out} (for smoke runs; its masks mean nothing)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attencraft_core",
                                     description="AttenCraft: learn several concepts from one image.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("masks", help="find each concept in an image from the model's attention",
                       description="Extract one mask per concept from the diffusion model's own attention "
                                   "(one UNet pass, no user masks). Writes mask_<i>_<word>.png, overlay.png "
                                   "and masks.json (scores, timestep, notes) to --out.")
    _add_model_args(p)
    p.add_argument("--image", required=True, help="the image showing all concepts (PNG/JPEG/WebP, any mode)")
    p.add_argument("--concepts", required=True,
                   help='comma-separated word per concept, at least two, e.g. "cat,dog"; each word also '
                        "initialises its placeholder token <c0>, <c1>, ...")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    _add_mask_args(p)
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("make-tiny-model", help="write a random tiny SD-style model folder (smoke tests)",
                       description="Write a tiny randomly initialised SD-style diffusers folder. It runs every "
                                   "command in seconds; its attention is random, so its masks mean nothing.")
    p.add_argument("out", help="folder to write")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    p.set_defaults(func=cmd_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AttenCraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
