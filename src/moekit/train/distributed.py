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


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 without torchrun), known before any process
    group exists: the trainer decides from it who may touch the output folder."""
    return int(os.environ.get("RANK", "0"))


def check_launch(cfg: RunConfig, command: str = "train") -> None:
    """Refuse a `parallel` section the launch cannot honour, before anything else happens: without
    torchrun there is one process, and parallel.ep / parallel.dp above 1 would be silently ignored."""
    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ep, dp = getattr(p, "ep", 1), getattr(p, "dp", None)
    if world == 1 and (ep > 1 or (dp or 1) > 1):
        need = ep * (dp or 1)
        what = " x ".join(f"parallel.{k}={v}" for k, v in (("dp", dp), ("ep", ep)) if v is not None and v > 1)
        if command == "train":
            how = (f"launch it with `torchrun --nproc-per-node {need} -m moekit train ...`, "
                   f"or set parallel.ep=1 for one process")
        else:  # compare trains each variant in one process
            how = f"moekit {command} trains in single processes: set parallel.ep=1"
        raise ValueError(f"{what} needs {need} processes, but this is a single process (not under torchrun); {how}")
    if world > 1 and hasattr(p, "resolve_dp"):
        p.resolve_dp(world)  # dp x ep must equal the world size; the error names the fields


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
