"""Mask initialization: where each concept is, from one denoiser pass on the noised image.

The background map is the start token's attention where the text encoder has one (CLIP); for a model without one
(Flux's T5) it is derived from the concepts' maps (mask_math.derived_background).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from . import mask_math
from .attention import AttentionStore, map_side
from .concept_tokens import ConceptTokens
from .concepts import Concept, concepts_prompt
from .devices import free_memory
from .encoding import encode_images, encode_prompts
from .errors import AttenCraftError
from .families import family_of
from .images import image_to_tensor
from .model_loading import SDComponents
from .progress import Progress, no_progress
from .settings import MaskOptions


# A region under this share of the attention grid is "low" confidence. On 261 masks of the toy world's held-out
# scenes (64 and 128 px) 9 of the 10 with IoU < 0.3 were flagged low; low masks average IoU 0.34, the others 0.78.
SMALL_REGION = 0.02


@dataclass
class MaskResult:
    """Masks at attention resolution and image size, per-concept maps and attention scores."""

    concepts: list[Concept]
    masks_lowres: torch.Tensor        # [N, h, w] bool, h = latent/2
    maps: torch.Tensor                # [N + 1, h, w] propagated maps, index 0 = background
    token_attention: torch.Tensor     # [N + 1, h, w] normalised cross-attention, index 0 = background
    scores: torch.Tensor              # [N] mean attention of each token inside its own mask
    timestep: int
    margins: torch.Tensor             # [N] own token's mean attention in its region minus the best other token's
    strongest: list[bool]             # [N] the region is where the concept's token attends most of all regions
    masks: torch.Tensor | None = None  # [N, H, W] bool at the user's image size
    notes: list[str] = field(default_factory=list)

    def confidence(self, k: int) -> dict:
        """How sure the attention is of concept k's mask. "low" (a region under SMALL_REGION of the attention
        grid, or not where the concept's token attends most): check the overlay, try another seed or word."""
        share, strongest = float(self.masks_lowres[k].float().mean()), bool(self.strongest[k])
        return {"attention_margin": round(float(self.margins[k]), 6), "strongest_in_own_region": strongest,
                "level": "high" if strongest and share >= SMALL_REGION else "low"}

    def summary(self) -> dict:
        """JSON-ready description (no tensors but the small per-concept numbers)."""
        return {
            "concepts": [{"word": c.word, "placeholder": c.placeholder, "score": round(float(s), 6),
                          "mask_fraction": round(float(m.float().mean()), 6), "confidence": self.confidence(k)}
                         for k, (c, m, s) in enumerate(zip(self.concepts, self.masks_lowres, self.scores))],
            "timestep": self.timestep,
            "notes": list(self.notes),
        }


def sample_timestep_and_noise(shape, opts: MaskOptions, generator: torch.Generator) -> tuple[int, torch.Tensor]:
    """A timestep uniform in [t_min, t_max) and Gaussian noise, both from `generator` (CPU)."""
    t = int(torch.randint(opts.t_min, opts.t_max, (1,), generator=generator))
    return t, torch.randn(shape, generator=generator)


