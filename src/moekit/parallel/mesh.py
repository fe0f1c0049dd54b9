"""The dp x ep device mesh: which ranks share experts, which replicate them.

Rank layout (ep is the inner, fastest-varying dimension, so an EP group is a block of
consecutive ranks, i.e. the GPUs of one node under torchrun, where all-to-all rides NVLink):

    rank = dp_rank * ep + ep_rank

    ep_group  ranks of one data-parallel replica, [dp_rank * ep, (dp_rank + 1) * ep): they split
              the experts (ep_rank holds experts [ep_rank * E/ep, (ep_rank + 1) * E/ep)) and
              exchange tokens by all-to-all
    dp_group  ranks holding the same expert shard, {d * ep + ep_rank for d < dp}: their expert
              gradients are reduced together
    stats_group   every rank: routing statistics (load, aux-loss terms, metrics) are reduced over
              the global token set

Each kind of traffic gets its own process group, also when two would hold the same ranks: the
DDP reducer's asynchronous all-reduces on the default group then never interleave with the
all-to-all or statistics collectives, whose order the MoE forward and backward fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moekit.parallel.config import ParallelConfig


@dataclass(eq=False)
class Mesh:
    dp: int
    ep: int
    rank: int
    world_size: int
    device: torch.device
    ep_group: dist.ProcessGroup | None = None
    dp_group: dist.ProcessGroup | None = None
    stats_group: dist.ProcessGroup | None = None
    owns_process_group: bool = False  # setup() initialised the default group, teardown() ends it

    def __deepcopy__(self, memo) -> Mesh:
        # Process groups are handles to the job's communicators, not state to duplicate: a
        # deep copy of an EP model (an EMA copy, an eval copy) shares its mesh.
        return self

    @property
    def dp_rank(self) -> int:
        return self.rank // self.ep

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def ep_ranks(self, dp_rank: int | None = None) -> list[int]:
        d = self.dp_rank if dp_rank is None else dp_rank
        return list(range(d * self.ep, (d + 1) * self.ep))

    def dp_ranks(self, ep_rank: int | None = None) -> list[int]:
        e = self.ep_rank if ep_rank is None else ep_rank
        return [d * self.ep + e for d in range(self.dp)]

    def experts_of(self, num_experts: int, ep_rank: int | None = None) -> range:
        """Global ids of the experts an EP rank holds (contiguous)."""
        check_divisible(num_experts, self.ep)
        e = self.ep_rank if ep_rank is None else ep_rank
        per = num_experts // self.ep
        return range(e * per, (e + 1) * per)

    def __repr__(self) -> str:
        return (
            f"Mesh(dp={self.dp}, ep={self.ep}, rank={self.rank} = dp_rank {self.dp_rank} x ep_rank "
            f"{self.ep_rank}, world_size={self.world_size}, device={self.device})"
        )


def check_divisible(num_experts: int, ep: int, where: str = "") -> None:
    if num_experts % ep:
        at = f" ({where})" if where else ""
        raise ValueError(
            f"parallel.ep={ep} must divide MoEConfig.num_experts={num_experts}{at}: each EP rank holds "
            f"num_experts / ep experts; valid ep values: "
            f"{[d for d in range(1, num_experts + 1) if num_experts % d == 0]}"
        )


_MESH_CACHE: dict[tuple, Mesh] = {}


def build_mesh(dp: int, ep: int, *, device: torch.device | str | None = None,
               timeout: timedelta | None = None) -> Mesh:
    """The mesh for an already-initialised default process group (or a single process).

    Every rank must call this with the same arguments (it creates process groups collectively).
    Meshes are cached per (dp, ep, device), so calling it again is free.
    """
    cfg = ParallelConfig(dp=dp, ep=ep)  # validates the field values
    if not dist.is_available() or not dist.is_initialized():
        cfg.resolve_dp(1)
        return Mesh(1, 1, 0, 1, torch.device(device or "cpu"))
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg.resolve_dp(world)
    if device is None:
        device = _default_device(dist.get_backend())
    device = torch.device(device)
    key = (id(dist.GroupMember.WORLD), dp, ep, str(device))
    if key in _MESH_CACHE:
        return _MESH_CACHE[key]
    kw = {} if timeout is None else {"timeout": timeout}
    mesh = Mesh(dp, ep, rank, world, device)
    # new_group is collective: every rank creates every group, in the same order.
    for d in range(dp):
        group = dist.new_group(list(range(d * ep, (d + 1) * ep)), **kw)
        if d == mesh.dp_rank:
            mesh.ep_group = group
    for e in range(ep):
        group = dist.new_group([d * ep + e for d in range(dp)], **kw)
        if e == mesh.ep_rank:
            mesh.dp_group = group
    mesh.stats_group = dist.new_group(list(range(world)), **kw)
    _MESH_CACHE[key] = mesh
    return mesh


def _default_device(backend: str) -> torch.device:
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def setup(cfg: ParallelConfig | None = None) -> Mesh:
    """Initialise torch.distributed from the torchrun environment (if needed) and build the mesh.

    Outside torchrun (no WORLD_SIZE, or WORLD_SIZE=1) nothing is initialised and a one-rank mesh
    is returned, so the same training script runs unchanged on one process.
    """
    cfg = cfg or ParallelConfig()
    if not isinstance(cfg, ParallelConfig):
        raise TypeError(f"moekit.parallel.setup expects a ParallelConfig, got {type(cfg).__name__}")
    timeout = timedelta(seconds=cfg.timeout_s)
    owns = False
    if not dist.is_initialized():
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            cfg.resolve_dp(1)
            return Mesh(1, 1, 0, 1, torch.device("cpu"))
        backend = cfg.resolve_backend()
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise ValueError("parallel.backend='nccl' needs CUDA; use 'gloo' (or 'auto') on CPU")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)
        owns = True
    world = dist.get_world_size()
    dp = cfg.resolve_dp(world)
    mesh = build_mesh(dp, cfg.ep, timeout=timeout)
    mesh.owns_process_group = mesh.owns_process_group or owns
    return mesh


def teardown(mesh: Mesh | None = None) -> None:
    """End the process group that `setup` started (a no-op for a one-rank mesh)."""
    if dist.is_initialized() and (mesh is None or mesh.owns_process_group):
        # Every rank arrives before any tears down: gloo aborts a process ("terminate called
        # without an active exception") whose peer closes its sockets while it is still live.
        if dist.get_world_size() > 1:
            dist.barrier()
        _MESH_CACHE.clear()
        dist.destroy_process_group()
