"""Collectives with the autograd rules EP needs, and a byte/time recorder for benchmarks.

Shape legend: N rows (tokens or slots), D d_model, E experts.

- `all_to_all(x, send, recv, group)`: variable-size `all_to_all_single` as an autograd function;
  backward is the reverse exchange (each gradient row goes back to the rank its row came from).
- `global_sum(t, group)`: all-reduce SUM in forward only. Its backward multiplies the gradient by
  the group size instead of all-reducing it. That is exact when every rank consumes the sum the
  same way (each rank adds the same global aux loss to its loss, which is how the MoE uses it):
  the true backward, all_reduce(g_r), equals W * g when all g_r = g. Keeping collectives out of
  the backward of the statistics means the only collectives in backward are the all-to-alls,
  which the data dependencies order identically on every rank, so no two ranks can block in
  different collectives.
- `all_gather_rows`: variable-size all-gather of metadata (no autograd).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


def group_size(group) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_gather_flat(out: Tensor, local: Tensor, group) -> None:
    # torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name warns).
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, local, group=group)


# ----------------------------------------------------------------------------- recorder


@dataclass
class CommStats:
    """Bytes and seconds spent in collectives (forward and backward) while recording.

    Payload: the token all-to-alls (dispatch, combine and their backward exchanges). Control:
    everything else EP issues (split sizes, routing statistics, metadata gathers), small
    messages whose cost is latency, not bandwidth.
    """

    bytes_sent: int = 0  # payload rows sent to other ranks (self-sends are local copies)
    bytes_received: int = 0  # payload rows received from other ranks
    bytes_total: int = 0  # including the rows a rank keeps for its own experts
    seconds: float = 0.0  # in payload all-to-alls (includes waiting for the slowest peer)
    calls: int = 0
    control_seconds: float = 0.0
    control_calls: int = 0
    per_call: list = field(default_factory=list)  # (kind, bytes_sent) of each payload all-to-all


_RECORDER: list[CommStats] = []


@contextmanager
def record_comm():
    """Collect CommStats for every all-to-all issued inside the block (this process only)."""
    stats = CommStats()
    _RECORDER.append(stats)
    try:
        yield stats
    finally:
        _RECORDER.remove(stats)


def _note(kind: str, x: Tensor, send: list[int], recv: list[int], self_rank: int, seconds: float) -> None:
    if not _RECORDER:
        return
    row_bytes = x.element_size() * math.prod(x.shape[1:])
    total = sum(send) * row_bytes
    sent = total - send[self_rank] * row_bytes
    received = (sum(recv) - recv[self_rank]) * row_bytes
    for s in _RECORDER:
        s.bytes_sent += sent
        s.bytes_received += received
        s.bytes_total += total
        s.seconds += seconds
        s.calls += 1
        s.per_call.append((kind, sent))


@contextmanager
def _control():
    """Time a small collective for the recorder."""
    if not _RECORDER:
        yield
        return
    start = time.perf_counter()
    yield
    seconds = time.perf_counter() - start
    for s in _RECORDER:
        s.control_seconds += seconds
        s.control_calls += 1


# ----------------------------------------------------------------------------- all-to-all


def _a2a(x: Tensor, send: list[int], recv: list[int], group, kind: str) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    start = time.perf_counter()
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    _note(kind, x, send, recv, group_rank(group), time.perf_counter() - start)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], recv: list[int], group, kind: str) -> Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.kind = send, recv, group, kind
        return _a2a(x, send, recv, group, kind)

    @staticmethod
    def backward(ctx, grad: Tensor):
        # The reverse exchange: what rank j received from i goes back from j to i.
        return _a2a(grad, ctx.recv, ctx.send, ctx.group, ctx.kind + "_grad"), None, None, None, None


def all_to_all(x: Tensor, send: list[int], recv: list[int], group, kind: str = "a2a") -> Tensor:
    """Rows [sum(send[:j]), sum(send[:j+1])) of `x` go to rank j of `group`; the result holds the
    rows from rank i at [sum(recv[:i]), ...). Differentiable in `x`."""
    if len(send) != group_size(group) or len(recv) != group_size(group):
        raise ValueError(f"all_to_all: {len(send)} send / {len(recv)} recv splits for a group of {group_size(group)}")
    if sum(send) != x.shape[0]:
        raise ValueError(f"all_to_all: send splits sum to {sum(send)} but x has {x.shape[0]} rows")
    if group_size(group) == 1:
        return x
    return _AllToAll.apply(x, list(send), list(recv), group, kind)


def exchange_counts(counts: Tensor, group) -> Tensor:
    """Equal-size all-to-all of int64 counts: block j of `counts` goes to rank j.

    Sent first so every rank knows its receive split sizes before the payload exchange.
    """
    if group_size(group) == 1:
        return counts
    out = torch.empty_like(counts)
    with _control():
        dist.all_to_all_single(out, counts.contiguous(), group=group)
    return out


# ----------------------------------------------------------------------------- reductions


class _GlobalSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.scale = group_size(group)
        out = t.detach().clone()
        with _control():
            dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        # Replicated consumers (module docstring): all_reduce(grad) == W * grad.
        return grad * ctx.scale, None


def global_sum(t: Tensor, group) -> Tensor:
    """Sum of `t` over the ranks of `group`, differentiable under the replicated-consumer rule."""
    if group_size(group) == 1:
        return t
    return _GlobalSum.apply(t, group)


@torch.no_grad()
def all_reduce_sum(t: Tensor, group) -> Tensor:
    """Non-differentiable sum over `group` (a new tensor)."""
    out = t.detach().clone()
    if group_size(group) > 1:
        with _control():
            dist.all_reduce(out, group=group)
    return out


@torch.no_grad()
def all_gather_sizes(n: int, group, device) -> list[int]:
    if group_size(group) == 1:
        return [n]
    local = torch.tensor([n], dtype=torch.int64, device=device)
    out = torch.empty(group_size(group), dtype=torch.int64, device=device)
    with _control():
        _all_gather_flat(out, local, group)
    return out.tolist()


@torch.no_grad()
def all_gather_rows(t: Tensor, sizes: list[int], group) -> Tensor:
    """Concatenate every rank's `t` (rows differ per rank, as given by `sizes`) in rank order."""
    if group_size(group) == 1:
        return t
    width = max(sizes)
    padded = t.new_zeros((width, *t.shape[1:]))
    padded[: t.shape[0]] = t
    out = t.new_empty((len(sizes) * width, *t.shape[1:]))
    with _control():
        _all_gather_flat(out, padded.contiguous(), group)
    out = out.view(len(sizes), width, *t.shape[1:])
    return torch.cat([out[i, :n] for i, n in enumerate(sizes)])
