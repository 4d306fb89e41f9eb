"""AttenCraft training: concept embeddings + LoRA with masked, prior and attention losses, adaptive sampling,
mask refresh, atomic checkpoints and exact resume."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import mask_math
from .attention import AttentionStore, map_side
from .checkpoint import (CHECKPOINT, check_training_state, load_checkpoint, optimizer_from_flat, optimizer_to_flat,
                         refuse_legacy, save_checkpoint)
from .concept_file import ConceptSet
from .concept_tokens import ConceptTokens
from .concepts import Concept, concepts_prompt
from .encoding import cat_conditioning, encode_images, encode_prompts
from .errors import AttenCraftError
from .families import family_of
from .generation import class_images as make_class_images
from .generation import generate, model_fingerprint
from .distributed import Processes, rank_seed
from .images import contact_sheet, image_fingerprint, image_to_tensor, mask_to_image
from .lora import add_lora, copy_lora_weights, lora_parameters, lora_state_dict
from .losses import attention_loss, masked_diffusion_loss, ssim
from .masks import concept_attention, masks_from_latents
from .model_loading import SDComponents
from .outputs import ensure_out_dir, safe_name, save_image, write_json
from .progress import Progress, no_progress
from .run_folder import RunLock, RunManifest, earlier_run_files, other_files, run_files, snapshot_name, snapshots
from .sampling import ConceptSampler
from .settings import TrainOptions

@dataclass
class TrainResult:
    concept_set: ConceptSet
    history: list[dict]
    events: list[str]
    files: dict[str, Path] = field(default_factory=dict)


class TrainingCancelled(Exception):
    """Raised by a progress callback to stop training; the last checkpoint is kept."""


PREVIEW_STEPS = 12  # DDIM steps of a training preview
RUN_ONLY = ("steps", "checkpoint_every", "keep_checkpoint", "save_every", "keep_last", "preview_every")  # no effect on the weights


def preview_side(resolution: int) -> int:
    """Side of a training preview: 3/4 of the training resolution, a multiple of 8."""
    return max(8, resolution * 3 // 4 // 8 * 8)


FULL_MASK = 0.99  # a user mask covering this share of the image is refused (it leaves no background)
SAME_REGION = 0.9  # two user masks overlapping this much (intersection over union) are refused


def prepare_user_masks(masks: list, concepts: list[Concept], size: tuple[int, int]) -> tuple[torch.Tensor, list[str]]:
    """User masks (PIL images or [H, W] tensors) as bool [N, h, w] at `size` (h, w), with notes."""
    if len(masks) != len(concepts):
        raise AttenCraftError(f"Got {len(masks)} masks for {len(concepts)} concepts: give one mask per concept, "
                              "in the same order as the concept words.")
    notes, out = [], []
    for i, (mask, concept) in enumerate(zip(masks, concepts)):
        if isinstance(mask, Image.Image):
            mask = torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)
        mask = mask.float()
        if mask.ndim != 2 or not torch.isfinite(mask).all():
            raise AttenCraftError(f"The mask for {concept.word!r} (mask {i + 1}) is not a finite 2-D mask (shape "
                                  f"{tuple(mask.shape)}, NaN or infinite values?): check the node or file it "
                                  "comes from.")
        if mask.max() <= 0:
            raise AttenCraftError(f"The mask for {concept.word!r} (mask {i + 1}) is all black: paint the concept "
                                  "white, or leave masks out to extract them from attention.")
        if (mask > 0.5).float().mean() >= FULL_MASK:
            raise AttenCraftError(f"The mask for {concept.word!r} (mask {i + 1}) covers the whole image: paint only "
                                  "the concept white, the rest black (the method needs each concept's region).")
        if tuple(mask.shape) != tuple(size):
            notes.append(f"mask {i + 1} ({concept.word}) was {mask.shape[1]}x{mask.shape[0]}; resized.")
        resized = F.interpolate(mask[None, None], size=size, mode="area")[0, 0]
        out.append(resized > 0.5 if resized.max() > 0.5 else resized >= resized.max())
    stacked = torch.stack(out)
    for i in range(len(stacked)):
        for j in range(i + 1, len(stacked)):
            overlap = (stacked[i] & stacked[j]).sum() / (stacked[i] | stacked[j]).sum()
            if overlap >= SAME_REGION:
                raise AttenCraftError(
                    f"The masks for {concepts[i].word!r} and {concepts[j].word!r} (masks {i + 1} and {j + 1}) cover "
                    f"the same pixels ({100 * float(overlap):.0f}% overlap): give each concept a mask of its own "
                    "region, in the order of the concept words.")
    return stacked, notes


@dataclass
class TrainingInputs:
    """What training reads: the concept tokens (in every text tower), the image's latents, the prior images'
    latents (None without prior preservation), the masks [N, h, w] at attention resolution and their attention
    scores [N]."""

    tokens: ConceptTokens
    latents: torch.Tensor
    class_latents: torch.Tensor | None
    masks: torch.Tensor
    scores: torch.Tensor
    notes: list[str] = field(default_factory=list)


def prepare_inputs(comps: SDComponents, image: Image.Image, concepts: list[Concept], opts: TrainOptions,
                   user_masks: list | None = None, class_images: list[Image.Image] | None = None,
                   cache_dir: str | Path | None = None, log=print, progress: Progress = no_progress) -> TrainingInputs:
    """Add the concept tokens, encode the image (and the prior images, generated and cached when not given), and
    take the user's masks or extract them; the scores are each token's attention inside its mask."""
    resolution = opts.resolution or comps.native_resolution
    tokens = ConceptTokens.add(comps, concepts)
    latents = encode_images(comps, image_to_tensor(image, resolution))
    class_latents = None
    if opts.prior_weight > 0:
        if class_images is None:
            log(f"class images: {opts.num_class_images} x {opts.class_prompt!r} (cached)")
            class_images = make_class_images(comps, opts.class_prompt, opts.num_class_images, resolution,
                                             opts.class_steps, cache_dir, progress)
        class_latents = torch.cat([encode_images(comps, image_to_tensor(im, resolution)) for im in class_images])
    generator = torch.Generator().manual_seed(opts.masks.seed)
    if user_masks is None:
        result = masks_from_latents(comps, latents, concepts, opts.masks, generator, progress)
        return TrainingInputs(tokens, latents, class_latents, result.masks_lowres, result.scores)
    attention, _, _ = concept_attention(comps, latents, concepts, opts.masks, generator)
    masks, notes = prepare_user_masks(user_masks, concepts, attention.shape[-2:])
    return TrainingInputs(tokens, latents, class_latents, masks, mask_math.attention_scores(attention[1:], masks),
                          notes)


@dataclass
class Trainables:
    """What training changes: float32 copies of the concept rows of each text tower (see ConceptTokens.learn)
    and the LoRA (float32 over frozen weights of any dtype), with their optimizer and, for fp16 weights, a
    gradient scaler. `release` undoes the training state and writes the rows into the towers."""

    tokens: ConceptTokens
    embeddings: list[torch.nn.Parameter]
    lora: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler

    def release(self, unet) -> None:
        self.tokens.stop_learning()
        for p in self.lora:
            p.requires_grad_(False)
        unet.eval()


def attach_trainables(comps: SDComponents, tokens: ConceptTokens, opts: TrainOptions) -> Trainables:
    """Seeded LoRA on the UNet's target layers, learned concept rows, and AdamW (weight decay on LoRA only)."""
    from diffusers.training_utils import cast_training_params  # on use (see lora.py)

    add_lora(comps.denoiser, opts.rank, opts.alpha, opts.targets, seed=opts.seed,
             patterns=family_of(comps).lora_targets())
    cast_training_params(comps.denoiser, torch.float32)  # PEFT gives the adapter the base layer's dtype
    if opts.gradient_checkpointing:
        comps.denoiser.enable_gradient_checkpointing()
        comps.denoiser.train()
    embeddings = tokens.learn()
    lora = lora_parameters(comps.denoiser)
    optimizer = torch.optim.AdamW([{"params": lora, "weight_decay": opts.weight_decay, "name": "lora"},
                                   {"params": embeddings, "weight_decay": 0.0, "name": "embeddings"}])
    scaler = torch.amp.GradScaler(comps.device.type, enabled=comps.dtype == torch.float16)
    return Trainables(tokens, embeddings, lora, optimizer, scaler)


