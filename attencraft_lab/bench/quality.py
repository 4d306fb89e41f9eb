"""Quality benchmark on the toy world (prints markdown tables; not a test).

1. Mask quality: mean IoU of extracted masks against the exact masks, on fixed held-out 2- and 3-object scenes
   (a refused scene counts as IoU 0), with the paper's settings and at twice the resolution. Each concept's
   initializer word is its colour: the toy model binds colour words to places; with shape words most
   extractions are refused (9 of 10 held-out scenes at 128 px, after the GPU rounds; docs/toy_model.md).
2. Learned concepts: for several held-out two-object scenes, train, then judge images of "a photo of <ci>"
   (fidelity: shows concept i; leakage: also shows the other concept's shape or colour), of the prompt with both
   (joint fidelity), and the gap between the two concepts' fidelities at evaluation points during training.
3. Ablation: the same per sampling policy (adaptive, uniform, union), without the masked loss's margin (the
   paper's masks as extracted), and without the masked / attention loss; on request, with the reference
   code's half-masked loss or with prior preservation (off in the toy's settings; 4 or 32 class images).

    python -m attencraft_lab.bench.quality                       # the configuration recorded in docs/quality.md
    python -m attencraft_lab.bench.quality --mask-scenes 5 --train-scenes 1 --steps 20 --images 2   # a quick look
    python -m attencraft_lab.bench.quality --first-train-scene 4 --mask-scenes 0 --variants full     # policies, held-out scenes
    python -m attencraft_lab.bench.quality --mask-scenes 0 --policies adaptive --variants full --train-scenes 8 --seeds 0,1
    python -m attencraft_lab.bench.quality --mask-scenes 0 --policies adaptive --variants full --processes 1,2   # N GPUs

`--processes N` trains as N processes do (accelerate launch / torchrun: each step averages N draws, computed here
on one process with the same result) for steps / N steps, the same number of draws in all.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np

from attencraft_core.api import (AttenCraftError, MaskOptions, Processes, Trainer, decode_latents, encode_images,
                                  extract_masks, generate, image_to_tensor, load_components, parse_concepts,
                                  set_lora_strength, tensor_to_image)

from ..machine import machine_description
from ..toy.evaluate import (context_object, evaluation_prompts, judge_generations, judge_joint_image, mask_iou,
                            matches)
from ..toy.judge import analyse
from ..toy.model import concept_training_options, toy_model_dir
from ..toy.world import SIZE, SceneObject, random_scene

VARIANTS = {"full": {}, "no mask margin": {"loss_mask_margin": 0}, "no masked loss": {"masked_loss": False},
            "no attention loss": {"attention_weight": 0.0},
            "half-masked loss": {"unmasked_term": True},  # the reference code's loss; not in the defaults
            "prior preservation": {"prior_weight": 1.0},  # the toy default once; not in the defaults
            "prior with 32 class images": {"prior_weight": 1.0, "num_class_images": 32},  # not in the defaults
            "LoRA rank 4": {"rank": 4},  # not in the defaults
            "2x learning rate": {"lr": 1e-3}}  # the linear scaling rule for 2 processes; not in the defaults


MASK_SETTINGS = {"paper defaults, 64 px": MaskOptions(seed=0),
                 "image upscaled to 128 px": MaskOptions(seed=0, resolution=128)}


def concept_words(scene) -> str:
    return ", ".join(o.colour for o in scene.objects)


PROMPT_PAIRS = (("red", "circle"), ("blue", "square"), ("yellow", "star"), ("green", "triangle"),
                ("purple", "ring"), ("orange", "diamond"), ("pink", "heart"), ("cyan", "cross"))


def base_model_fidelity(model: Path, images: int) -> dict:
    """How often the base model draws what "a photo of a <colour> <shape>" asks (judged), and how often it draws
    both objects of "a photo of a <colour> <shape> and a <colour> <shape>" (pretraining appearances each): the
    base model's own ceiling for the joint and context fidelity of learned concepts."""
    comps = load_components(model)
    colour = shape = both = total = 0
    for c, s in PROMPT_PAIRS:
        for image in generate(comps, [f"a photo of a {c} {s}"] * images, seed=0, steps=25, cfg=5.0):
            found = analyse(image)
            total += 1
            colour += any(d.colour == c for d in found)
            shape += any(d.shape == s for d in found)
            both += any(d.colour == c and d.shape == s for d in found)
    pairs = [(PROMPT_PAIRS[i], PROMPT_PAIRS[(i + 3) % len(PROMPT_PAIRS)]) for i in range(len(PROMPT_PAIRS))]
    two = []
    for pair in pairs:
        objects = [SceneObject(s, c, "solid", SIZE / 2, SIZE / 2, SIZE / 3) for c, s in pair]
        prompt = "a photo of " + " and ".join(f"a {o.words()}" for o in objects)
        two += [judge_joint_image(image, objects) for image in generate(comps, [prompt] * images, seed=0, steps=25,
                                                                          cfg=5.0)]
    return {"images": total, "colour": colour / total, "shape": shape / total, "both": both / total,
            "two_objects": float(np.mean(two))}


