"""The concept-set file (one .safetensors: LoRA + concept embeddings + masks + metadata) and its exports."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .concepts import Concept, add_concept_tokens
from .errors import AttenCraftError
from .lora import load_lora_state_dict, set_lora_strength, to_kohya
from .outputs import atomic_write
from .validation import require_number

FORMAT = "attencraft-concepts/1"
PLACEHOLDER_RE = re.compile(r"<c\d+>")


def embedding_key(family: str) -> str:
    """Key ComfyUI reads from a textual-inversion file: clip_l for SD 1.x, clip_h for SD 2.x."""
    return {"sd1": "clip_l", "sd2": "clip_h"}.get(family, "emb_params")


def _save_safetensors(path: Path, tensors: dict, metadata: dict) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


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

    @property
    def placeholders(self) -> list[str]:
        return [c.placeholder for c in self.concepts]

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
        return _save_safetensors(Path(path), tensors, metadata)

    @classmethod
    def load(cls, path: str | Path) -> "ConceptSet":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise AttenCraftError(f"Concept file {str(path)!r} does not exist.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:
            raise AttenCraftError(f"Cannot read {path} as a safetensors file: {exc}") from exc
        if meta.get("format") != FORMAT:
            raise AttenCraftError(
                f"{path.name} is not an AttenCraft concept file (no '{FORMAT}' metadata). Pass the "
                "<name>.safetensors that `train` wrote, not the kohya LoRA or an embedding.")
        concepts = [Concept(c["word"], c["placeholder"]) for c in json.loads(meta["concepts"])]
        masks = [tensors.get(f"mask.{c.placeholder}") for c in concepts]
        return cls(
            concepts=concepts,
            embeddings=torch.stack([tensors[f"embedding.{c.placeholder}"] for c in concepts]),
            lora={k[5:]: v for k, v in tensors.items() if k.startswith("lora.")},
            rank=int(meta["lora_rank"]), alpha=float(meta["lora_alpha"]), targets=meta["lora_targets"],
            family=meta["base_family"], base_model=meta.get("base_model", ""),
            masks=torch.stack(masks).bool() if all(m is not None for m in masks) else None,
            training=json.loads(meta.get("training", "{}")))

    def check_model(self, comps) -> None:
        """Refuse a model of another family (its LoRA and embeddings would not fit)."""
        dim = comps.text_encoder.get_input_embeddings().weight.shape[1]
        if comps.family != self.family or dim != self.embeddings.shape[1]:
            raise AttenCraftError(
                f"This concept file was trained on a {self.family} model but the model given is {comps.family}. "
                f"Use a {self.family} base model (it was {self.base_model or 'not recorded'}).")

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
        ids = add_concept_tokens(comps.tokenizer, comps.text_encoder, self.concepts)
        with torch.no_grad():
            table = comps.text_encoder.get_input_embeddings().weight
            table[ids] = self.embeddings.to(table)
        load_lora_state_dict(comps.unet, self.lora, self.rank, self.alpha, self.targets)
        set_lora_strength(comps.unet, strength)

    def save_kohya(self, path: str | Path) -> Path:
        """The LoRA in kohya format (what ComfyUI's LoraLoader and A1111 read), alpha = the real LoRA alpha."""
        meta = {"ss_network_dim": str(self.rank), "ss_network_alpha": str(self.alpha),
                "attencraft_concepts": json.dumps(self.placeholders)}
        return _save_safetensors(Path(path), to_kohya(self.lora, self.alpha), meta)

    def save_embedding(self, index: int, path: str | Path) -> Path:
        """Concept `index` as a textual-inversion file: {clip_l|clip_h|emb_params: [1, dim]}."""
        concept = self.concepts[index]
        return _save_safetensors(Path(path), {embedding_key(self.family): self.embeddings[index].float()[None]},
                                 {"word": concept.word, "placeholder": concept.placeholder})

    def export(self, out_dir: str | Path, name: str) -> dict[str, Path]:
        """Write the concept set, the kohya LoRA and one textual-inversion file per concept into one folder."""
        out = Path(out_dir)
        files = {"concepts": self.save(out / f"{name}.safetensors"),
                 "lora_kohya": self.save_kohya(out / f"{name}_lora_kohya.safetensors")}
        for i, concept in enumerate(self.concepts):
            files[concept.placeholder] = self.save_embedding(i, out / f"{name}_c{i}.safetensors")
        return files