@dataclass
class Draws:
    """One rank's random draws: the concept subsets (sampler), and the prior image, noise and timestep
    (generator). Rank 0 draws from the run's seed, so one process trains as it always did."""

    rank: int
    generator: torch.Generator
    sampler: ConceptSampler

    @classmethod
    def of_rank(cls, rank: int, num_concepts: int, opts: TrainOptions) -> "Draws":
        seed = rank_seed(opts.seed, rank)
        return cls(rank, torch.Generator().manual_seed(seed),
                   ConceptSampler(num_concepts, opts.policy, opts.all_share, seed))

    def state(self) -> tuple[torch.Tensor, dict]:
        return self.generator.get_state(), self.sampler.state()

    def load(self, generator_state: torch.Tensor, sampler_state: dict) -> None:
        self.generator.set_state(generator_state)
        self.sampler.load_state(sampler_state)


class Trainer:
    """One training run. Build it (inputs prepared, trainables attached), then call run(); everything is seeded
    and resumable."""

    def __init__(self, comps: SDComponents, image: Image.Image, concepts: list[Concept], out_dir: str | Path,
                 opts: TrainOptions | None = None, user_masks: list | None = None,
                 class_images: list[Image.Image] | None = None, cache_dir: str | Path | None = None,
                 callback=None, log=print, progress: Progress = no_progress, on_preview=None,
                 processes: Processes | None = None):
        """`callback(step, steps, record, ratios)` after each step (may raise TrainingCancelled); `progress` is
        told each long phase: class images, masks, training (with loss and sampling ratios); `on_preview(step,
        image)` gets each training preview (see `preview_every`). `processes`: this process's place among
        several (see distributed.py); only the main one writes files."""
        self.opts = opts or TrainOptions()
        self.opts.check(comps.native_resolution)
        self.processes = processes or Processes()
        self.comps, self.concepts, self.callback, self.log, self.progress = comps, concepts, callback, log, progress
        self.on_preview = on_preview
        self._class_conditioning = None
        self.resolution = self.opts.resolution or comps.native_resolution
        self.out = ensure_out_dir(out_dir)
        self.manifest = RunManifest(self.out)
        self.device = comps.device
        self.history: list[dict] = []
        self.start_step = 0
        with self.processes.main_first():  # the main process fills the class-image cache, the others read it
            inputs = prepare_inputs(comps, image, concepts, self.opts, user_masks, class_images, cache_dir, log,
                                    progress)
        self.tokens, self.latents, self.class_latents = inputs.tokens, inputs.latents, inputs.class_latents
        self.token_ids = self.tokens.ids[0]  # the placeholders' ids in the (first) tokenizer
        masks, scores = self.processes.from_main((inputs.masks.cpu(), inputs.scores.cpu()))  # all train on the same
        self.masks, self.scores, self.events = masks.to(inputs.masks.device), scores, list(inputs.notes)
        self.draws = [Draws.of_rank(rank, len(concepts), self.opts) for rank in self.processes.ranks]
        self._set_scores(self.scores)
        self._event(f"masks ready; sampling ratios {self.sampler.ratios()}")
        # what a checkpoint must match to continue this run (computed before any weight is trained)
        self.identity = {"model": model_fingerprint(comps), "dtype": str(comps.dtype).removeprefix("torch."),
                         "image": image_fingerprint(image),
                         "masks": hashlib.sha256(self.masks.cpu().numpy().tobytes()).hexdigest()[:16]}
        self.trainables = attach_trainables(comps, self.tokens, self.opts)
        self.lora, self.optimizer = self.trainables.lora, self.trainables.optimizer

    # ---- helpers ---------------------------------------------------------------------------------------------
    @property
    def sampler(self) -> ConceptSampler:
        """The first draw stream's sampler (every stream has the same scores, hence the same ratios)."""
        return self.draws[0].sampler

    def _set_scores(self, scores: torch.Tensor) -> None:
        for draws in self.draws:
            draws.sampler.set_scores(scores)

    def _event(self, text: str, step: int | None = None) -> None:
        line = text if step is None else f"step {step}: {text}"
        self.events.append(line)
        self.log(line)

    def _set_learning_rates(self, step: int) -> None:
        o = self.opts
        phase1 = o.two_phase and step < o.phase1_steps
        for group in self.optimizer.param_groups:
            if group["name"] == "lora":
                group["lr"] = 0.0 if phase1 else o.lr
            else:
                group["lr"] = o.phase1_lr if phase1 else (o.embedding_lr or o.lr)

    # ---- one step --------------------------------------------------------------------------------------------
    def step(self, step: int) -> dict:
        """One optimizer step over this process's draws; with several processes their gradients are summed
        (each draw's loss is divided by the draws of all processes, so the step sees their mean)."""
        o = self.opts
        self._set_learning_rates(step)
        records = [self._draw_step(step, draws) for draws in self.draws]
        self.processes.sum_gradients(self.lora + self.trainables.embeddings)
        scaler = self.trainables.scaler
        scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.lora + self.trainables.embeddings, o.max_grad_norm)
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        finite = [torch.isfinite(p).all() for p in self.lora] + [self.tokens.all_finite()]
        if not torch.stack(finite).all():  # one host sync per step
            raise AttenCraftError(f"The trained weights became NaN or infinite at step {step + 1}: lower the learning "
                                  "rate or use fp32. The last checkpoint is kept.")
        self.history.append(records[0])
        return records[0]

    def _draw_step(self, step: int, draws: "Draws") -> dict:
        """Forward and backward of one draw (concepts, prior image, noise and timestep from `draws`)."""
        o, comps = self.opts, self.comps
        chosen = draws.sampler.sample()
        placeholders = [self.concepts[i].placeholder for i in chosen]
        prompt = concepts_prompt(placeholders)
        family = family_of(comps)
        positions = family.token_positions(comps, prompt, placeholders)
        latents, cond = self.latents, encode_prompts(comps, [prompt], self.latents)
        if o.prior_weight > 0:
            pick = int(torch.randint(len(self.class_latents), (1,), generator=draws.generator))
            latents = torch.cat([latents, self.class_latents[pick:pick + 1]])
            cond = cat_conditioning(cond, self.class_conditioning())
        noisy, t, target = family.training_sample(comps, latents, draws.generator)
        store = AttentionStore(rows=[0])
        # the recording processors stay installed through backward: gradient checkpointing reruns them
        with family.record_attention(comps, store, o.masks, kinds=("cross",), detach_background=True):
            pred = family.predict(comps, noisy, t, cond)
            latent_mask = self.loss_mask(chosen, latents.shape[-2:]).to(self.device)
            losses = {"instance": masked_diffusion_loss(pred[:1], target[:1], latent_mask if o.masked_loss else None,
                                                        o.unmasked_term)}
            if o.prior_weight > 0:
                losses["prior"] = F.mse_loss(pred[1:].float(), target[1:].float())
            if o.attention_weight > 0:
                cross = store.mean("cross")[0]
                cross_hw = map_side(cross.shape[0], latents.shape[-1] / latents.shape[-2])
                targets = [self.masks[i] for i in chosen]
                token_idx = [positions[p] for p in placeholders]
                if "<sot>" in positions:  # the start token's attention is pulled towards the background
                    targets, token_idx = [~self.masks.any(0)] + targets, [positions["<sot>"]] + token_idx
                losses["attention"] = attention_loss(cross, token_idx, cross_hw, torch.stack(targets).to(self.device))
            total = (losses["instance"] + o.prior_weight * losses.get("prior", 0.0)
                     + o.attention_weight * losses.get("attention", 0.0))
            if not torch.isfinite(total):
                raise AttenCraftError(f"The loss became {float(total)} at step {step + 1}: lower the learning rate "
                                      "(--lr) or use fp32. The last checkpoint is kept.")
            self.trainables.scaler.scale(total / self.processes.total).backward()
        return {"step": step + 1, "loss": float(total.detach()), "concepts": chosen,
                **{k: float(v.detach()) for k, v in losses.items()}}

    def class_conditioning(self) -> dict:
        """The prior images' text conditioning, computed once: the class prompt holds no concept token, so
        training never changes it (this spares the text towers' forward and backward for half the batch)."""
        if self._class_conditioning is None:
            with torch.no_grad():
                self._class_conditioning = encode_prompts(self.comps, [self.opts.class_prompt], self.latents)
        return self._class_conditioning

    def loss_mask(self, chosen: list[int], size: tuple[int, int]) -> torch.Tensor:
        """[1, 1, h, w] float mask of the masked loss at latent size: the chosen concepts' masks, grown by
        `loss_mask_margin` latent pixels (attention masks tend to miss an object's edges) but never into another
        concept's mask."""
        masks = F.interpolate(self.masks.float()[None], size=size, mode="nearest")[0] > 0.5
        union = masks[chosen].any(0)
        margin = self.opts.loss_mask_margin
        if margin:
            grown = F.max_pool2d(union.float()[None, None], 2 * margin + 1, stride=1, padding=margin)[0, 0] > 0.5
            others = masks[[i for i in range(len(masks)) if i not in chosen]].any(0)
            union = union | (grown & ~others)
        return union.float()[None, None]

    def refresh_masks(self, step: int) -> None:
        """Re-derive the masks with the current model; keep them only if one-to-one and SSIM >= ssim_min. The
        main process decides; every process takes its masks, so all train on the same ones."""
        masks, scores, event = self.processes.from_main(self._refreshed_masks(step) if self.processes.is_main
                                                        else None)
        if masks is not None:
            self.masks, self.scores = masks.to(self.masks.device), scores
            self._set_scores(self.scores)
            event += f"; sampling ratios {self.sampler.ratios()}"
        self._event(event, step)

    def _refreshed_masks(self, step: int) -> tuple[torch.Tensor | None, torch.Tensor | None, str]:
        """(new masks, their scores, what happened), or (None, None, why not)."""
        gen = torch.Generator().manual_seed(self.opts.masks.seed + step)
        self.comps.denoiser.eval()
        try:
            result = masks_from_latents(self.comps, self.latents, self.concepts, self.opts.masks, gen)
        except AttenCraftError as exc:
            return None, None, f"mask refresh rejected ({str(exc).split(':')[0]})"
        finally:
            if self.opts.gradient_checkpointing:
                self.comps.denoiser.train()
        similarity = [ssim(new, old) for new, old in zip(result.masks_lowres, self.masks)]
        shown = ", ".join(f"{s:.2f}" for s in similarity)
        if min(similarity) < self.opts.ssim_min:
            return None, None, f"mask refresh rejected (SSIM {shown} < {self.opts.ssim_min})"
        return result.masks_lowres.cpu(), result.scores.cpu(), f"masks refreshed (SSIM {shown})"

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def _signature(self) -> dict:
        """What must match for a checkpoint to continue this run: the concepts, the base model, the image, the
        initial masks and every option that changes the weights (not steps or how often files are written)."""
        options = {k: v for k, v in asdict(self.opts).items() if k not in RUN_ONLY}
        return {"concepts": [c.placeholder + "=" + c.word for c in self.concepts], **self.identity,
                "options": options}

    def save_checkpoint(self, step: int) -> Path | None:
        """Write the resumable state (no pickle: safetensors + JSON metadata) atomically: the weights, and every
        rank's random draws (gathered from all processes; only the main process writes)."""
        states = [state for per_process in self.processes.gather([d.state() for d in self.draws])
                  for state in per_process]
        if not self.processes.is_main:
            return None
        optimizer_tensors, optimizer_info = optimizer_to_flat(self.optimizer.state_dict())
        tensors = {**{f"lora.{k}": v for k, v in lora_state_dict(self.comps.denoiser).items()},
                   "embeddings": self.tokens.rows(),
                   "masks": self.masks.to(torch.uint8), "scores": self.scores.float(),
                   "generator": states[0][0], **{f"generator.{r}": g for r, (g, _) in enumerate(states) if r},
                   **optimizer_tensors}
        info = {"step": step, "sampler": states[0][1], "history": self.history, "events": self.events,
                "optimizer": optimizer_info, "scaler": self.trainables.scaler.state_dict(), **self._signature()}
        if len(states) > 1:
            info |= {"processes": len(states), "samplers": [sampler for _, sampler in states[1:]]}
        path = save_checkpoint(self.out / CHECKPOINT, tensors, info)
        self.manifest.add(path)
        return path

    def resume(self) -> int:
        """Load out/checkpoint.safetensors if present; returns the step it continues from (0 if none)."""
        refuse_legacy(self.out)
        path = self.out / CHECKPOINT
        if not path.is_file():
            self.log(f"no checkpoint in {self.out}; starting from step 0")
            return 0
        tensors, info = load_checkpoint(path)
        written_by = info.get("processes", 1)
        if written_by != self.processes.total:
            raise AttenCraftError(
                f"{path} was written by a run on {written_by} process(es) and this run has {self.processes.total}: "
                f"resume it with {written_by} processes (the launcher's process count), since each process "
                "continues its own random draws.")
        for key, expected in self._signature().items():
            saved = info.get(key)
            if saved == expected:
                continue
            if key == "options" and isinstance(saved, dict):
                key = "options " + ", ".join(k for k in sorted(set(saved) | set(expected))
                                             if saved.get(k) != expected.get(k))
            elif key != "concepts":
                saved, expected = "another", "this one"
            raise AttenCraftError(f"{path} belongs to another run: its {key} differ ({saved} vs {expected}). "
                                  "Resume with the same model, image, masks and settings, or use another output "
                                  "folder.")
        try:
            check_training_state(tensors, info, len(self.concepts), self.opts.steps, self.masks.shape, self.optimizer)
            lora = {k[len("lora."):]: v for k, v in tensors.items() if k.startswith("lora.")}
            embeddings = tensors["embeddings"]
            if tuple(embeddings.shape) != (len(self.token_ids), sum(self.tokens.widths)):
                raise ValueError(f"embeddings of shape {tuple(embeddings.shape)}")
            masks = tensors["masks"].bool()
            copy_lora_weights(self.comps.denoiser, lora)
            self.tokens.set_rows(embeddings)
            optimizer_state = optimizer_from_flat(tensors, info["optimizer"])
            optimizer_state["param_groups"] = self.optimizer.state_dict()["param_groups"]  # settings are this run's
            self.optimizer.load_state_dict(optimizer_state)
            if info["scaler"]:
                self.trainables.scaler.load_state_dict(info["scaler"])
            samplers = [info["sampler"]] + list(info.get("samplers", []))
            for draws in self.draws:
                draws.load(tensors["generator." + str(draws.rank) if draws.rank else "generator"],
                           samplers[draws.rank])
            self.masks, self.scores = masks.to(self.masks.device), tensors["scores"]
            self.history, self.events, self.start_step = list(info["history"]), list(info["events"]), int(info["step"])
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise AttenCraftError(f"{path} does not fit this run ({exc}). Use another --out folder, or train "
                                  "without --resume.") from exc
        self._set_scores(self.scores)
        self.log(f"resumed from {path} at step {self.start_step}")
        return self.start_step

    # ---- the run ---------------------------------------------------------------------------------------------
    def concept_set(self) -> ConceptSet:
        o = self.opts
        training = {k: v for k, v in asdict(o).items() if k != "masks"}
        training["mask_options"] = asdict(o.masks)
        training["steps_done"] = self.history[-1]["step"] if self.history else 0
        return ConceptSet(self.concepts, self.tokens.rows(),
                          lora_state_dict(self.comps.denoiser), o.rank, float(o.alpha or o.rank), o.targets,
                          self.comps.family, self.comps.source, self.masks.cpu(), training,
                          self.tokens.widths if len(self.tokens.widths) > 1 else None)

    def run(self, name: str = "attencraft", replace: bool = False) -> TrainResult:
        """Train (from the resumed step), holding the folder's lock. A new run in a folder that holds another
        run's files refuses, unless `replace`: then those files are removed first."""
        if not self.processes.is_main:  # the main process holds the folder and writes its files
            return self._run(name)
        with RunLock(self.out):
            if self.start_step == 0:
                self._clear_earlier_run(replace)
            return self._run(name)

    def _clear_earlier_run(self, replace: bool) -> None:
        """Refuse a folder that holds another run's files, or with `replace` delete the files its manifest lists
        (a checkpoint of a version that kept no manifest is overwritten by this run's); every other file stays,
        named in an event."""
        earlier = earlier_run_files(self.out)
        if earlier and not replace:
            names = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
            raise AttenCraftError(f"{self.out} holds another training run's files ({names}): use another output "
                                  "folder, resume that run, or replace its files (--overwrite on the command line).")
        ours = run_files(self.out)
        for path in ours:
            path.unlink(missing_ok=True)
        self.manifest.discard(*ours)
        if ours:
            self._event(f"removed {len(ours)} files of an earlier run")
        kept = other_files(self.out)
        if earlier and kept:
            self._event(f"kept {len(kept)} files no run wrote: " + ", ".join(p.name for p in kept[:8])
                        + (", ..." if len(kept) > 8 else ""))

    def _run(self, name: str) -> TrainResult:
        o = self.opts
        started = time.perf_counter()
        try:
            for step in range(self.start_step, o.steps):
                try:
                    record = self.step(step)
                except torch.OutOfMemoryError as exc:
                    raise AttenCraftError(
                        f"Out of memory at step {step + 1}. Lower memory with gradient checkpointing, bf16 "
                        "precision, a smaller resolution, a lower LoRA rank or kv-only targets. "
                        f"The last checkpoint in {self.out} is kept.") from exc
                done = step + 1
                if o.refresh_every and done % o.refresh_every == 0 and done < o.steps:
                    self.refresh_masks(done)
                if done % o.checkpoint_every == 0 or done == o.steps:
                    self.save_checkpoint(done)
                if self.processes.is_main and o.save_every and done % o.save_every == 0 and done < o.steps:
                    self.save_snapshot(name, done)
                if self.processes.is_main and o.preview_every and (done % o.preview_every == 0 or done == o.steps):
                    self.preview(name, done)
                ratios = self.sampler.ratios()
                self.progress("training", done, o.steps, loss=f"{record['loss']:.4f}",
                              ratios=",".join(f"{k}:{v:.2f}" for k, v in ratios.items()))
                if self.callback:
                    self.callback(done, o.steps, record, ratios)
        finally:
            self.trainables.release(self.comps.denoiser)
        result = TrainResult(self.concept_set(), self.history, self.events)
        if not self.processes.is_main:
            return result
        result.files = write_outputs(self.out, name, result, self.masks, self.sampler.ratios(),
                                     time.perf_counter() - started, self.manifest)
        if not o.keep_checkpoint:  # only after the outputs are safely written
            (self.out / CHECKPOINT).unlink(missing_ok=True)
            self.manifest.discard(CHECKPOINT)
        return result

    def save_snapshot(self, name: str, step: int) -> Path:
        """A usable concept set of the weights at `step` (<name>_step<N>.safetensors); only the newest
        `keep_last` are kept."""
        path = self.concept_set().save(self.out / snapshot_name(name, step))
        self.manifest.add(path)
        ours = set(self.manifest.names())
        old = [p for p in snapshots(self.out, name) if p.name in ours][:-self.opts.keep_last]
        for path_old in old:
            path_old.unlink(missing_ok=True)
        self.manifest.discard(*old)
        return path

    def preview(self, name: str, step: int) -> Image.Image:
        """One small image per concept ("a photo of <ci>") with the current weights, as a labelled sheet saved
        as <name>_preview_<step>.png and handed to `on_preview`. Seeded, so sheets of one run compare."""
        unet = self.comps.denoiser
        was_training = unet.training
        unet.eval()
        try:
            prompts = [concepts_prompt([c.placeholder]) for c in self.concepts]
            images = generate(self.comps, prompts, seed=self.opts.seed, steps=PREVIEW_STEPS,
                              resolution=preview_side(self.resolution),  # each sampling step reported (and cancel)
                              progress=lambda phase, done, total: self.progress(f"preview at step {step}", done,
                                                                                total))
        finally:
            unet.train(was_training)
        sheet = contact_sheet([(f"{c.placeholder} {c.word}, step {step}", [im])
                               for c, im in zip(self.concepts, images)], tile=min(256, images[0].width))
        self.manifest.add(save_image(self.out / f"{name}_preview_{step:06d}.png", sheet))
        if self.on_preview:
            self.on_preview(step, sheet)
        return sheet


