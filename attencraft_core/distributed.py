"""Training on several processes, launched by `accelerate launch --num_processes N` or `torchrun
--nproc_per_node N`: which process this is, and the collectives the trainer needs, all through Hugging Face
accelerate (gloo on CPUs, NCCL or the accelerator's own backend on GPUs). In a single process every collective
is the identity and accelerate is not imported."""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch


def launched_processes() -> int:
    """How many processes the launcher started (WORLD_SIZE, set by torchrun and accelerate launch)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def launched_rank() -> int:
    """This process's rank among them (RANK; 0 without a launcher)."""
    try:
        return max(0, int(os.environ.get("RANK", "0")))
    except ValueError:
        return 0


@dataclass
class Processes:
    """This process's place among the run's processes. `ranks` are the draw streams this process computes: its
    own rank under a launcher; all of 0..count-1 in `simulated(count)`, which computes on one process what
    `count` processes compute together (the tests compare the two)."""

    rank: int = 0
    count: int = 1
    state: object = None  # accelerate's PartialState when launched on several processes
    simulated_ranks: int = 0

    @classmethod
    def from_environment(cls, device: torch.device) -> "Processes":
        """One process, or the launcher's processes (accelerate initialises the process group)."""
        if launched_processes() <= 1:
            return cls()
        from accelerate import PartialState  # on use: a single process never imports it

        state = PartialState(cpu=device.type == "cpu")
        return cls(state.process_index, state.num_processes, state)

    @classmethod
    def simulated(cls, count: int) -> "Processes":
        return cls(simulated_ranks=count)

    @property
    def ranks(self) -> list[int]:
        return list(range(self.simulated_ranks)) if self.simulated_ranks else [self.rank]

    @property
    def total(self) -> int:
        """The draws one step averages over, all processes together."""
        return self.simulated_ranks or self.count

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.state is not None

    def device(self, requested: torch.device) -> torch.device:
        """The device this process trains on: under a launcher on accelerators, its own (accelerate's choice)."""
        return self.state.device if self.distributed and requested.type != "cpu" else requested

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over the processes in one collective. A parameter no process gave a
        gradient keeps none (as in one process: the optimizer then leaves it alone)."""
        if not self.distributed or not params:
            return
        from accelerate.utils import reduce

        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          for p in params] + [torch.tensor([float(p.grad is not None) for p in params],
                                                           device=params[0].device)])
        flat = reduce(flat, reduction="sum")
        offset = 0
        has_grad = flat[-len(params):]
        for i, p in enumerate(params):
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).to(p.dtype) if has_grad[i] > 0 else None
            offset += n

    def from_main(self, obj):
        """The main process's `obj` on every process."""
        if not self.distributed:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def gather(self, obj) -> list:
        """Every process's `obj`, in rank order, on every process."""
        if not self.distributed:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def main_first(self):
        """Run the block on the main process first, then on the others (e.g. fill a cache once)."""
        return self.state.main_process_first() if self.distributed else nullcontext()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank `rank`'s draws: the run's seed itself for rank 0 (one process draws as before), a
    derived one for the others."""
    if rank == 0:
        return seed
    return int(hashlib.sha256(f"{seed}:{rank}".encode()).hexdigest()[:15], 16)
