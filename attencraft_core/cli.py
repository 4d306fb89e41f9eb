"""Command line: `python -m attencraft_core <command> --help` documents every option."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch


from .concept_file import ConceptSet
from .concepts import parse_concepts
from .demo import check_demo_settings, run_demo
from .devices import PRECISIONS, resolve_device, resolve_dtype
from .distributed import Processes, launched_rank
from .errors import AttenCraftError
from .generation import check_settings, generate
from .images import load_image, load_mask
from .masks import extract_masks
from .model_loading import load_components
from .options import add_arguments, from_arguments
from .outputs import ensure_out_dir, image_format, safe_name, save_image, save_mask_outputs
from .progress import ProgressBars
from .settings import MaskOptions, TrainOptions
from .training import Trainer

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def _add_model_args(p: argparse.ArgumentParser) -> None:
    _add_quiet_arg(p)
    p.add_argument("--model", required=True,
                   help="local diffusers folder of an SD 1.x, 2.x or SDXL model (unet/, vae/, text_encoder/, "
                        "tokenizer/, scheduler/; SDXL also text_encoder_2/, tokenizer_2/); nothing is downloaded")
    p.add_argument("--device", default="auto",
                   help="torch device, e.g. cpu or cuda:0; auto picks the available accelerator (default auto)")
    p.add_argument("--precision", default="auto", choices=list(PRECISIONS),
                   help="dtype of the model's frozen weights on an accelerator (auto: bf16 where supported, else fp16); "
                        "trained weights are always float32, and the CPU always uses fp32 (default auto)")


def folder_argument(text: str) -> Path:
    """An --out value: not empty (that would write into the current folder unasked), `~` expanded."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: name the folder (or file) to write to, e.g. --out results")
    return Path(text).expanduser()


def image_argument(text: str) -> Path:
    """generate's --out: a file name ending in .png, .jpg, .jpeg or .webp (none: .png is added)."""
    path = folder_argument(text)
    if not path.suffix:
        return path.with_suffix(".png")
    try:
        image_format(path)
    except AttenCraftError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return path


def _add_job_args(p: argparse.ArgumentParser) -> None:
    """--image, --concepts and --out: what masks, train and demo work on."""
    p.add_argument("--image", required=True, help="the image showing all concepts (PNG/JPEG/WebP, any mode)")
    p.add_argument("--concepts", required=True,
                   help='comma-separated word per concept, at least two, e.g. "cat,dog"; each word also '
                        "initialises its placeholder token <c0>, <c1>, ...")
    p.add_argument("--out", required=True, type=folder_argument, help="output folder (created if missing)")


def _add_quiet_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress bars or log lines; results and errors only")


def _load(args, progress, device: torch.device | None = None):
    """Load --model on --device (or `device`), its frozen weights in the dtype --precision names."""
    device = device or resolve_device(args.device)
    return load_components(args.model, device, resolve_dtype(args.precision, device), progress=progress)


def cmd_masks(args) -> int:
    concepts = parse_concepts(args.concepts)
    image, notes = load_image(args.image)
    opts = from_arguments(MaskOptions, args, prefix="mask_")
    opts.check()
    out = ensure_out_dir(args.out)
    with ProgressBars(args.quiet) as bars:
        comps = _load(args, bars)
        result = extract_masks(comps, image, concepts, opts, progress=bars)
    result.notes[:0] = notes
    summary = save_mask_outputs(out, image, result)
    for note in result.notes:
        print(f"note: {note}")
    for entry in summary["concepts"]:
        confidence = entry["confidence"]
        if confidence["level"] == "low":
            print(f"warning: the mask of {entry['word']!r} has low confidence (a small region, or not where its "
                  "token attends most): check overlay.png; another --seed or a more distinctive word may help")
        print(f"{entry['placeholder']} {entry['word']}: score {entry['score']:.3f}, "
              f"{100 * entry['mask_fraction']:.1f}% of the image, confidence {confidence['level']} "
              f"(margin {confidence['attention_margin']:.2f}) -> {out / entry['mask_file']}")
    print(f"overlay: {out / 'overlay.png'}; timestep {result.timestep}")
    return 0


