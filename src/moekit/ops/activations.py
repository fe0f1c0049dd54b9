"""Expert nonlinearities with a hand-written backward that makes few passes over memory.

Shape legend: N rows, H = 2F hidden width for gated activations (gate columns first, then up
columns, the layout of `transformers`' Mixtral `gate_up_proj`) and H = F otherwise, F the width
fed to the down projection.

Why not autograd: for SwiGLU autograd saves silu(gate) besides h, and its backward builds the
gate and up gradients in two tensors and then concatenates them (`SplitBackward` -> `cat`), one
more pass over an (N, H) tensor. Here the two halves are written in place into one (N, H)
buffer, and `act_forward` hands back the tensor its backward reuses (silu(gate)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GATED = ("swiglu", "geglu")
ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")


def act_forward(h_NH: Tensor, activation: str, keep: bool = False) -> tuple[Tensor, Tensor | None]:
    """a = act(h) as a fresh (N, F) tensor; with `keep`, also act(gate) for `act_backward`.

    Without `keep` the gated product is formed in place: one (N, F) allocation, not two.
    """
    if activation in GATED:
        width = h_NH.shape[-1] // 2
        gate_NF, up_NF = h_NH[:, :width], h_NH[:, width:]
        # SwiGLU / GeGLU: Shazeer 2020, "GLU Variants Improve Transformer", eq. 5-6.
        if activation == "swiglu":
            act_NF = F.silu(gate_NF)
        else:
            act_NF = F.gelu(gate_NF, approximate="tanh")
        if keep:
            return act_NF * up_NF, act_NF
        return act_NF.mul_(up_NF), None
    if activation == "gelu":
        return F.gelu(h_NH), None
    if activation == "relu":
        return F.relu(h_NH), None
    if activation == "silu":
        return F.silu(h_NH), None
    raise ValueError(f"unknown activation {activation!r}; allowed: {list(ACTIVATIONS)}")


def act_backward(da_NF: Tensor, h_NH: Tensor, act_NF: Tensor | None, activation: str) -> Tensor:
    """dL/dh from dL/da; `act_NF` is the second output of `act_forward` (None if not gated)."""
    if activation in GATED:
        width = h_NH.shape[-1] // 2
        gate_NF, up_NF = h_NH[:, :width], h_NH[:, width:]
        dh_NH = torch.empty_like(h_NH)
        dgate_NF, dup_NF = dh_NH[:, :width], dh_NH[:, width:]
        torch.mul(da_NF, act_NF, out=dup_NF)  # d up = da * act(gate)
        torch.mul(da_NF, up_NF, out=dgate_NF)  # then d gate = act'(gate) * (da * up), in place
        if activation == "swiglu":
            torch.ops.aten.silu_backward.grad_input(dgate_NF, gate_NF, grad_input=dgate_NF)
        else:
            torch.ops.aten.gelu_backward.grad_input(dgate_NF, gate_NF, approximate="tanh", grad_input=dgate_NF)
        return dh_NH
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(da_NF, h_NH)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(da_NF, h_NH, 0)
    if activation == "silu":
        return torch.ops.aten.silu_backward(da_NF, h_NH)
    raise ValueError(f"unknown activation {activation!r}; allowed: {list(ACTIVATIONS)}")
