"""Which concepts each training step shows: adaptive (AttenCraft), uniform, or union (Break-A-Scene)."""

from __future__ import annotations

import random

import torch

from .errors import AttenCraftError

POLICIES = ("adaptive", "uniform", "union")


class ConceptSampler:
    """Draws the subset of concept indices for a step from a seeded random.Random."""

    def __init__(self, num_concepts: int, policy: str = "adaptive", all_share: float = 1 / 3, seed: int = 0):
        if policy not in POLICIES:
            raise AttenCraftError(f"Unknown sampling policy {policy!r}: use one of {', '.join(POLICIES)}.")
        if not 0 <= all_share < 1:
            raise AttenCraftError(f"The all-concepts share must be in [0, 1), got {all_share}.")
        self.n, self.policy, self.all_share = num_concepts, policy, all_share
        self.rng = random.Random(seed)
        self.scores = torch.ones(num_concepts)

    def set_scores(self, scores: torch.Tensor) -> None:
        """Attention score per concept (from the latest masks); used by the adaptive policy."""
        self.scores = scores.detach().float().cpu().clamp_min(1e-6)

    def single_weights(self) -> list[float]:
        """Probability of each single-concept prompt (the rest goes to the all-concepts prompt)."""
        if self.policy == "adaptive":
            inverse = 1.0 / self.scores
            return ((1 - self.all_share) * inverse / inverse.sum()).tolist()
        if self.policy == "uniform":
            return [1.0 / (self.n + 1)] * self.n
        raise AttenCraftError("The union policy has no per-concept weights.")

    def ratios(self) -> dict[str, float]:
        """Human-readable shares for logs: each single concept and "all"."""
        if self.policy == "union":
            return {"union": 1.0}
        singles = self.single_weights()
        shares = {f"c{i}": round(w, 4) for i, w in enumerate(singles)}
        shares["all"] = round(1 - sum(singles), 4)
        return shares

    def sample(self) -> list[int]:
        """Concept indices for one step, in random order (the prompt names them in this order)."""
        if self.policy == "union":
            size = self.rng.randint(1, self.n)
            chosen = self.rng.sample(range(self.n), size)
        else:
            weights = self.single_weights()
            options = [[i] for i in range(self.n)] + [list(range(self.n))]
            chosen = list(self.rng.choices(options, weights=weights + [1 - sum(weights)])[0])
            self.rng.shuffle(chosen)
        return chosen

    def state(self) -> dict:
        return {"rng": self.rng.getstate(), "scores": self.scores.tolist()}

    def load_state(self, state: dict) -> None:
        rng = state["rng"]
        self.rng.setstate((rng[0], tuple(rng[1]), rng[2]))
        self.scores = torch.tensor(state["scores"])
