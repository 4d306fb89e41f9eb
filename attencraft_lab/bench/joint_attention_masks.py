"""Which joint attention makes the best masks on a Flux-type model: mean mask IoU on held-out toy scenes per
double-stream block set, mask timestep range and derived-background rule (prints a markdown table; not a test).

    python -m attencraft_lab.bench.joint_attention_masks --model attencraft_lab/toy/dit_weights --scenes 10

Each concept's initializer word is its colour, as in bench/quality.py's mask table; a refused scene counts as
IoU 0; scene i uses mask seed i (so each scene draws its own timestep from the range). The rows vary one choice
at a time from the first row.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import replace

import numpy as np

from attencraft_core.api import AttenCraftError, MaskOptions, extract_masks, family_named, load_components, parse_concepts

from ..machine import machine_description
from ..toy.evaluate import mask_iou
from ..toy.world import random_scene
from .quality import concept_words


def mean_iou(comps, scenes: int, count: int, opts: MaskOptions) -> tuple[float, int]:
    ious, refused = [], 0
    for i in range(scenes):
        scene = random_scene(random.Random(1000 * count + i), count=count, held_out=True)
        try:  # a seed per scene: the timestep is drawn from each range anew
            result = extract_masks(comps, scene.image, parse_concepts(concept_words(scene)), replace(opts, seed=i))
            ious += [mask_iou(m.numpy(), t) for m, t in zip(result.masks, scene.masks)]
        except AttenCraftError:
            refused += 1
            ious += [0.0] * count
    return float(np.mean(ious)), refused


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a diffusers Flux folder (the DiT toy)")
    ap.add_argument("--scenes", type=int, default=10, help="held-out scenes per object count")
    ap.add_argument("--resolution", type=int, default=None, help="image side for the attention pass (default: "
                                                                  "the model's own)")
    args = ap.parse_args()
    comps = load_components(args.model)
    flux = family_named("flux")
    blocks = len([n for n in comps.denoiser.attn_processors if n.startswith("transformer_blocks.")])
    print(f"machine: {machine_description()}; {args.model}, {blocks} double-stream blocks, {args.scenes} held-out "
          "scenes per object count\n")
    later = list(range(blocks // 2, blocks))
    rows = [("the defaults: last quarter of the blocks, t in [0, 300), background 1 - max", None,
             (0, 300), None), ("all blocks", list(range(blocks)), (0, 300), None),
            (f"later half (blocks {later[0]}-{later[-1]})", later, (0, 300), None)]
    rows += [(f"block {b} only", [b], (0, 300), None) for b in range(blocks)]
    rows += [(f"t in [{lo}, {hi})", None, (lo, hi), None) for lo, hi in ((300, 600), (600, 900))]
    rows += [(f"background: every concept map below {level}", None, (0, 300), level) for level in (0.3, 0.5)]
    print("| reading | mean IoU, 2 objects | refused | mean IoU, 3 objects | refused |\n| --- | --- | --- | --- | --- |")
    for name, chosen, (t_min, t_max), level in rows:
        flux.mask_blocks, flux.background_level = chosen, level
        opts = MaskOptions(t_min=t_min, t_max=t_max, resolution=args.resolution)
        two, three = mean_iou(comps, args.scenes, 2, opts), mean_iou(comps, args.scenes, 3, opts)
        print(f"| {name} | {two[0]:.3f} | {two[1]} | {three[0]:.3f} | {three[1]} |", flush=True)


if __name__ == "__main__":
    main()