def mask_paths(values: list[str]) -> list[str]:
    """--masks values: each an existing path (commas allowed in it) or a comma-separated list of paths."""
    paths = []
    for value in values:
        paths += [value] if Path(value).exists() else [m.strip() for m in value.split(",") if m.strip()]
    return paths


def class_image_files(folder: str) -> list[Path]:
    if not Path(folder).is_dir():
        raise AttenCraftError(f"--class-images {folder} is not a folder: give a folder of PNG/JPEG/WebP images, "
                              "or leave it out to generate them.")
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise AttenCraftError(f"No PNG/JPEG/WebP images in --class-images {folder}.")
    return files


def cmd_train(args) -> int:
    concepts = parse_concepts(args.concepts)
    image, notes = load_image(args.image)
    user_masks = [load_mask(p) for p in mask_paths(args.masks)] if args.masks else None
    class_imgs = [load_image(p)[0] for p in class_image_files(args.class_images)] if args.class_images else None
    opts = from_arguments(TrainOptions, args, masks=from_arguments(MaskOptions, args, prefix="mask_"))
    opts.check()
    out = ensure_out_dir(args.out)
    device = resolve_device(args.device)
    processes = Processes.from_environment(device)  # several under accelerate launch / torchrun
    with ProgressBars(args.quiet or not processes.is_main) as bars:  # the main process reports for all
        comps = _load(args, bars, processes.device(device))
        for note in notes:
            bars.log(f"note: {note}")
        if processes.count > 1:
            bars.log(f"{processes.count} processes: each step averages {processes.count} draws")
        trainer = Trainer(comps, image, concepts, out, opts, user_masks=user_masks, class_images=class_imgs,
                          cache_dir=args.cache_dir, log=bars.log, progress=bars, processes=processes)
        if args.resume:
            trainer.resume()
        result = trainer.run(safe_name(args.name), replace=args.overwrite)
    if not processes.is_main:
        return 0
    print(f"final loss {result.history[-1]['loss']:.4f}" if result.history else "no step was run")
    for kind, path in result.files.items():
        print(f"{kind}: {path}")
    return 0


