"""Sort-based permutation helpers for dispatch. None of them syncs with the host.

Shape legend: N assignments (token, expert pairs), E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def expert_counts(expert_idx_N: Tensor, num_experts: int, weight_N: Tensor | None = None) -> Tensor:
    """Assignments per expert, (E,) int64 (or float32 when `weight_N` masks some out).

    `index_add_` into a fixed-size buffer instead of `bincount`, whose output size depends on
    the data and forces a device sync on CUDA.
    """
    if weight_N is None:
        ones = torch.ones_like(expert_idx_N, dtype=torch.int64)
        return torch.zeros(num_experts, dtype=torch.int64, device=expert_idx_N.device).index_add_(
            0, expert_idx_N, ones
        )
    return torch.zeros(num_experts, dtype=torch.float32, device=expert_idx_N.device).index_add_(
        0, expert_idx_N, weight_N.float()
    )


def sort_by_expert(expert_idx_N: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor]:
    """Stable argsort by expert id; returns (order_N, counts_E, offs_E int32 cumulative counts)."""
    order_N = torch.argsort(expert_idx_N, stable=True)
    counts_E = expert_counts(expert_idx_N, num_experts)
    offs_E = torch.cumsum(counts_E, dim=0).to(torch.int32)
    return order_N, counts_E, offs_E


def inverse_permutation(order_N: Tensor) -> Tensor:
    """inverse[order[i]] = i, by one scatter (no second sort)."""
    arange_N = torch.arange(order_N.numel(), device=order_N.device, dtype=order_N.dtype)
    return torch.empty_like(order_N).scatter_(0, order_N, arange_N)


def positions_in_bucket(bucket_N: Tensor, num_buckets: int) -> Tensor:
    """For assignments listed in priority order, each one's arrival rank within its bucket.

    A stable sort by bucket keeps priority order inside each bucket; the rank minus the bucket's
    start offset is the position. O(N log N) and O(N) memory, unlike a (N, E) one-hot cumsum.
    """
    order_N = torch.argsort(bucket_N, stable=True)
    counts = expert_counts(bucket_N, num_buckets)
    starts = torch.cumsum(counts, dim=0) - counts  # exclusive prefix sum
    return inverse_permutation(order_N) - starts.index_select(0, bucket_N)