def training_scene(i: int):
    """Training scene i of the benchmark: two objects, every appearance held out of pretraining."""
    return random_scene(random.Random(5000 + i), count=2, held_out=True)


def vae_round_trip(model: Path, scene_ids: range) -> dict:
    """The judge on the VAE's encode-decode of the training scenes: what the latent space keeps of each object.

    Training fits the latents, so an appearance the round trip loses cannot be generated, whatever the method.
    """
    comps = load_components(model)
    objects = kept = with_pattern = 0
    for i in scene_ids:
        scene = training_scene(i)
        latents = encode_images(comps, image_to_tensor(scene.image, comps.native_resolution))
        found = analyse(tensor_to_image(decode_latents(comps, latents)))
        for obj in scene.objects:
            objects += 1
            kept += any(matches(d, obj) for d in found)
            with_pattern += any(matches(d, obj, with_pattern=True) for d in found)
    return {"objects": objects, "shape_and_colour": kept, "with_pattern": with_pattern}


def mask_quality(model: Path, scenes: int, count: int, setting: str) -> dict:
    comps = load_components(model)
    ious, extracted, failures = [], [], 0
    for i in range(scenes):
        scene = random_scene(random.Random(1000 * count + i), count=count, held_out=True)
        try:
            result = extract_masks(comps, scene.image, parse_concepts(concept_words(scene)), MASK_SETTINGS[setting])
            extracted += [mask_iou(m.numpy(), t) for m, t in zip(result.masks, scene.masks)]
            ious += extracted[-count:]
        except AttenCraftError:
            failures += 1
            ious += [0.0] * count
    return {"setting": setting, "objects": count, "scenes": scenes, "mean_iou": float(np.mean(ious)),
            "mean_iou_extracted": float(np.mean(extracted)) if extracted else 0.0, "failed_scenes": failures}


def evaluate(comps, scene, placeholders, images: int, seed: int, with_context: bool = True) -> dict:
    """`judge_generations` on `images` new images per evaluation prompt; `with_context` adds the concept beside a
    pretraining object (what prior preservation is meant to keep)."""
    ctx = context_object(scene.objects) if with_context else None
    generated = {prompt: generate(comps, [prompt] * images, seed=seed, steps=25, cfg=5.0)
                 for prompt in evaluation_prompts(placeholders, ctx)}
    return judge_generations(scene.objects, placeholders, generated, ctx)


