"""The trainer under torchrun: one object the loop asks, the same calls with one process or many.

With `WORLD_SIZE > 1`, `moekit.parallel` builds the mesh, cuts the experts (and a resumed
optimizer's per-expert state) to each rank's shard and replicates the rest with DDP; every rank
reads its own slice of each global batch. With one process every method is the plain
single-process operation.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.train.config import RunConfig


@dataclass
class DistState:
    rank: int = 0
    world: int = 1
    data_rank: int = 0
    data_world: int = 1
    mesh: object = None  # moekit.parallel.Mesh under torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: Tensor) -> Tensor:
        """The mean of `value` over ranks (the global batch's loss, as one process reports it)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(value)
            value /= self.world
        return value

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> Tensor:
        """Clip by the norm of every gradient of the whole (possibly expert-sharded) model."""
        if self.world > 1:
            from moekit.parallel import clip_grad_norm_

            return clip_grad_norm_(model, max_norm)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def full_model(self, model: nn.Module, optimizer):
        """The single-process layout of `model` and `optimizer` while inside (all ranks enter)."""
        if self.world == 1:
            return contextlib.nullcontext()
        from moekit.parallel import full_model

        return full_model(model, optimizer)

    def teardown(self) -> None:
        if self.mesh is not None:
            from moekit.parallel import teardown

            teardown(self.mesh)


def setup_distributed(model: nn.Module, cfg: RunConfig, device: torch.device,
                      optimizer: torch.optim.Optimizer | None = None) -> tuple[nn.Module, DistState]:
    """Single process: nothing to do. Under torchrun: the expert-parallel, data-parallel model."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return model, DistState()
    import torch.distributed as dist

    import moekit.parallel as parallel

    mesh = parallel.setup(cfg.parallel)
    model = parallel.parallelize(model, mesh, optimizer)
    rank, world = dist.get_rank(), dist.get_world_size()
    return model, DistState(rank=rank, world=world, data_rank=rank, data_world=world, mesh=mesh)
