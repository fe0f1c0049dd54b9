"""Expert nonlinearities: the one list of them, which are gated, their Python forward, and the
backward of `gate * act(h)` written for few passes and buffers.

Shape legend: N rows, H = 2F hidden width for gated activations (gate columns first, then up
columns, the layout of `transformers`' Mixtral `gate_up_proj`) and H = F otherwise, F the width
fed to the down projection; g (N, 1) the router's combine weight of each row.

Why not autograd: for SwiGLU autograd keeps silu(gate) besides h, and its backward builds the
gate and up gradients in two tensors and then concatenates them (`SplitBackward` -> `cat`), one
more pass over an (N, H) tensor. On the benchmark CPU every fresh tensor of tens of MB costs as
much again in page faults as the arithmetic (docs/performance.md), so `scaled_act_backward`
writes both halves in place into one (N, H) buffer, takes the gate gradient from a product it
forms anyway, and returns g * act(h) in the buffer of the recomputed act(gate).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# The order is the native kernel's activation codes (ops/grouped_gemv.c): append, never reorder.
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")
GATED = ("swiglu", "geglu")  # H = 2F: gate columns first, then up columns


def check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {list(ACTIVATIONS)}")


def hidden_width(d_ff: int, activation: str) -> int:
    """H, the width of the first projection: 2F for the gated activations (gate and up), else F."""
    return 2 * d_ff if activation in GATED else d_ff


def activate(h: Tensor, activation: str) -> Tensor:
    """act(h), differentiable through autograd: gated activations split H into (gate, up)."""
    if activation in GATED:
        gate, up = h.chunk(2, dim=-1)
        return _nonlinearity(gate, activation) * up
    check_activation(activation)
    return _nonlinearity(h, activation)


def _nonlinearity(z: Tensor, activation: str) -> Tensor:
    # SwiGLU / GeGLU: Shazeer 2020, "GLU Variants Improve Transformer", eq. 5-6.
    if activation in ("swiglu", "silu"):
        return F.silu(z)
    if activation == "geglu":
        return F.gelu(z, approximate="tanh")
    if activation == "gelu":
        return F.gelu(z)
    return F.relu(z)


def _nonlinearity_backward_(grad: Tensor, z: Tensor, activation: str) -> Tensor:
    """grad * act'(z), written into `grad` (same-location in/out is allowed elementwise)."""
    if activation in ("swiglu", "silu"):
        return torch.ops.aten.silu_backward.grad_input(grad, z, grad_input=grad)
    if activation in ("geglu", "gelu"):
        approximate = "tanh" if activation == "geglu" else "none"
        return torch.ops.aten.gelu_backward.grad_input(grad, z, approximate=approximate, grad_input=grad)
    return torch.ops.aten.threshold_backward.grad_input(grad, z, 0, grad_input=grad)


def _nonlinearity_out(z: Tensor, activation: str, out: Tensor) -> Tensor:
    if activation in ("swiglu", "silu"):
        return torch.ops.aten.silu.out(z, out=out)
    if activation in ("geglu", "gelu"):
        return torch.ops.aten.gelu.out(z, approximate="tanh" if activation == "geglu" else "none", out=out)
    return torch.clamp_min(z, 0, out=out)


def act_forward(h_NH: Tensor, activation: str, out: Tensor | None = None) -> Tensor:
    """a = act(h), (N, F): one fresh tensor, or written into `out` (a reused workspace buffer);
    the gated product is formed in place."""
    check_activation(activation)
    if activation in GATED:
        width = h_NH.shape[-1] // 2
        gate = h_NH[:, :width]
        a = _nonlinearity(gate, activation) if out is None else _nonlinearity_out(gate, activation, out)
        return a.mul_(h_NH[:, width:])
    return _nonlinearity(h_NH, activation) if out is None else _nonlinearity_out(h_NH, activation, out)


def rowdot(a_NF: Tensor, b_NF: Tensor) -> Tensor:
    """Per-row dot product (N,). `vecdot` (a product pass and a row sum) rather than a batched
    (1, F) @ (F, 1) `bmm`, several times slower on CPU (docs/performance.md, "Numbers behind the code")."""
    return torch.linalg.vecdot(a_NF, b_NF)


def scaled_act_backward(
    dga_NF: Tensor,
    h_NH: Tensor,
    gate_N1: Tensor,
    activation: str,
    dh_out: Tensor | None = None,
    ga_out: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of ga = g * act(h) given dga = dL/d(ga).

    Returns (dL/dh (N, H), dL/dg (N,), ga (N, F)), written into `dh_out` / `ga_out` when given;
    overwrites `dga_NF`. dL/dg = <dga, act(h)>; dL/dh = act'(h)^T (g * dga).
    """
    check_activation(activation)
    if activation in GATED:
        width = h_NH.shape[-1] // 2
        gate_NF, up_NF = h_NH[:, :width], h_NH[:, width:]
        act_NF = _nonlinearity(gate_NF, activation)  # recomputed, not kept from the forward
        dh_NH = torch.empty_like(h_NH) if dh_out is None else dh_out
        dgate_NF, dup_NF = dh_NH[:, :width], dh_NH[:, width:]
        torch.mul(dga_NF, act_NF, out=dup_NF)
        grad_gate_N = rowdot(dup_NF, up_NF)  # <dga * act(gate), up> = <dga, act(gate) * up>
        dup_NF.mul_(gate_N1)  # d up = g * dga * act(gate)
        torch.mul(dga_NF.mul_(gate_N1), up_NF, out=dgate_NF)
        _nonlinearity_backward_(dgate_NF, gate_NF, activation)  # d gate = act'(gate) * g * dga * up
        ga_NF = torch.mul(act_NF, up_NF, out=act_NF if ga_out is None else ga_out).mul_(gate_N1)
        return dh_NH, grad_gate_N, ga_NF
    act_NF = _nonlinearity(h_NH, activation)
    grad_gate_N = rowdot(dga_NF, act_NF)
    ga_NF = torch.mul(act_NF, gate_N1, out=act_NF if ga_out is None else ga_out)
    dh_NH = _nonlinearity_backward_(dga_NF.mul_(gate_N1), h_NH, activation)
    if dh_out is not None:
        dh_NH = dh_out.copy_(dh_NH)
    return dh_NH, grad_gate_N, ga_NF
