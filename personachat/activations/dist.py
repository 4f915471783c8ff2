"""This process's place in a multi-process run (``accelerate launch`` / ``torchrun``).

Work is sharded by rank and accumulators are summed across processes (``torch.distributed``,
gloo on CPU); a single process needs none of it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place in a multi-process run (``accelerate launch``/``torchrun``)."""

    rank: int = 0
    world: int = 1

    @classmethod
    def from_env(cls) -> Dist:
        """Single process unless ``WORLD_SIZE`` > 1; then joins the process group (gloo on CPU)."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        import torch.distributed as tdist

        if not tdist.is_initialized():
            from accelerate import PartialState

            PartialState()  # initialises the default process group from the launcher's env
        return cls(rank=tdist.get_rank(), world=tdist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[Any]) -> list[Any]:
        return list(items[self.rank :: self.world])

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over all processes (same shape on every process)."""
        if self.world == 1:
            return tensor
        import torch.distributed as tdist

        work = tensor.cuda() if tdist.get_backend() == "nccl" else tensor.clone()
        tdist.all_reduce(work)
        return work.to(tensor.device)

    def gather(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in rank order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as tdist

        out: list[Any] = [None] * self.world
        tdist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as tdist

            tdist.barrier()
