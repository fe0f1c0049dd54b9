"""Expert sharding: slice a full expert stack onto an EP rank, and map state-dict keys back.

Shape legend: E experts, El = E / ep experts per rank, H expert input width (2F when gated),
D d_model, F d_ff.

EP rank r holds experts [r * El, (r + 1) * El), contiguous, so a token's destination rank is
its expert id // El and sorting assignments by expert also sorts them by destination.

- Stacked `Experts`: every parameter has the expert dimension first (w_in (E, H, D),
  w_out (E, D, F), b_in (E, H), b_out (E, D)); a shard is a new `Experts` of El experts whose
  parameters are those rows. State-dict keys are unchanged; only the first dim shrinks.
- `ModuleExperts` (user modules): a shard holds modules [r * El, (r + 1) * El) of the list;
  its state-dict key `experts.<i>.<rest>` is global expert r * El + i.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor, nn

from moekit.layers.experts import Experts, ModuleExperts

_MODULE_KEY = re.compile(r"^experts\.(\d+)\.(.+)$")


def shard_range(num_experts: int, ep_rank: int, ep: int) -> range:
    per = num_experts // ep
    return range(ep_rank * per, (ep_rank + 1) * per)


def shard_experts(experts: nn.Module, ep_rank: int, ep: int) -> nn.Module:
    """The El experts of `ep_rank` as a module of the same kind; shares no storage with `experts`
    for stacked weights (the slices are cloned so the full stack can be freed)."""
    num_experts = experts.num_experts
    if num_experts % ep:
        raise ValueError(f"parallel.ep={ep} must divide num_experts={num_experts}")
    rows = shard_range(num_experts, ep_rank, ep)
    if isinstance(experts, ModuleExperts):
        return ModuleExperts([experts.experts[i] for i in rows], experts.d_model)
    if not isinstance(experts, Experts):
        raise TypeError(f"cannot shard experts of type {type(experts).__name__}; expected Experts or ModuleExperts")
    with torch.device("meta"):  # no init work for weights about to be replaced
        shard = Experts(len(rows), experts.d_model, experts.d_ff, experts.activation,
                        experts.b_in is not None, experts.init_std)
    for name, param in experts.named_parameters(recurse=False):
        if param.shape[0] != num_experts:
            raise ValueError(f"Experts.{name} has shape {tuple(param.shape)}: expected the expert dim first")
        setattr(shard, name, nn.Parameter(param.detach()[rows.start : rows.stop].clone(),
                                          requires_grad=param.requires_grad))
    for name, buf in experts.named_buffers(recurse=False):
        per_expert = buf.shape[:1] == (num_experts,)
        shard.register_buffer(name, buf[rows.start : rows.stop].clone() if per_expert else buf.clone())
    return shard


def is_module_experts(experts: nn.Module) -> bool:
    return isinstance(experts, ModuleExperts)


def local_to_global_key(key: str, offset: int, module_experts: bool) -> str:
    """A key of a shard's state dict (relative to the experts module) in the full layer."""
    if not module_experts:
        return key
    m = _MODULE_KEY.match(key)
    return key if m is None else f"experts.{int(m.group(1)) + offset}.{m.group(2)}"


def slice_full_state(full: dict[str, Tensor], prefix: str, num_experts: int, rows: range,
                     module_experts: bool) -> dict[str, Tensor]:
    """The entries of a full state dict under `prefix` (an experts module) as the shard holds them."""
    out = {}
    for key, value in full.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix):]
        if module_experts:
            m = _MODULE_KEY.match(rest)
            if m is None:
                continue
            e = int(m.group(1))
            if e in rows:
                out[f"{prefix}experts.{e - rows.start}.{m.group(2)}"] = value
        elif value.dim() > 0 and value.shape[0] == num_experts:
            out[key] = value[rows.start : rows.stop]
        else:
            out[key] = value
    return out
