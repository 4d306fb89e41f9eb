"""The concept tokens in every text tower of a component set (one for SD 1.x/2.x, two for SDXL).

One concept's learned embedding is its rows of all towers side by side ([sum of the towers' widths]); that is
what concept sets and checkpoints store, and `widths` says where each tower's part ends.

In training the rows are float32 parameters of their own (`learn`): a forward hook on each tower's token
embedding puts them in place of the table's rows, so the table stays frozen in the tower's dtype (bf16 on a GPU),
and the optimizer holds N rows, not the whole vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .concepts import Concept, add_concept_tokens
from .families import family_of


@dataclass
class ConceptTokens:
    tables: list[torch.nn.Parameter]   # each tower's token-embedding table
    ids: list[list[int]]               # the placeholders' ids in each tower's tokenizer
    embeddings: list[torch.nn.Module] = field(default_factory=list)  # each tower's token-embedding module
    learned: list[torch.nn.Parameter] = field(default_factory=list)  # float32 rows while learning, per tower
    hooks: list = field(default_factory=list)

    @classmethod
    def add(cls, comps, concepts: list[Concept]) -> "ConceptTokens":
        """Add the placeholders to every tower, each row initialised from its concept word in that tower."""
        tables, ids, embeddings = [], [], []
        for tokenizer, encoder in family_of(comps).towers(comps):
            ids.append(add_concept_tokens(tokenizer, encoder, concepts))
            embeddings.append(encoder.get_input_embeddings())
            # T5EncoderModel's encoder reads its own embedding module, which only shares the table's weight with
            # get_input_embeddings(); setting it makes both one module, the one the forward hooks see
            encoder.set_input_embeddings(embeddings[-1])
            tables.append(embeddings[-1].weight)
        return cls(tables, ids, embeddings)

    @property
    def widths(self) -> list[int]:
        return [table.shape[1] for table in self.tables]

    def rows(self) -> torch.Tensor:
        """[N, sum of widths] float32: every concept's rows of all towers, side by side (no gradient)."""
        parts = self.learned or [t.detach()[i] for t, i in zip(self.tables, self.ids)]
        return torch.cat([p.detach().float().cpu() for p in parts], dim=1)

    def set_rows(self, rows: torch.Tensor) -> None:
        """Write concept rows [N, sum of widths] into the towers' tables (and the learned rows while learning)."""
        with torch.no_grad():
            for k, (table, ids, part) in enumerate(zip(self.tables, self.ids, rows.split(self.widths, dim=1))):
                table[ids] = part.to(table)
                if self.learned:
                    self.learned[k].copy_(part)

    def learn(self) -> list[torch.nn.Parameter]:
        """Start learning: float32 copies of the rows, used by the towers in place of the table's rows."""
        for embedding, table, ids in zip(self.embeddings, self.tables, self.ids):
            rows = torch.nn.Parameter(table.detach()[ids].float().clone())
            slot = torch.full((table.shape[0],), -1, dtype=torch.long, device=table.device)
            slot[ids] = torch.arange(len(ids), device=table.device)
            self.learned.append(rows)
            self.hooks.append(embedding.register_forward_hook(
                lambda module, args, out, rows=rows, slot=slot: _put_rows(out, slot[args[0]], rows)))
        return self.learned

    def stop_learning(self) -> None:
        """Write the learned rows into the tables and drop the hooks."""
        rows = self.rows()
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.learned = [], []
        self.set_rows(rows)

    def all_finite(self) -> torch.Tensor:
        """A 0-d bool tensor (no host sync): every concept row is finite."""
        parts = self.learned or [t[i] for t, i in zip(self.tables, self.ids)]
        return torch.stack([torch.isfinite(p).all() for p in parts]).all()


def _put_rows(out: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Token embeddings `out` [B, T, W] with every concept token's vector taken from `rows` (slot >= 0)."""
    chosen = rows[slots.clamp(min=0)].to(out.dtype)
    return torch.where((slots >= 0)[..., None], chosen, out)
