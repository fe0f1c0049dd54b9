"""Expert kinds that hold weights: stacked feed-forward weights (E, ...) and user modules.

Shape legend: N routed rows sorted by expert, E experts, D d_model, F d_ff (one expert's width),
H = 2F for gated activations (gate rows first, then up rows, the layout `transformers` uses for
Mixtral's `gate_up_proj`) and F otherwise, C rows per expert in a padded buffer.

An expert kind holds weights and answers small, named calls; which path a forward takes is
decided once, by the dispatch (layers/plan.py):

- `fused`: whether its weights run through the fused routed ops (ops/routed.py, ops/decode.py),
  which then take `weights(dtype)`, the (E, H, D) and (E, D, F) stacks in the compute dtype;
- `forward_grouped(x_ND, offs_E, expert_N)`: rows sorted by expert, group boundaries in `offs`;
- `forward_padded(x_ECD)`: a fixed-size (E, C, D) buffer (capacity, expert choice, Soft MoE);
- `forward_one(e, x_ND)`: one expert on its rows (references, shared experts).

A new expert kind (quantized weights, LoRA on experts) is one new class answering these calls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from moekit.ops.activations import activate, hidden_width
from moekit.ops.grouped import grouped_mm


class Experts(nn.Module):
    """E feed-forward experts whose weights are stacked: w_in (E, H, D), w_out (E, D, F)."""

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        activation: str = "swiglu",
        bias: bool = False,
        init_std: float = 0.02,
    ):
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        hidden = hidden_width(d_ff, activation)
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden, d_model))  # (E, H, D)
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff))  # (E, D, F)
        self.b_in = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.init_std)
        nn.init.normal_(self.w_out, std=self.init_std)
        for b in (self.b_in, self.b_out):
            if b is not None:
                nn.init.zeros_(b)

    @property
    def fused(self) -> bool:
        """The fused routed ops take these experts: plain stacked weights, no biases."""
        return self.b_in is None and self.b_out is None

    @property
    def widths(self) -> tuple[int, int, int]:
        """(D, H, F): the model width, the first projection's width and the down projection's."""
        return self.d_model, self.w_in.shape[1], self.w_out.shape[2]

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(w_in (E, H, D), w_out (E, D, F)) in `dtype`: the parameters themselves when they are
        already in it, a differentiable cast otherwise (a copy of every expert's weights, so the
        dispatch asks only once it knows the path needs them)."""
        w_in, w_out = self.w_in, self.w_out
        if w_in.dtype != dtype or w_out.dtype != dtype:
            w_in, w_out = w_in.to(dtype), w_out.to(dtype)
        return w_in, w_out

    @property
    def requires_grad(self) -> bool:
        return self.w_in.requires_grad or self.w_out.requires_grad

    def forward_grouped(self, x_ND: Tensor, offs_E: Tensor, expert_N: Tensor) -> Tensor:
        w_in, w_out = self.w_in.to(x_ND.dtype), self.w_out.to(x_ND.dtype)
        h_NH = grouped_mm(x_ND, w_in.transpose(1, 2), offs_E)
        if self.b_in is not None:
            h_NH = h_NH + self.b_in.to(x_ND.dtype)[expert_N]
        a_NF = activate(h_NH, self.activation)
        y_ND = grouped_mm(a_NF, w_out.transpose(1, 2), offs_E)
        if self.b_out is not None:
            y_ND = y_ND + self.b_out.to(x_ND.dtype)[expert_N]
        return y_ND

    def forward_padded(self, x_ECD: Tensor) -> Tensor:
        w_in, w_out = self.w_in.to(x_ECD.dtype), self.w_out.to(x_ECD.dtype)
        h_ECH = torch.bmm(x_ECD, w_in.transpose(1, 2))
        if self.b_in is not None:
            h_ECH = h_ECH + self.b_in.to(x_ECD.dtype).unsqueeze(1)
        a_ECF = activate(h_ECH, self.activation)
        y_ECD = torch.bmm(a_ECF, w_out.transpose(1, 2))
        if self.b_out is not None:
            y_ECD = y_ECD + self.b_out.to(x_ECD.dtype).unsqueeze(1)
        return y_ECD

    def forward_one(self, e: int, x_ND: Tensor) -> Tensor:
        """One expert on its rows: the plain FFN, used by references and tests."""
        h = x_ND @ self.w_in[e].to(x_ND.dtype).t()
        if self.b_in is not None:
            h = h + self.b_in[e].to(x_ND.dtype)
        y = activate(h, self.activation) @ self.w_out[e].to(x_ND.dtype).t()
        if self.b_out is not None:
            y = y + self.b_out[e].to(x_ND.dtype)
        return y

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.w_in.dtype

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}"


class ModuleExperts(nn.Module):
    """Any list of user modules mapping (n, D) -> (n, D): an expert can be a whole network.

    Slower than stacked weights (one call per expert, host-side offsets) but exact.
    """

    fused = False

    def __init__(self, experts: Sequence[nn.Module], d_model: int):
        super().__init__()
        if len(experts) == 0:
            raise ValueError("MoE(experts=...) needs at least one expert module")
        for i, m in enumerate(experts):
            if not isinstance(m, nn.Module):
                raise TypeError(f"MoE(experts=...)[{i}] must be an nn.Module, got {type(m).__name__}")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(experts)
        self.d_model = d_model

    def _check(self, e: int, y: Tensor, n: int) -> Tensor:
        if not isinstance(y, Tensor) or y.shape != (n, self.d_model):
            shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
            raise ValueError(f"expert {e} must map (n, {self.d_model}) to (n, {self.d_model}), returned {shape}")
        return y

    def forward_grouped(self, x_ND: Tensor, offs_E: Tensor, expert_N: Tensor) -> Tensor:
        bounds = [0] + offs_E.tolist()
        out = x_ND.new_zeros(x_ND.shape)
        pieces = []
        for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
            if end > start:
                pieces.append(self._check(e, self.experts[e](x_ND[start:end]), end - start).to(x_ND.dtype))
        return torch.cat(pieces, dim=0) if pieces else out

    def forward_padded(self, x_ECD: Tensor) -> Tensor:
        num_rows = x_ECD.shape[1]
        return torch.stack(
            [self._check(e, self.experts[e](x_ECD[e]), num_rows).to(x_ECD.dtype) for e in range(self.num_experts)]
        )

    def forward_one(self, e: int, x_ND: Tensor) -> Tensor:
        return self.experts[e](x_ND)

    @property
    def weight_dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.get_default_dtype()


class SharedExpert(nn.Module):
    """Always-on expert(s) (DeepSeekMoE, Qwen2-MoE), optionally scaled by sigmoid(x w_g)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool, gate: bool, init_std: float):
        super().__init__()
        self.ffn = Experts(1, d_model, d_ff, activation, bias, init_std)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=init_std)

    def forward(self, x_TD: Tensor) -> Tensor:
        y_TD = self.ffn.forward_one(0, x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD).float()).to(y_TD.dtype) * y_TD
        return y_TD