def write_outputs(out: Path, name: str, result: TrainResult, masks: torch.Tensor, ratios: dict,
                  seconds: float, manifest: RunManifest) -> dict[str, Path]:
    """The run's files in `out`: the concept set and its exports, the final masks, the loss curve and the log,
    each added to the folder's manifest once written."""
    concepts = result.concept_set.concepts
    files = result.concept_set.export(out, name)
    manifest.add(*files.values())
    for i, (concept, mask) in enumerate(zip(concepts, masks)):
        files[f"mask_{i}"] = save_image(out / f"{name}_mask_{i}_{safe_name(concept.word)}.png", mask_to_image(mask))
        manifest.add(files[f"mask_{i}"])
    files["loss_curve"] = save_image(out / f"{name}_loss.png", loss_curve(result.history))
    manifest.add(files["loss_curve"])
    files["log"] = write_json(out / f"{name}_train.json", {
        "concepts": [{"word": c.word, "placeholder": c.placeholder} for c in concepts],
        "seconds": round(seconds, 2), "events": result.events, "history": result.history,
        "final_sampling_ratios": ratios})
    manifest.add(files["log"])
    return files


def loss_curve(history: list[dict], size: tuple[int, int] = (640, 360)) -> Image.Image:
    """A PNG-ready plot of the total loss per step (grey) and its running mean (blue)."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    values = [h["loss"] for h in history]
    pad = 40
    draw.rectangle([pad, 10, width - 10, height - pad], outline=(160, 160, 160))
    if not values:
        return image
    low, high = min(values), max(values)
    span = (high - low) or 1.0

    def point(i, v):
        x = pad + (width - 10 - pad) * (i / max(len(values) - 1, 1))
        return x, height - pad - (height - pad - 10) * (v - low) / span

    window = max(1, len(values) // 20)
    smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])
              for i in range(len(values))]
    if len(values) > 1:
        draw.line([point(i, v) for i, v in enumerate(values)], fill=(190, 190, 190), width=1)
        draw.line([point(i, v) for i, v in enumerate(smooth)], fill=(29, 90, 200), width=2)
    draw.text((pad, height - pad + 8), f"step 1..{len(values)}   loss {low:.4g} .. {high:.4g}", fill="black")
    return image