def train_and_judge(model: Path, scene, policy: str, variant: dict, steps: int, images: int, eval_every: int,
                    work: Path, seed: int = 0, strengths: tuple[float, ...] = (1.0,),
                    processes: int = 1) -> dict[float, dict]:
    """Train on `scene` (as `processes` processes would), then judge the final concepts at each LoRA strength:
    {strength: metrics and gaps}."""
    shutil.rmtree(work, ignore_errors=True)  # a fresh run: never the finished checkpoint of another model or seed
    comps = load_components(model)
    concepts = parse_concepts(concept_words(scene))
    placeholders = [c.placeholder for c in concepts]
    gaps = []

    def callback(step, total, record, ratios):
        if step % eval_every == 0 and step < total:
            # the gap needs fidelity only: no context images at the evaluation points
            ev = evaluate(comps, scene, placeholders, images, seed=500, with_context=False)
            gaps.append((step, abs(ev["fidelity"][0] - ev["fidelity"][1])))

    opts = concept_training_options(steps, policy=policy, seed=seed, **variant)
    trainer = Trainer(comps, scene.image, concepts, work, opts, cache_dir=work / "cache", callback=callback,
                      log=lambda s: None, processes=Processes.simulated(processes) if processes > 1 else None)
    trainer.run("bench")
    finals = {}
    for strength in strengths:
        set_lora_strength(comps.denoiser, strength)
        final = evaluate(comps, scene, placeholders, images, seed=500)
        finals[strength] = {**final, "gaps": gaps + [(steps, abs(final["fidelity"][0] - final["fidelity"][1]))]}
    return finals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(toy_model_dir()))
    ap.add_argument("--mask-scenes", type=int, default=20, help="0 skips the mask table")
    ap.add_argument("--train-scenes", type=int, default=4)
    ap.add_argument("--first-train-scene", type=int, default=0,
                    help="index of the first training scene (4: the held-out check in docs/quality.md)")
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--images", type=int, default=8, help="images per prompt and evaluation")
    ap.add_argument("--eval-every", type=int, default=400)
    ap.add_argument("--seeds", default="0",
                    help="training seeds, comma-separated (noise, timesteps, concept draws; the masks keep theirs): "
                         "each scene is trained once per seed and a row averages every run; one run per scene "
                         "moves a four-scene row by about 0.08 (docs/quality.md)")
    ap.add_argument("--policies", default="adaptive,uniform,union")
    ap.add_argument("--variants", default="full,no mask margin,no masked loss,no attention loss")
    ap.add_argument("--processes", default="1",
                    help="comma-separated process counts N; each trains steps / N steps (the same draws)")
    ap.add_argument("--strengths", default="1",
                    help="LoRA strengths to judge the trained concepts at, comma-separated (the Apply Concepts node's "
                         "strength; the gap during training is measured at 1)")
    ap.add_argument("--work", default="out/bench-quality")
    ap.add_argument("--json", default=None, help="also write the raw results here")
    args = ap.parse_args()
    started = time.time()
    model = Path(args.model)
    machine = machine_description()
    print(f"machine: {machine}\n")
    base = base_model_fidelity(model, 4)
    print(f"base model, 8 colour-shape prompts x 4 images: colour {base['colour']:.2f}, shape {base['shape']:.2f}, "
          f"both {base['both']:.2f}; both objects of 8 two-object prompts x 4 images: "
          f"{base['two_objects']:.2f}\n")
    scene_ids = range(args.first_train_scene, args.first_train_scene + args.train_scenes)
    trip = vae_round_trip(model, scene_ids)
    print(f"VAE encode-decode of the {args.train_scenes} training scenes, objects the judge still finds: shape and "
          f"colour {trip['shape_and_colour']}/{trip['objects']}, with their pattern {trip['with_pattern']}/"
          f"{trip['objects']}\n")
    results = {"machine": machine, "base": base, "vae_round_trip": trip, "training": [],
               "masks": [mask_quality(model, args.mask_scenes, n, s) for s in MASK_SETTINGS for n in (2, 3)
                         if args.mask_scenes > 0]}
    if results["masks"]:
        print("| mask settings | objects | scenes | mean mask IoU | refused scenes | mean IoU of the others |")
        print("| --- | --- | --- | --- | --- | --- |")
    for r in results["masks"]:
        print(f"| {r['setting']} | {r['objects']} | {r['scenes']} | {r['mean_iou']:.3f} | {r['failed_scenes']} | "
              f"{r['mean_iou_extracted']:.3f} |")

    seeds = [int(x) for x in args.seeds.split(",")]
    strengths = tuple(float(x) for x in args.strengths.split(","))
    rows = []
    counts = [int(x) for x in args.processes.split(",")]
    for policy, name, processes in itertools.product(args.policies.split(",") if args.train_scenes > 0 else [],
                                                     args.variants.split(","), counts):
        if policy != "adaptive" and name != "full":
            continue  # the loss ablations run with the default policy
        steps = args.steps // processes
        label = name if counts == [1] else f"{name}, {processes} processes x {steps} steps"
        runs_by_strength, refused = {s: [] for s in strengths}, 0
        for i, seed in itertools.product(scene_ids, seeds):
            scene = training_scene(i)
            try:
                finals = train_and_judge(model, scene, policy, VARIANTS[name], steps, args.images,
                                         args.eval_every,
                                         Path(args.work) / f"{policy}-{name}-{processes}-{i}-seed{seed}".replace(
                                             " ", "_"), seed, strengths, processes)
            except AttenCraftError as exc:  # the model's attention did not separate this scene's objects
                refused += 1
                print(f"{policy}/{label} scene {i} seed {seed}: {str(exc).split('.')[0]}")
                continue
            for strength, run in finals.items():
                runs_by_strength[strength].append({"scene": i, "seed": seed, **run})
                at = f" strength {strength:g}" if len(strengths) > 1 else ""
                print(f"{policy}/{label} scene {i} seed {seed}{at}: fidelity {run['fidelity']}, leakage "
                      f"{run['leakage']}, joint {run['joint']}, context {run['context']} "
                      f"({time.time() - started:.0f} s)", flush=True)
        for strength, runs in runs_by_strength.items():
            if not runs:
                continue
            row = {"policy": policy, "variant": label, "strength": strength, "trained_runs": len(runs),
                   "refused": refused,
                   "fidelity": float(np.mean([np.mean(r["fidelity"]) for r in runs])),
                   "leakage": float(np.mean([np.mean(r["leakage"]) for r in runs])),
                   "joint": float(np.mean([r["joint"] for r in runs])),
                   "context": float(np.mean([np.mean(r["context"]) for r in runs])),
                   "gap_by_step": {s: float(np.mean([dict(r["gaps"])[s] for r in runs]))
                                   for s, _ in runs[0]["gaps"]}}
            rows.append(row)
            results["training"].append({**row, "runs": runs})
    if rows:
        print(f"\n{args.train_scenes} held-out two-object scenes from scene {args.first_train_scene}, training seeds "
              f"{args.seeds}, {args.steps} steps, {args.images} images per prompt\n")
        by_strength = len(strengths) > 1  # the column only when several strengths were judged
        print("| policy | variant |" + (" LoRA strength |" if by_strength else "") + " runs | concept fidelity | "
              "leakage | joint fidelity | context fidelity | fidelity gap by step |")
        print("| --- " * (8 + by_strength) + "|")
    for r in rows:
        gaps = ", ".join(f"{s}: {g:.2f}" for s, g in r["gap_by_step"].items())
        strength = f" {r['strength']:g} |" if by_strength else ""
        print(f"| {r['policy']} | {r['variant']} |{strength} {r['trained_runs']} | {r['fidelity']:.3f} | "
              f"{r['leakage']:.3f} | {r['joint']:.3f} | {r['context']:.3f} | {gaps} |")
    print(f"\n({time.time() - started:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
