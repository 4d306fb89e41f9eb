"""The arithmetic of AttenCraft's mask initialization, on attention maps already recorded.

Pure tensor functions, so each step can be tested on constructed maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import AttenCraftError

EPS = 1e-8
AMBIGUITY_ADVICE = ("Try another --seed or --timestep range, a lower --threshold, or a more distinctive initializer "
                    "word for each concept (e.g. \"tabby cat\" rather than \"animal\").")


def minmax(x: torch.Tensor, dims: tuple[int, ...] | None = None) -> torch.Tensor:
    """Scale to [0, 1] over `dims` (all dims if None); a constant input becomes zeros."""
    dims = tuple(range(x.ndim)) if dims is None else dims
    low = x.amin(dim=dims, keepdim=True)
    high = x.amax(dim=dims, keepdim=True)
    return (x - low) / (high - low).clamp_min(EPS)


def token_maps(cross: torch.Tensor, token_idx: list[int], cross_hw: tuple[int, int], out_hw: tuple[int, int],
               square: bool = True) -> torch.Tensor:
    """[K, *out_hw]: each token's cross-attention map, bicubic-upsampled, (squared), min-max normalised.

    `cross` is [queries, tokens] for one image (queries = cross_hw pixels).
    """
    maps = cross[:, token_idx].T.reshape(len(token_idx), 1, *cross_hw)
    maps = F.interpolate(maps, size=out_hw, mode="bicubic", align_corners=False)[:, 0]
    if square:
        maps = maps ** 2
    return minmax(maps, dims=(1, 2))


def derived_background(maps: torch.Tensor, level: float | None = None) -> torch.Tensor:
    """The background map [h, w] of a model without a start token (T5), from the concept maps [N, h, w] (min-max
    normalised): 1 - the largest concept map, min-max normalised (level None: high where no concept attends), or
    a constant `level` (a threshold every concept's map must pass)."""
    if level is not None:
        return torch.full_like(maps[0], level)
    return minmax(1 - maps.amax(dim=0))


def affinity(self_attn: torch.Tensor, power: int = 4) -> torch.Tensor:
    """Self-attention [Q, Q] min-max normalised, raised to a matrix power, min-max normalised again."""
    a = minmax(self_attn.float())
    return minmax(torch.linalg.matrix_power(a, power)) if power > 1 else a


def propagate(aff: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """Each map [K, h, w] spread through the affinity (matrix times flattened map), min-max normalised."""
    flat = maps.flatten(1) @ aff.T
    return minmax(flat.view_as(maps), dims=(1, 2))


def margin_labels(maps: torch.Tensor, tau: float) -> torch.Tensor:
    """Label per pixel: k where maps[k] beats every other map by more than tau, else -1. maps is [K, h, w]."""
    top2 = maps.topk(2, dim=0)
    winner = top2.indices[0]
    margin = top2.values[0] - top2.values[1]
    return torch.where(margin > tau, winner, torch.full_like(winner, -1))


@dataclass
class MaskAssignment:
    """Which region (class index in the maps, 1..N; 0 is background) each concept received."""

    region_of_concept: list[int]
    attention_in_region: torch.Tensor  # [regions N, tokens N]: mean token attention inside each region


def assign_regions(labels: torch.Tensor, token_attention: torch.Tensor, names: list[str]) -> MaskAssignment:
    """Give each concept region to the token with the largest mean attention inside it.

    labels: [h, w] from margin_labels over (background, concept 1..N) maps. token_attention: [N, h, w].
    Raises AttenCraftError when a concept gets no region or two regions go to the same token.
    """
    n = token_attention.shape[0]
    sizes = [(labels == k + 1).sum().item() for k in range(n)]
    empty = [names[k] for k in range(n) if sizes[k] == 0]
    if empty:
        raise AttenCraftError(
            f"No pixel was confidently given to {', '.join(empty)}: the attention maps do not separate the "
            f"concepts in this image. {AMBIGUITY_ADVICE}")
    means = torch.stack([token_attention[:, labels == k + 1].mean(dim=1) for k in range(n)])
    owner = means.argmax(dim=1).tolist()
    if len(set(owner)) != n:
        taken = {}
        for region, token in enumerate(owner):
            taken.setdefault(token, []).append(names[region])
        clash = [f"{names[t]} attends most to the regions of {' and '.join(r)}" for t, r in taken.items()
                 if len(r) > 1]
        missing = [names[t] for t in range(n) if t not in taken]
        raise AttenCraftError(
            f"Ambiguous masks: {'; '.join(clash)}, so {', '.join(missing)} would get no region. {AMBIGUITY_ADVICE}")
    region_of_concept = [0] * n
    for region, token in enumerate(owner):
        region_of_concept[token] = region + 1
    return MaskAssignment(region_of_concept, means)


def assignment_confidence(assignment: MaskAssignment) -> tuple[torch.Tensor, list[bool]]:
    """Per concept: (own token's mean attention in its region minus the best other token's there, whether that
    region is where its token attends most of all regions). A small margin or False: the masks may be swapped
    or split; check the overlay."""
    means = assignment.attention_in_region  # [regions, tokens]
    margins, strongest = [], []
    for k, region in enumerate(assignment.region_of_concept):
        row = means[region - 1]
        others = torch.cat([row[:k], row[k + 1:]])
        margins.append(float(row[k] - others.max()) if len(others) else float(row[k]))
        strongest.append(int(means[:, k].argmax()) == region - 1)
    return torch.tensor(margins), strongest


def attention_scores(token_attention: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[N]: mean normalised cross-attention of each concept's token inside its own mask."""
    masks = masks.float()
    return (token_attention * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp_min(1.0)
