"""The concept tokens in every text tower of a component set (one for SD 1.x/2.x, two for SDXL).

One concept's learned embedding is its rows of all towers side by side ([sum of the towers' widths]); that is
what concept sets and checkpoints store, and `widths` says where each tower's part ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .concepts import Concept, add_concept_tokens
from .families import family_of


@dataclass
class ConceptTokens:
    tables: list[torch.nn.Parameter]   # each tower's token-embedding table
    ids: list[list[int]]               # the placeholders' ids in each tower's tokenizer

    @classmethod
    def add(cls, comps, concepts: list[Concept]) -> "ConceptTokens":
        """Add the placeholders to every tower, each row initialised from its concept word in that tower."""
        tables, ids = [], []
        for tokenizer, encoder in family_of(comps).towers(comps):
            ids.append(add_concept_tokens(tokenizer, encoder, concepts))
            tables.append(encoder.get_input_embeddings().weight)
        return cls(tables, ids)

    @property
    def widths(self) -> list[int]:
        return [table.shape[1] for table in self.tables]

    def rows(self) -> torch.Tensor:
        """[N, sum of widths] float32: every concept's rows of all towers, side by side (no gradient)."""
        return torch.cat([t.detach()[i].float().cpu() for t, i in zip(self.tables, self.ids)], dim=1)

    def set_rows(self, rows: torch.Tensor) -> None:
        """Write concept rows [N, sum of widths] into the towers' tables."""
        with torch.no_grad():
            for table, ids, part in zip(self.tables, self.ids, rows.split(self.widths, dim=1)):
                table[ids] = part.to(table)

    def all_finite(self) -> torch.Tensor:
        """A 0-d bool tensor (no host sync): every concept row is finite."""
        return torch.stack([torch.isfinite(t[i]).all() for t, i in zip(self.tables, self.ids)]).all()
