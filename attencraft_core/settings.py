"""The settings of mask extraction and training, each defined once (default, help, range; see options.py).

This module is light on purpose (no torch, no diffusers): the ComfyUI nodes build their inputs from it when
ComfyUI loads the pack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import AttenCraftError
from .options import check_settings, seed_setting, setting

MIN_LR = 1e-9  # a smaller learning rate changes nothing in float32 (1e-320 would be accepted as "> 0" otherwise)


@dataclass
class MaskOptions:
    """Settings of mask extraction; the defaults are the paper's."""

    seed: int = seed_setting("seed of the mask timestep and noise")
    t_min: int = setting(0, "smallest timestep drawn", low=0, high=10_000)
    t_max: int = setting(300, "timesteps are drawn from [t-min, t-max); low noise keeps the objects visible",
                         low=1, high=10_000)
    threshold: float = setting(0.1, "margin tau by which a concept's map must beat every other map (and the "
                                    "background) for a pixel to join its mask", low=0, high=0.99)
    affinity_power: int = setting(4, "matrix power of the self-attention affinity", low=1, high=16)
    cross_factor: int = setting(4, "cross-attention layers at latent/FACTOR are read (16x16 at 512 px)", low=1,
                                high=64)
    self_factor: int = setting(2, "self-attention layers at latent/FACTOR are read (32x32 at 512 px)", low=1,
                               high=64)
    resolution: int | None = setting(None, "square side in px the image is resized to (default: the model's own, "
                                           "512 for SD 1.5)", low=8, high=8192, multiple_of=8)

    def check(self, num_train_timesteps: int | None = None) -> None:
        """Every setting in range; with the model's `num_train_timesteps`, the timestep range fits it."""
        check_settings(self, "Mask")
        if num_train_timesteps is not None and not 0 <= self.t_min < self.t_max <= num_train_timesteps:
            raise AttenCraftError(
                f"Timestep range [{self.t_min}, {self.t_max}) is invalid: need 0 <= min < max <= "
                f"{num_train_timesteps}. The default [0, 300) works well.")


@dataclass
class TrainOptions:
    """Training settings; defaults follow the paper's reference code."""

    steps: int = setting(500, "training steps", low=1, high=1_000_000)
    lr: float = setting(1e-4, "AdamW learning rate", low=MIN_LR, high=1)
    embedding_lr: float | None = setting(None, "learning rate of the concept embeddings (default: lr)", low=MIN_LR,
                                         high=1)
    weight_decay: float = setting(1e-2, "AdamW weight decay, LoRA weights only", low=0, high=1)
    max_grad_norm: float = setting(1.0, "gradient clipping norm", low=0, low_open=True, cli=False)
    rank: int = setting(16, "LoRA rank", low=1, high=1024)
    alpha: float | None = setting(None, "LoRA alpha (default: equal to the rank)", low=0, high=4096, low_open=True)
    targets: str = setting("kv", "LoRA layers: kv = cross-attention key/value (the paper), qkvo = all "
                                 "cross-attention projections, attn = self and cross attention, all = attention + "
                                 "feed-forward", choices=("kv", "qkvo", "attn", "all"))
    policy: str = setting("adaptive", "concept sampling: adaptive (by attention scores), uniform, union "
                                      "(Break-A-Scene)", choices=("adaptive", "uniform", "union"))
    all_share: float = setting(1 / 3, "share of steps showing every concept together", low=0, high=1,
                               low_open=True, cli=False)
    seed: int = seed_setting("training seed (noise, timesteps, concept draws)")
    masked_loss: bool = setting(True, "the diffusion loss only inside the chosen concepts' masks (off: the whole "
                                      "image)")
    unmasked_term: bool = setting(False, "add the full-image loss to the masked loss (half each, as the reference "
                                         "code)")
    loss_mask_margin: int = setting(0, "grow each concept's mask by this many latent pixels in the masked loss, "
                                       "never into another concept's mask", low=0, high=64)
    attention_weight: float = setting(1.0, "weight of the cross-attention JSD loss, 0 disables it", low=0,
                                      high=1000)
    prior_weight: float = setting(1.0, "weight of prior preservation, 0 disables it", low=0, high=1000)
    class_prompt: str = setting("a photo at the beach", "prompt of the prior-preservation images")
    num_class_images: int = setting(8, "class images to generate when none are given", low=0, high=10_000)
    class_steps: int = setting(25, "sampling steps for generated class images", low=1, high=1000)
    refresh_every: int = setting(20, "re-derive masks every N steps, 0 = never", low=0)
    ssim_min: float = setting(0.8, "a refreshed mask is kept only with SSIM >= this against the previous one",
                              low=-1, high=1)
    checkpoint_every: int = setting(100, "write the resumable checkpoint every N steps", low=1)
    keep_checkpoint: bool = setting(False, "keep the resumable checkpoint when the run finishes (to train it "
                                           "further later); a stopped run always keeps it")
    save_every: int = setting(0, "also save a usable concept set every N steps (<name>_step<N>), 0 = only the "
                                 "final one", low=0)
    keep_last: int = setting(3, "how many of those step snapshots to keep (the oldest are removed)", low=1,
                             high=1000)
    preview_every: int = setting(0, "draw one small image per concept with the current weights every N steps "
                                    "(<name>_preview_<N>.png), 0 = never", low=0)
    two_phase: bool = setting(False, "first train embeddings only at phase1-lr, then LoRA + embeddings "
                                     "(Break-A-Scene)")
    phase1_steps: int = setting(100, "steps of phase 1 with two phases", low=1)
    phase1_lr: float = setting(5e-4, "phase-1 learning rate", low=MIN_LR, high=1)
    gradient_checkpointing: bool = setting(False, "recompute activations in the backward pass: much less memory, "
                                                   "about a third more time per step")
    resolution: int | None = setting(None, "square side in px the image is resized to (default: the model's "
                                           "own)", low=8, high=8192, multiple_of=8)
    masks: MaskOptions = field(default_factory=MaskOptions)

    def check(self, native_resolution: int | None = None) -> None:
        """Refuse inconsistent settings; `native_resolution` is the model's (what an unset resolution means)."""
        check_settings(self, "Training")
        self.masks.check()
        if self.two_phase and not 0 < self.phase1_steps < self.steps:
            raise AttenCraftError(f"With two phases, phase-1 steps ({self.phase1_steps}) must be between 1 and "
                                  f"steps - 1 ({self.steps - 1}).")
        resolution = self.resolution or native_resolution
        if self.masks.resolution is not None and self.masks.resolution != resolution:
            raise AttenCraftError(f"Training extracts its masks from the training image at the training resolution "
                                  f"({resolution or 'the model default'}), not at {self.masks.resolution} px: "
                                  f"set the training resolution instead, or leave the masks' resolution unset.")
        if self.prior_weight > 0 and self.num_class_images < 1:
            raise AttenCraftError("Prior preservation needs at least one class image (or a prior weight of 0).")