def cmd_generate(args) -> int:
    check_settings(args.count, args.seed, args.steps, args.cfg or 0, args.resolution, args.strength)
    concept_set = ConceptSet.load(args.concepts)
    concept_set.check_prompt(args.prompt)
    out = args.out
    ensure_out_dir(out.parent)
    with ProgressBars(args.quiet) as bars:
        comps = _load(args, bars)
        concept_set.apply(comps, args.strength)
        images = generate(comps, [args.prompt] * args.count, seed=args.seed, steps=args.steps, cfg=args.cfg,
                          negative_prompt=args.negative, resolution=args.resolution, progress=bars)
    for i, image in enumerate(images):
        path = out if args.count == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        save_image(path, image)
        print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    check_demo_settings(args.images, args.seed)
    opts = TrainOptions(steps=args.steps, seed=args.seed)
    opts.check()
    image, notes = load_image(args.image)
    with ProgressBars(args.quiet) as bars:
        for note in notes:
            bars.log(f"note: {note}")
        comps = _load(args, bars)
        result = run_demo(args.out, comps, image, args.concepts, opts, images_per_prompt=args.images,
                          seed=args.seed, log=bars.log, progress=bars)
    print(f"contact sheet: {Path(args.out) / 'contact_sheet.png'}; report: {Path(args.out) / 'report.json'} "
          f"({result.report['seconds']} s)")
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
    _add_job_args(p)
    add_arguments(p, MaskOptions, prefix="mask_")
    p.set_defaults(func=cmd_masks)

    p = sub.add_parser("train", help="learn the concepts of one image (LoRA + concept embeddings)",
                       description="Train concept embeddings and a LoRA with AttenCraft's masked and attention "
                                   "losses. Writes <name>.safetensors (concept set), <name>_lora_kohya.safetensors "
                                   "(Flux: <name>_lora_diffusers.safetensors), <name>_c<i>.safetensors (textual inversion), masks, <name>_loss.png, "
                                   "<name>_train.json and checkpoint.safetensors to --out.")
    _add_model_args(p)
    _add_job_args(p)
    p.add_argument("--masks", nargs="+", default=None, metavar="MASK",
                   help="your mask images, one per concept in order (white = concept, any size), as separate "
                        "paths or one comma-separated list; skips extraction")
    p.add_argument("--name", default="attencraft", help="base name of the files written (default attencraft)")
    p.add_argument("--class-images", default=None,
                   help="folder of class images; default: generate them with the base model once and cache them")
    p.add_argument("--cache-dir", default=None, help="cache of class images (default $ATTENCRAFT_CACHE or "
                                                     "~/.cache/attencraft)")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint.safetensors in --out")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the files of another run found in --out (without it such a folder is refused)")
    add_arguments(p, TrainOptions)
    add_arguments(p, MaskOptions, prefix="mask_", skip=("resolution",), flags={"seed": "--mask-seed"})
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate images with a trained concept set",
                       description="Load a concept set onto the base model and generate; use <c0>, <c1>, ... in "
                                   "the prompt, e.g. \"a photo of <c0> on the beach\".")
    _add_model_args(p)
    p.add_argument("--concepts", required=True, help="the <name>.safetensors concept set written by train")
    p.add_argument("--prompt", required=True, help='prompt using the placeholders, e.g. "a photo of <c1> on the beach"')
    p.add_argument("--out", required=True, type=image_argument,
                   help="output image path, .png (default), .jpg or .webp (with --count > 1, _<i> is added)")
    p.add_argument("--negative", default="", help="negative prompt (default empty)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0); image i uses seed + i")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps (default 30)")
    p.add_argument("--cfg", type=float, default=None,
                   help="guidance scale (default 7.5; Flux 3.5: dev's embedded guidance, true classifier-free "
                        "guidance for a Flux model without it)")
    p.add_argument("--count", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--resolution", type=int, default=None, help="square side in px (default: the model's own)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="LoRA strength, as on the Apply Concepts node (default 1; the learned tokens stay as learned)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the whole job on one model and image: masks, training, generations",
                       description="Extract masks, train, and generate each concept alone, together and in a new "
                                   "context; writes contact_sheet.png and report.json to --out, the trained set "
                                   "to --out/run. (`python -m attencraft_lab demo` runs it on the shipped toy "
                                   "model and measures it.)")
    _add_model_args(p)
    _add_job_args(p)
    p.add_argument("--steps", type=int, default=TrainOptions.steps, help=f"training steps (default "
                                                                           f"{TrainOptions.steps})")
    p.add_argument("--images", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    p.set_defaults(func=cmd_demo)
    return parser


class HideTorchvisionNotice(logging.Filter):
    """transformers says, when a pipeline is imported, that its image processors fall back to PIL without
    torchvision: nothing the pack uses, and not what a user should read first."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command (its `func`): a user-fixable error is one `error:` line and status 2, Ctrl-C 130.
    With `quiet`, the libraries' own loading bars are off too. Shared with `python -m attencraft_lab`."""
    logging.getLogger("transformers.utils.import_utils").addFilter(HideTorchvisionNotice())
    if launched_rank() > 0 and args.func is not cmd_train:
        return 0  # only training uses several processes; the main process runs any other command alone
    if getattr(args, "quiet", False) or launched_rank() > 0:  # the main process reports for all
        from diffusers.utils import logging as diffusers_logging  # on use (see lora.py)
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    try:
        return args.func(args)
    except AttenCraftError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return run_command(build_parser().parse_args(argv))
