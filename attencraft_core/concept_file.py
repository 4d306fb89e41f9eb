"""The concept-set file (one .safetensors: LoRA + concept embeddings + masks + metadata) and its exports."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .concept_tokens import ConceptTokens
from .concepts import Concept
from .errors import AttenCraftError
from .families import family_named, family_of
from .lora import TARGETS, load_lora_state_dict, set_lora_strength
from .options import settings_of
from .reading import check_header_size, require_regular_file
from .outputs import save_safetensors
from .settings import TrainOptions
from .validation import MAX_WEIGHT, first_non_finite, first_too_large, require_number

FORMAT = "attencraft-concepts/1"
PLACEHOLDER_RE = re.compile(r"<c\d+>")


def embedding_key(family: str) -> str:
    """Key ComfyUI reads from a one-tower textual-inversion file: clip_l for SD 1.x, clip_h for SD 2.x."""
    return family_named(family).embedding_keys(family)[0]


MAX_HEADER_BYTES = 16 * 2 ** 20  # a concept set's metadata is a few KB; a larger header is refused unread


@dataclass
class ConceptSet:
    """What training produces and generation needs."""

    concepts: list[Concept]
    embeddings: torch.Tensor            # [N, dim]
    lora: dict[str, torch.Tensor]       # PEFT keys without adapter name
    rank: int
    alpha: float
    targets: str
    family: str
    base_model: str = ""
    masks: torch.Tensor | None = None   # [N, h, w] bool, final training masks
    training: dict = field(default_factory=dict)
    widths: list[int] | None = None     # each text tower's part of an embedding row (SDXL: 768, 1280); None: one

    @property
    def tower_widths(self) -> list[int]:
        return list(self.widths or [self.embeddings.shape[1]])

    @property
    def placeholders(self) -> list[str]:
        return [c.placeholder for c in self.concepts]

    def content_hash(self) -> str:
        """8 hex digits of the concept words and the learned embeddings: two sets whose embedding files would
        differ never share it."""
        h = hashlib.sha256(json.dumps([[c.word, c.placeholder] for c in self.concepts]).encode())
        h.update(self.embeddings.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:8]

    def save(self, path: str | Path) -> Path:
        tensors = {f"lora.{k}": v for k, v in self.lora.items()}
        tensors.update({f"embedding.{c.placeholder}": e for c, e in zip(self.concepts, self.embeddings.float())})
        if self.masks is not None:
            tensors.update({f"mask.{c.placeholder}": m.to(torch.uint8) for c, m in zip(self.concepts, self.masks)})
        metadata = {
            "format": FORMAT,
            "concepts": json.dumps([{"word": c.word, "placeholder": c.placeholder} for c in self.concepts]),
            "base_family": self.family, "base_model": self.base_model,
            "lora_rank": str(self.rank), "lora_alpha": str(self.alpha), "lora_targets": self.targets,
            "training": json.dumps(self.training),
        }
        if self.widths:
            metadata["embedding_widths"] = json.dumps(self.widths)
        return save_safetensors(Path(path), tensors, metadata)

    @classmethod
    def load(cls, path: str | Path) -> "ConceptSet":
        """Read a concept set written by `save`, checking everything in it first (the file may come from
        anyone): header size, metadata schema, tensor names, shapes, dtypes and finite values. Any problem is
        one AttenCraftError naming the file and what is wrong; nothing in the file is executed."""
        path = require_regular_file(path, "Concept file")
        check_header_size(path, MAX_HEADER_BYTES, "a concept set")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for damaged files
            raise AttenCraftError(f"Cannot read {path} as a safetensors file: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise AttenCraftError(
                f"{path.name} is not an AttenCraft concept file (no '{FORMAT}' metadata). Pass the "
                "<name>.safetensors that `train` wrote, not the kohya LoRA or an embedding.")
        return cls.from_parts(path.name, meta, tensors)

    @classmethod
    def from_parts(cls, name: str, meta: dict[str, str], tensors: dict[str, torch.Tensor]) -> "ConceptSet":
        """A ConceptSet from a file's metadata and tensors, validated (see load)."""
        def bad(problem: str) -> AttenCraftError:
            return AttenCraftError(f"{name} is damaged or not a concept set this version can use: {problem}. "
                                   "Train it again, or ask its author for the file `train` wrote.")

        for key in ("concepts", "lora_rank", "lora_alpha", "lora_targets", "base_family"):
            if key not in meta:
                raise bad(f"its metadata has no {key!r}")
        try:
            entries = json.loads(meta["concepts"])
            training = json.loads(meta.get("training", "{}"))
        except ValueError as exc:
            raise bad(f"its metadata is not valid JSON ({exc})") from exc
        if (not isinstance(entries, list) or len(entries) < 1 or not isinstance(training, dict) or not all(
                isinstance(e, dict) and isinstance(e.get("word"), str) and isinstance(e.get("placeholder"), str)
                and PLACEHOLDER_RE.fullmatch(e["placeholder"]) for e in entries)):
            raise bad("'concepts' must be a list of {word, placeholder <cN>} entries")
        concepts = [Concept(e["word"], e["placeholder"]) for e in entries]
        if len({c.placeholder for c in concepts}) != len(concepts):
            raise bad("two concepts share a placeholder")
        try:
            rank, alpha = int(meta["lora_rank"]), float(meta["lora_alpha"])
        except ValueError as exc:
            raise bad(f"lora_rank / lora_alpha are not numbers ({exc})") from exc
        ranges = {f.name: f.metadata for f in settings_of(TrainOptions)}
        if (not ranges["rank"]["low"] <= rank <= ranges["rank"]["high"] or not math.isfinite(alpha)
                or not ranges["alpha"]["low"] < alpha <= ranges["alpha"]["high"]):
            raise bad(f"LoRA rank {rank} / alpha {alpha} out of range (rank 1-{ranges['rank']['high']}, alpha up "
                      f"to {ranges['alpha']['high']})")
        if meta["lora_targets"] not in TARGETS:
            raise bad(f"unknown LoRA targets {meta['lora_targets']!r}")
        non_finite = first_non_finite(tensors.items())
        if non_finite is not None:
            raise bad(f"{non_finite} holds NaN or infinite values")
        too_large = first_too_large(((k, v) for k, v in tensors.items() if not k.startswith("mask.")), MAX_WEIGHT)
        if too_large is not None:
            raise bad(f"{too_large[0]} holds a value of {too_large[1]:.3g} (a trained set stays within "
                      f"+-{MAX_WEIGHT:g}; such values draw black or noise)")
        rows = []
        for c in concepts:
            row = tensors.get(f"embedding.{c.placeholder}")
            if row is None or row.ndim != 1 or not row.is_floating_point():
                raise bad(f"the embedding of {c.placeholder} is missing or not a vector")
            rows.append(row.float())
        if len({r.shape[0] for r in rows}) != 1:
            raise bad("the concept embeddings differ in size")
        try:
            widths = json.loads(meta["embedding_widths"]) if "embedding_widths" in meta else None
        except ValueError as exc:
            raise bad(f"embedding_widths is not valid JSON ({exc})") from exc
        if widths is not None and (not isinstance(widths, list) or not all(isinstance(w, int) and w > 0 for w in widths)
                                   or sum(widths) != rows[0].shape[0]):
            raise bad(f"embedding_widths {widths} do not add up to the embeddings' size {rows[0].shape[0]}")
        lora = {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")}
        if not lora:
            raise bad("it holds no LoRA weights")
        for key, value in lora.items():
            if not key.endswith((".lora_A.weight", ".lora_B.weight")) or value.ndim != 2:
                raise bad(f"LoRA tensor {key!r} is not a lora_A/lora_B matrix")
            if (value.shape[0] if ".lora_A." in key else value.shape[1]) != rank:
                raise bad(f"LoRA tensor {key!r} has shape {tuple(value.shape)}, not rank {rank}")
            twin = key.replace(".lora_A.", ".lora_B.") if ".lora_A." in key else key.replace(".lora_B.", ".lora_A.")
            if twin not in lora:
                raise bad(f"LoRA tensor {key!r} has no {twin.rsplit('.', 2)[-2]} partner")
        masks = [tensors.get(f"mask.{c.placeholder}") for c in concepts]
        if all(m is not None for m in masks):
            if len({tuple(m.shape) for m in masks}) != 1 or masks[0].ndim != 2:
                raise bad("the stored masks differ in shape or are not 2-D")
            mask_stack = torch.stack(masks).bool()
        else:
            mask_stack = None
        return cls(concepts=concepts, embeddings=torch.stack(rows), lora=lora, rank=rank, alpha=alpha,
                   targets=meta["lora_targets"], family=meta["base_family"], base_model=meta.get("base_model", ""),
                   masks=mask_stack, training=training, widths=widths)

    def check_model(self, comps) -> None:
        """Refuse a model of another family or text width (its LoRA and embeddings would not fit)."""
        if comps.family != self.family:
            raise AttenCraftError(
                f"This concept file was trained on a {self.family} model but the model given is {comps.family}. "
                f"Use a {self.family} base model (it was {self.base_model or 'not recorded'}).")
        widths = [m.get_input_embeddings().weight.shape[1] for m in comps.text_modules]
        if widths != self.tower_widths:
            self.check_text_width(sum(widths))
            raise AttenCraftError(f"This concept set's text towers are {self.tower_widths} wide but the model's are "
                                  f"{widths}: load the base model it was trained on "
                                  f"({self.base_model or 'not recorded'}).")

    def check_text_width(self, width: int, model: str = "the model given") -> None:
        """Refuse a model whose text features (all towers together) are not as wide as the learned embeddings."""
        if width != self.embeddings.shape[1]:
            raise AttenCraftError(
                f"This concept set was trained on a {self.family} model ({self.embeddings.shape[1]}-d text) but "
                f"{model} takes {width}-d text: load the base model it was trained on "
                f"({self.base_model or 'not recorded'}).")

    def check_prompt(self, prompt: str) -> None:
        """Every <cN> placeholder in the prompt must be defined by this file."""
        unknown = sorted(set(PLACEHOLDER_RE.findall(prompt)) - set(self.placeholders))
        if unknown:
            known = ", ".join(f"{c.placeholder} ({c.word})" for c in self.concepts)
            raise AttenCraftError(f"The prompt uses {', '.join(unknown)}, which this concept file does not "
                                  f"define. It defines: {known}.")

    def apply(self, comps, strength: float = 1.0) -> None:
        """Add the placeholder tokens with their learned embeddings and load the LoRA into the components, its
        weight change scaled by `strength` (the embeddings stay as learned, like ComfyUI's strength on the MODEL)."""
        require_number("LoRA strength", strength, -10, 10)
        self.check_model(comps)
        ConceptTokens.add(comps, self.concepts).set_rows(self.embeddings)
        load_lora_state_dict(comps.denoiser, self.lora, self.rank, self.alpha, self.targets,
                             family_of(comps).lora_targets())
        set_lora_strength(comps.denoiser, strength)

    def comfy_lora(self) -> dict[str, torch.Tensor]:
        """The LoRA as ComfyUI's LoraLoader reads it (the family's format: kohya names for a UNet, which A1111
        also reads; diffusers' `transformer.` names for Flux), alpha = the real LoRA alpha."""
        return family_named(self.family).export_lora(self.lora, self.alpha)

    @property
    def lora_format(self) -> str:
        return family_named(self.family).lora_format

    def save_lora(self, path: str | Path) -> Path:
        """The LoRA file ComfyUI's LoraLoader reads (see comfy_lora)."""
        meta = {"ss_network_dim": str(self.rank), "ss_network_alpha": str(self.alpha),
                "attencraft_concepts": json.dumps(self.placeholders)}
        return save_safetensors(Path(path), self.comfy_lora(), meta)

    def save_embedding(self, index: int, path: str | Path) -> Path:
        """Concept `index` as a textual-inversion file, one [1, width] row per text tower under the key
        ComfyUI reads: clip_l (SD 1.x), clip_h (SD 2.x), clip_l + clip_g (SDXL), emb_params (other)."""
        concept = self.concepts[index]
        keys = family_named(self.family).embedding_keys(self.family)
        parts = self.embeddings[index].float().split(self.tower_widths)
        return save_safetensors(Path(path), {k: part[None] for k, part in zip(keys, parts)},
                                 {"word": concept.word, "placeholder": concept.placeholder})

    def export(self, out_dir: str | Path, name: str) -> dict[str, Path]:
        """Write the concept set, the LoRA (`<name>_lora_kohya`, or `<name>_lora_diffusers` for Flux) and one
        textual-inversion file per concept into one folder."""
        out = Path(out_dir)
        lora = f"lora_{self.lora_format}"
        files = {"concepts": self.save(out / f"{name}.safetensors"),
                 lora: self.save_lora(out / f"{name}_{lora}.safetensors")}
        for i, concept in enumerate(self.concepts):
            files[concept.placeholder] = self.save_embedding(i, out / f"{name}_c{i}.safetensors")
        return files