def check_affinity_memory(latent_hw, self_factor: int, device: torch.device) -> None:
    """Refuse, before allocating, a resolution whose self-attention affinity (Q x Q at latent/self_factor, a few
    copies for the matrix power) would not fit in the device's free memory."""
    queries = (latent_hw[0] // self_factor) * (latent_hw[1] // self_factor)
    need = 4 * queries * queries * 4  # float32, about four Q x Q matrices at once
    free = free_memory(device)
    if free is not None and need > free:
        raise AttenCraftError(
            f"Mask extraction at this resolution needs about {need / 2 ** 20:,.1f} MiB for the {queries}x{queries} "
            f"self-attention affinity, and {device} has {free / 2 ** 20:,.1f} MiB free. Use a smaller resolution "
            "(the model's own is best) or a larger self-attention factor.")


def concept_attention(comps: SDComponents, latents: torch.Tensor, concepts: list[Concept], opts: MaskOptions,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One denoiser pass with the all-concepts prompt on noised latents [1, C, h, w].

    Returns the normalised cross-attention maps [N + 1, h, w] (background first) at self-attention
    resolution, the self-attention [h*w, h*w] and the timestep used.
    """
    family = family_of(comps)
    opts.check(comps.noise_scheduler.config.num_train_timesteps)
    placeholders = [c.placeholder for c in concepts]
    prompt = concepts_prompt(placeholders)
    positions = family.token_positions(comps, prompt, placeholders)
    check_affinity_memory(latents.shape[-2:], family.self_attention_factor(opts), comps.device)
    t, noise = sample_timestep_and_noise(latents.shape, opts, generator)
    noisy, timesteps = family.noised(comps, latents, noise.to(latents), t)
    store = AttentionStore(rows=[0])
    with torch.no_grad(), family.record_attention(comps, store, opts):
        family.predict(comps, noisy, timesteps, encode_prompts(comps, [prompt], latents))
        cross, self_attn = store.mean("cross")[0], store.mean("self")[0]
    aspect = latents.shape[-1] / latents.shape[-2]
    cross_hw, self_hw = map_side(cross.shape[0], aspect), map_side(self_attn.shape[0], aspect)
    token_idx = [positions[p] for p in placeholders]
    if "<sot>" in positions:
        return mask_math.token_maps(cross, [positions["<sot>"]] + token_idx, cross_hw, self_hw), self_attn, t
    maps = mask_math.token_maps(cross, token_idx, cross_hw, self_hw)
    return torch.cat([mask_math.derived_background(maps, family.background_level)[None], maps]), self_attn, t


def masks_from_latents(comps: SDComponents, latents: torch.Tensor, concepts: list[Concept],
                       opts: MaskOptions, generator: torch.Generator, progress: Progress = no_progress) -> MaskResult:
    """The paper's mask initialization on latents [1, C, h, w]: one denoiser pass, then the mask rule.
    `progress` is told ("masks", 1, 2) after the denoiser pass and ("masks", 2, 2) at the end."""
    attention, self_attn, t = concept_attention(comps, latents, concepts, opts, generator)
    progress("masks", 1, 2)
    maps = mask_math.propagate(mask_math.affinity(self_attn, opts.affinity_power), attention)
    labels = mask_math.margin_labels(maps, opts.threshold)
    assignment = mask_math.assign_regions(labels, attention[1:], [c.word for c in concepts])
    masks = torch.stack([labels == region for region in assignment.region_of_concept])
    # Reorder maps so that map k + 1 is the region concept k received.
    maps = torch.cat([maps[:1], maps[assignment.region_of_concept]])
    scores = mask_math.attention_scores(attention[1:], masks)
    margins, strongest = mask_math.assignment_confidence(assignment)
    progress("masks", 2, 2)
    return MaskResult(concepts, masks, maps, attention, scores, t, margins, strongest)


def upsample_masks(result: MaskResult, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """[N, H, W] bool at `size` (width, height): the margin rule re-applied on bilinearly upsampled maps, which
    follows object edges more finely than the attention grid.

    A concept whose region the finer rule leaves empty (a region of a few attention pixels can fall below the
    margin everywhere once interpolated) keeps its attention-resolution region, upsampled, minus the other
    concepts' pixels, and a note says so; if even that is empty, the masks are refused as ambiguous.
    """
    width, height = size
    maps = F.interpolate(result.maps[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    labels = mask_math.margin_labels(maps, threshold)
    masks = torch.stack([labels == k + 1 for k in range(len(result.concepts))])
    coarse = F.interpolate(result.masks_lowres.float()[None], size=(height, width), mode="nearest")[0] > 0.5
    for k, concept in enumerate(result.concepts):
        if masks[k].any():
            continue
        others = torch.cat([masks[:k], masks[k + 1:]]).any(0)
        masks[k] = coarse[k] & ~others
        if not masks[k].any():
            raise AttenCraftError(f"The mask of {concept.word!r} vanishes at the image's size: the attention "
                                  f"maps do not separate the concepts in this image. {mask_math.AMBIGUITY_ADVICE}")
        result.notes.append(f"the mask of {concept.word!r} is its attention-resolution region (the finer rule at "
                            "image size left it empty): a small, uncertain region")
    return masks


def extract_masks(comps: SDComponents, image: Image.Image, concepts: list[Concept],
                  opts: MaskOptions | None = None, progress: Progress = no_progress) -> MaskResult:
    """Masks, maps and scores for the concepts in an RGB image. Adds the concept tokens to the components.
    `progress` is told ("masks", stages done, 3): image encoded, attention recorded, masks derived."""
    opts = opts or MaskOptions()
    progress("masks", 0, 3)
    ConceptTokens.add(comps, concepts)
    resolution = opts.resolution or comps.native_resolution
    latents = encode_images(comps, image_to_tensor(image, resolution))
    progress("masks", 1, 3)
    result = masks_from_latents(comps, latents, concepts, opts, torch.Generator().manual_seed(opts.seed),
                                progress=lambda phase, done, total: progress("masks", 1 + done, 3))
    result.masks = upsample_masks(result, image.size, opts.threshold)
    return result
