"""The global token set of one EP forward: how many tokens each rank holds, and sums over ranks.

Under EP every rank routes its own tokens, but the auxiliary losses, capacity and metrics are
defined over the global batch: the concatenation, in rank order, of every rank's tokens (all
dp x ep ranks). `GlobalBatch` carries the per-rank token counts (one tiny all-gather per layer
call) and the reductions the routing rules need.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.parallel import comm


@dataclass
class GlobalBatch:
    sizes: list[int]  # tokens on each rank of `group`, in rank order
    rank: int  # this rank's index in `group`
    group: object  # the statistics process group (every rank of the mesh), None on one process

    @classmethod
    def gather(cls, num_tokens: int, group, device) -> GlobalBatch:
        return cls(comm.all_gather_sizes(num_tokens, group, device), comm.group_rank(group), group)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def offset(self) -> int:
        """Global index of this rank's first token."""
        return sum(self.sizes[: self.rank])

    @property
    def local(self) -> int:
        return self.sizes[self.rank]

    @property
    def world(self) -> int:
        return len(self.sizes)

    def sum(self, t: Tensor) -> Tensor:
        """Differentiable global sum (replicated-consumer rule, see comm.global_sum)."""
        return comm.global_sum(t, self.group)

    def sum_nograd(self, t: Tensor) -> Tensor:
        return comm.all_reduce_sum(t, self.group)

    def gather_rows(self, t: Tensor) -> Tensor:
        """Every rank's rows of a per-token tensor, concatenated into the global batch order."""
        if t.dtype == torch.bool:  # gloo reduces and gathers no bool tensors
            return comm.all_gather_rows(t.to(torch.uint8), self.sizes, self.group).bool()
        return comm.all_gather_rows(t, self.sizes, self.group)

    def groups_are_local(self, group_size: int) -> bool:
        """Whether every contiguous group of `group_size` global tokens lies within one rank.

        Then capacity and expert choice, which compete within groups, need no token metadata from
        other ranks (GShard's local group dispatch: num_groups a multiple of the world size with
        equal per-rank batches).
        """
        start = 0
        for n in self.sizes:
            end = start + n
            if n and (start % group_size or (end % group_size and end != self.total)):
                return False
            start = end
        return True
