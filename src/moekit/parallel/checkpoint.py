"""Checkpoints that do not care how many ranks wrote them: always the single-process layout.

Shape legend: E experts, El = E / ep experts on this rank.

A checkpoint holds the full model (every expert), under the names the single-process model
uses, so `moekit generate`, `from_hf`/`to_hf` and a run on any other mesh read it unchanged.

- `full_model(model, optimizer)`: a context manager (collective on entry) inside which every EP
  layer holds all E experts, the optimizer's per-expert state too. Save or load inside it with
  the ordinary `model.state_dict()` / `load_state_dict()` and optimizer calls; on exit each rank
  cuts back to its shard from whatever the full tensors hold then (so a load inside it lands
  on every rank's shard). Stacked experts only.
- `full_state_dict(model)` (collective) and `load_full_state_dict(model, state)`: the same as
  plain dicts, for stacked and user-module experts.
- `shard_optimizer_state_(optimizer, model)`: cut full-size expert state (a single-process
  checkpoint loaded before `parallelize`) to the shards.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moekit.layers.experts import ModuleExperts
from moekit.parallel import comm
from moekit.parallel.ep_moe import EPMoE
from moekit.parallel.modules import ep_layers, unwrap
from moekit.parallel.sharding import global_key, local_key, slice_rows


@torch.no_grad()
def _gather_rows(t: Tensor, layer: EPMoE) -> Tensor:
    """(El, ...) on each EP rank -> (E, ...) in expert order (group rank = ep_rank)."""
    mesh = layer.mesh
    if mesh.ep == 1:
        return t.clone()
    out = t.new_empty((t.shape[0] * mesh.ep, *t.shape[1:]))
    comm._all_gather_flat(out, t.contiguous(), mesh.ep_group)
    return out


def _is_row_state(value, param: Tensor, rows: int) -> bool:
    """An optimizer state tensor laid out like the parameter (Adam's moments), rows experts long."""
    return (isinstance(value, Tensor) and value.dim() == param.dim() and value.dim() > 0
            and value.shape[0] == rows and value.shape[1:] == param.shape[1:])


@contextmanager
def full_model(model: nn.Module, optimizer: torch.optim.Optimizer | None = None):
    """Inside: every EP layer of `model` holds all experts (see module docstring). Call on every rank."""
    layers = [layer for _, layer in ep_layers(model)]
    for layer in layers:
        if isinstance(layer.experts, ModuleExperts):
            raise ValueError("full_model needs stacked experts; for user-module experts use "
                             "full_state_dict / load_full_state_dict")
    saved_grads = []
    for layer in layers:
        local, full = layer.num_local_experts, layer.cfg.num_experts
        for p in layer.experts.parameters():
            saved_grads.append((p, p.grad))
            p.grad = None
            state = optimizer.state.get(p, {}) if optimizer is not None else {}
            for key in sorted(state):
                if _is_row_state(state[key], p, local):
                    state[key] = _gather_rows(state[key], layer)
            p.data = _gather_rows(p.data, layer)
        layer.experts.num_experts = full
    try:
        yield model
    finally:
        for layer in layers:
            rows, full = layer.expert_range, layer.cfg.num_experts
            for p in layer.experts.parameters():
                state = optimizer.state.get(p, {}) if optimizer is not None else {}
                for key in list(state):
                    if _is_row_state(state[key], p, full):
                        state[key] = state[key][rows.start : rows.stop].clone()
                p.data = p.data[rows.start : rows.stop].clone()
            layer.experts.num_experts = len(rows)
        for p, g in saved_grads:
            p.grad = g


def _expert_prefixes(model: nn.Module) -> list[tuple[str, EPMoE]]:
    return [((f"{name}." if name else "") + "experts.", layer) for name, layer in ep_layers(model)]


def _owner(key: str, prefixes: list[tuple[str, EPMoE]]) -> tuple[str, EPMoE] | None:
    for prefix, layer in prefixes:
        if key.startswith(prefix):
            return prefix, layer
    return None


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The single-process state dict of an EP model, on every rank (collective)."""
    root = unwrap(model)
    local = root.state_dict()
    prefixes = _expert_prefixes(root)
    if not prefixes:
        return dict(local)
    out: dict[str, Tensor] = {}
    module_parts: dict[str, Tensor] = {}
    mesh = prefixes[0][1].mesh
    for key, value in local.items():
        owner = _owner(key, prefixes)
        if owner is None:
            out[key] = value
            continue
        prefix, layer = owner
        if isinstance(layer.experts, ModuleExperts):
            module_parts[prefix + global_key(key[len(prefix):], layer.expert_range.start, True)] = value.cpu()
        else:
            out[key] = _gather_rows(value, layer)
    if any(isinstance(layer.experts, ModuleExperts) for _, layer in prefixes):
        parts: list = [None] * mesh.ep
        if mesh.ep > 1:
            dist.all_gather_object(parts, module_parts, group=mesh.ep_group)
        else:
            parts = [module_parts]
        for part in parts:
            out.update(part)
    return out


def local_state_dict(model: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    """The part of a single-process state dict this rank's (sharded) model holds."""
    prefixes = _expert_prefixes(unwrap(model))
    out = {}
    for key, value in full.items():
        owner = _owner(key, prefixes)
        if owner is None:
            out[key] = value
            continue
        prefix, layer = owner
        module_experts = isinstance(layer.experts, ModuleExperts)
        rest = local_key(key[len(prefix):], layer.expert_range, module_experts)
        if rest is not None:
            out[prefix + rest] = slice_rows(value, layer.cfg.num_experts, layer.expert_range, module_experts)
    return out


def load_full_state_dict(model: nn.Module, full: dict[str, Tensor], strict: bool = True):
    """Load a single-process state dict (any checkpoint moekit writes) into an EP model."""
    return unwrap(model).load_state_dict(local_state_dict(model, full), strict=strict)


@torch.no_grad()
def shard_optimizer_state_(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Cut full-size per-expert optimizer state to this rank's experts (after sharding)."""
    for _, layer in ep_layers(model):
        if isinstance(layer.experts, ModuleExperts):
            continue  # per-module parameters: state already belongs to the kept modules
        rows, full = layer.expert_range, layer.cfg.num_experts
        for p in layer.experts.parameters():
            state = optimizer.state.get(p)
            if not state:
                continue
            for key in list(state):
                if _is_row_state(state[key], p, full):
                    state[key] = state[key][rows.start : rows.stop].clone()
