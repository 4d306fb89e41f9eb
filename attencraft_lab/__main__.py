"""`python -m attencraft_lab`: the demo on the embedded default (the shipped toy model and the bundled toy
scene, measured) and a random tiny model for smoke runs."""

from __future__ import annotations

import argparse

from attencraft_core.api import ProgressBars, run_command

from .demo import run_toy_demo
from .tiny_models import build_tiny_components, save_components


def cmd_demo(args) -> int:
    with ProgressBars(args.quiet) as bars:
        report = run_toy_demo(args.out, steps=args.steps, images_per_prompt=args.images, seed=args.seed,
                              model_dir=args.model, log=bars.log, progress=bars)
    fidelity = ", ".join(f"{c['placeholder']} {c['fidelity']}" for c in report["per_concept"])
    print(f"mask IoU {report['mask_iou']}; fidelity {fidelity}; joint {report['joint_fidelity']} "
          f"({report['seconds']} s). Contact sheet and report.json in {args.out}")
    return 0


def cmd_make_tiny_model(args) -> int:
    out = save_components(build_tiny_components(seed=args.seed), args.out)
    print(f"wrote a random tiny SD-style model to {out} (for smoke runs; its masks mean nothing)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m attencraft_lab",
                                     description="The measuring world of AttenCraft: the toy demo, test models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the whole job on the shipped toy model and the bundled scene, measured",
                       description="Extract masks of the bundled toy scene (a cyan star and a green heart, "
                                   "appearances the toy never saw), train 800 steps, generate each concept alone, "
                                   "together and beside a new object. Writes contact_sheet.png and report.json "
                                   "(mask IoU, judge-based fidelity, leakage, joint and context fidelity).")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--model", default=None, help="another export of the toy model (default: the shipped one)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 800)")
    p.add_argument("--images", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines; results and errors only")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("make-tiny-model", help="write a random tiny SD-style model folder (smoke runs)",
                       description="Write a tiny randomly initialised SD-style diffusers folder. It runs every "
                                   "command in seconds; its attention is random, so its masks mean nothing.")
    p.add_argument("out", help="folder to write")
    p.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    p.set_defaults(func=cmd_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    return run_command(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
