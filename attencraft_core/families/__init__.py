"""What differs between model families, one module each: `sd` (Stable Diffusion 1.x/2.x and other single-CLIP
UNets), `sdxl` and `flux` (groundwork: not reachable from the entry points yet). The method's code (masks,
sampling, losses, training, generation) asks the family of its components for text conditioning, the text
towers that carry concept tokens, embedding keys, the training objective, the denoiser call and the pipeline."""

from __future__ import annotations

from .flux import Flux
from .sd import StableDiffusion
from .sdxl import StableDiffusionXL

FAMILIES = (Flux(), StableDiffusionXL(), StableDiffusion())  # the first that recognises the denoiser's config


def family_of(comps) -> "StableDiffusion":
    """The family of a component set, from its denoiser's config."""
    config = comps.denoiser.config
    return next(f for f in FAMILIES if f.recognises(config))


def family_named(name: str) -> "StableDiffusion":
    """The family a concept set names ("sd1", "sd2", "custom-<dim>", "sdxl", "flux")."""
    return next((f for f in FAMILIES if f.owns_name(name)), FAMILIES[-1])
