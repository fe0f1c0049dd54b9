"""Expert sharding: cut a full expert stack down to one EP rank's experts, and back.

Shape legend: E experts, El = E / ep experts per rank, H expert input width (2F when gated),
D d_model, F d_ff.

EP rank r holds experts [r * El, (r + 1) * El), contiguous, so a token's destination rank is
its expert id // El and sorting assignments by expert also sorts them by destination.

Sharding is in place: the parameters stay the same `nn.Parameter` objects and only their data
shrinks to the rank's rows (FSDP1 swaps `.data` the same way). An optimizer built before
`parallelize` therefore still points at the parameters the model trains.

- Stacked `Experts`: every parameter has the expert dimension first (w_in (E, H, D),
  w_out (E, D, F), b_in (E, H), b_out (E, D)). State-dict keys are unchanged; only the first
  dim shrinks to El.
- `ModuleExperts` (user modules): the shard keeps modules [r * El, (r + 1) * El) of the list;
  its state-dict key `experts.<i>.<rest>` is global expert r * El + i.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

from moekit.layers.experts import Experts, ModuleExperts

_MODULE_KEY = re.compile(r"^experts\.(\d+)\.(.+)$")


def shard_range(num_experts: int, ep_rank: int, ep: int) -> range:
    per = num_experts // ep
    return range(ep_rank * per, (ep_rank + 1) * per)


def shard_experts_(experts: nn.Module, ep_rank: int, ep: int) -> nn.Module:
    """Keep only `ep_rank`'s El experts, in place; returns `experts`."""
    num_experts = experts.num_experts
    if num_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide num_experts={num_experts}")
    rows = shard_range(num_experts, ep_rank, ep)
    if isinstance(experts, ModuleExperts):
        experts.experts = nn.ModuleList([experts.experts[i] for i in rows])
        experts.num_experts = len(rows)
        return experts
    if not isinstance(experts, Experts):
        raise TypeError(f"cannot shard experts of type {type(experts).__name__}; expected Experts or ModuleExperts")
    for name, param in experts.named_parameters(recurse=False):
        if param.dim() == 0 or param.shape[0] != num_experts:
            raise ValueError(f"Experts.{name} has shape {tuple(param.shape)}: expected the expert dim first")
        # clone: the full stack's storage can be freed.
        param.data = param.data[rows.start : rows.stop].clone()
        param.grad = None
    for name, buf in list(experts.named_buffers(recurse=False)):
        if buf.dim() and buf.shape[0] == num_experts:
            setattr(experts, name, buf[rows.start : rows.stop].clone())
    experts.num_experts = len(rows)
    return experts


def expert_param_names(experts: nn.Module) -> list[str]:
    return [name for name, _ in experts.named_parameters()]


def global_key(key: str, offset: int, module_experts: bool) -> str:
    """A key relative to a shard's experts module, as named in the full layer."""
    if not module_experts:
        return key
    m = _MODULE_KEY.match(key)
    return key if m is None else f"experts.{int(m.group(1)) + offset}.{m.group(2)}"


def local_key(key: str, rows: range, module_experts: bool) -> str | None:
    """A key relative to the full layer's experts module, as the shard names it (None: not held)."""
    if not module_experts:
        return key
    m = _MODULE_KEY.match(key)
    if m is None:
        return key
    e = int(m.group(1))
    return f"experts.{e - rows.start}.{m.group(2)}" if e in rows else None


def slice_rows(value: Tensor, num_experts: int, rows: range, module_experts: bool) -> Tensor:
    """The shard's part of a full stacked-expert tensor (user-module tensors are per expert)."""
    if module_experts or value.dim() == 0 or value.shape[0] != num_experts:
        return value
    return value[rows.start : rows.stop]
