"""Which path one MoE forward takes: decided once, before routing, and handed to the router and
the dispatch. Nothing else in a forward asks "is this a decode call?".

Paths of the expert compute (`Path`):

- `NATIVE_DECODE`: a few tokens (at most `ops/decode.DECODE_MAX_TOKENS`) without gradient, on
  CPU, eager, native kernels built, dropless token choice: sort, gather, both grouped products,
  activation, gate and combine in one native call (`ops/native.decode_ffn`). Where the router
  declined some assignments (GShard's random second expert, in training) the rows go through
  `TORCH_DECODE` instead, which weights them to zero.
- `TORCH_DECODE`: the same calls in a compiled graph or without the native kernel: the rows,
  sorted by expert, through the custom op `ops/decode.routed_ffn_decode`.
- `ROUTED`: `ops/routed.routed_ffn`, the differentiable op (training, many tokens, any device),
  dropless or with the padded (E, C) layout of capacity and expert choice; for LoRA experts
  (layers/lora.py) `ops/routed_lora.routed_ffn_lora`, at every token count.
- `PIECES`: stacked experts with biases: gather, the experts' grouped (or padded) products,
  gate and scatter-add as plain differentiable torch ops.
- `MODULES`: user modules, one call per expert (`ModuleExperts`).

Soft MoE mixes slots and always calls the experts' padded form, whatever the path.

Shape legend: T tokens, D d_model, H first-projection width, F down-projection width.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.layers.experts import ModuleExperts
from moekit.ops import decode


class Path(enum.Enum):
    NATIVE_DECODE = "native_decode"
    TORCH_DECODE = "torch_decode"
    ROUTED = "routed"
    PIECES = "pieces"
    MODULES = "modules"


@dataclass(frozen=True)
class Plan:
    path: Path
    compute_dtype: torch.dtype  # the experts' dtype: autocast's when it is on, else their weights'
    capacity_factor: float | None  # token choice with capacity (layers/capacity.py); None = dropless
    router_decode: bool  # a few tokens on CPU, eager, no gradient through the router, kernels built

    @property
    def decode(self) -> bool:
        return self.path in (Path.NATIVE_DECODE, Path.TORCH_DECODE)


def router_requires_grad(router: nn.Module) -> bool:
    return any(p.requires_grad for p in router.parameters(recurse=False))


def _router_grad(x_TD: Tensor, router: nn.Module) -> bool:
    """Whether a gradient must flow through the router here (the parameters are looked at only
    with grad mode on: at decode, under no_grad, this is one call)."""
    return torch.is_grad_enabled() and (x_TD.requires_grad or router_requires_grad(router))


def _few_cpu_tokens(x_TD: Tensor) -> bool:
    return x_TD.device.type == "cpu" and 0 < x_TD.shape[0] <= decode.DECODE_MAX_TOKENS


def router_decode_ok(x_TD: Tensor, router: nn.Module) -> bool:
    """Whether a router may take its native one-call form on these tokens (the router half of
    the decision; `make_plan` computes it once per layer forward, a router called on its own
    asks here)."""
    if not _few_cpu_tokens(x_TD) or torch.compiler.is_compiling() or _router_grad(x_TD, router):
        return False
    return decode.native_ready()


def make_plan(x_TD: Tensor, router: nn.Module, experts: nn.Module, cfg, training: bool,
              compute_dtype: torch.dtype, masked: bool = False) -> Plan:
    """The path of one forward of an MoE layer on x_TD (T, D); see the module docstring.
    `masked`: some tokens are padding (their losses need the router's torch form)."""
    factor = cfg.active_capacity_factor(training) if router.kind == "token" else None
    few = _few_cpu_tokens(x_TD)
    router_grad = few and _router_grad(x_TD, router)  # (only asked where it can matter)
    native = few and not torch.compiler.is_compiling() and decode.native_ready()
    router_decode = native and not masked and not router_grad
    if isinstance(experts, ModuleExperts):
        path = Path.MODULES
    elif not experts.fused:
        path = Path.PIECES
    elif (few and router.kind == "token" and factor is None and not getattr(experts, "low_rank", False)
          and decode.decode_applies(x_TD, compute_dtype, experts.widths,
                                    router_grad or (torch.is_grad_enabled() and experts.requires_grad))):
        path = Path.NATIVE_DECODE if native else Path.TORCH_DECODE
    else:
        path = Path.ROUTED
    return Plan(path, compute_dtype, factor, router_decode)
