"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") on moekit's
modules: a frozen base weight W plus a trained low-rank delta, W' = W + s * B @ A.

Shape legend: E experts, S experts that carry an adapter (E by default), r the rank, D d_model,
H first-projection width (2F for gated activations), F down-projection width, N routed rows
sorted by expert, C rows per expert of a padded buffer.

- `LoraLinear` wraps an `nn.Linear` or a `QuantizedLinear`: y = base(x) + s * (drop(x) A^T) B^T.
- `LoraExperts` wraps stacked experts (`Experts` or `QuantizedExperts`) and is itself an expert
  kind (layers/experts.py): per-expert factors A_in (S, r, D), B_in (S, H, r), A_out (S, r, F),
  B_out (S, D, r). The deltas run inside the routed path as two extra grouped products per
  projection on the same sorted rows (N x D x r, then N x r x H), never as E materialised
  (H, D) delta matrices: at rank 16 and D = 256 that is about 1/16 more multiply work, where
  building W + B A per step would touch every expert's whole weight again.
- `LowRankDelta` is a parametrization (torch.nn.utils.parametrize) for the router's weight
  (E, D): every router reads `self.weight`, and the matrix is small, so W + s B A is formed on
  each read.

The scale s is alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023, "A Rank
Stabilization Scaling Factor for Fine-Tuning with LoRA"). A starts as nn.Linear's default
(Kaiming-uniform), B at zero, so a fresh adapter changes nothing (the paper's initialisation).

The base is frozen (its parameters get no gradient, and the grouped products skip the weight
gradient for it: ops/grouped.py). A quantized base (QLoRA, Dettmers et al. 2023) is dequantized
one expert (or one chunk of rows) at a time in the forward and again in the backward
(ops/quant.py), so its float copy never lives across the step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.experts import Experts
from moekit.layers.quantized import QuantizedExperts, QuantizedLinear
from moekit.ops.activations import activate
from moekit.ops.grouped import grouped_mm
from moekit.ops.quant import dequantize, qbmm, qgrouped_mm


def lora_scaling(rank: int, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


class LoraLinear(nn.Module):
    """A frozen linear layer plus a rank-r adapter: lora_A (r, in), lora_B (out, r)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantizedLinear)):
            raise TypeError(f"LoraLinear wraps nn.Linear or QuantizedLinear, got {type(base).__name__}")
        _freeze(base)
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = lora_scaling(rank, alpha, rslora)
        device = _device(base)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = _dropout(dropout)

    def delta_weight(self) -> Tensor:
        """s * B @ A, (out, in), float32."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        xa = F.linear(self.dropout(x), self.lora_A.to(x.dtype)) * self.scaling  # (..., r)
        return y + F.linear(xa, self.lora_B.to(x.dtype)).to(y.dtype)

    def merged(self) -> nn.Linear:
        """A plain nn.Linear holding W + s B A (a quantized base is dequantized first)."""
        base = self.base
        if isinstance(base, QuantizedLinear):
            weight, dtype = dequantize(base.qweight(), torch.float32), base.compute_dtype
            bias = base.bias
        else:
            weight, dtype, bias = base.weight.detach().float(), base.weight.dtype, base.bias
        out = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device, dtype=dtype)
        with torch.no_grad():
            out.weight.copy_(weight + self.delta_weight())
            if bias is not None:
                out.bias.copy_(bias.detach())
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}"


def _device(module: nn.Module) -> torch.device:
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


class LoraExperts(nn.Module):
    """Stacked experts (frozen) plus per-expert LoRA on both projections; an expert kind."""

    fused = False  # Path.PIECES: the deltas ride on the grouped products of the sorted rows

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, rslora: bool = False,
                 expert_ids: list[int] | None = None):
        super().__init__()
        if not isinstance(base, (Experts, QuantizedExperts)):
            raise TypeError(f"LoraExperts wraps Experts or QuantizedExperts, got {type(base).__name__}")
        _freeze(base)
        self.base = base
        num = base.num_experts
        ids = list(range(num)) if expert_ids is None else sorted({int(e) for e in expert_ids})
        bad = [e for e in ids if not 0 <= e < num]
        if bad or not ids:
            raise ValueError(f"lora.experts: expert ids must be in 0..{num - 1} (and at least one), got "
                             f"{list(expert_ids) if expert_ids is not None else None}")
        self.expert_ids = ids
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = lora_scaling(rank, alpha, rslora)
        d, h, f = base.widths
        s = len(ids)
        device = _device(base)
        self.lora_in_A = nn.Parameter(torch.empty(s, rank, d, device=device))  # (S, r, D)
        self.lora_in_B = nn.Parameter(torch.zeros(s, h, rank, device=device))  # (S, H, r)
        self.lora_out_A = nn.Parameter(torch.empty(s, rank, f, device=device))  # (S, r, F)
        self.lora_out_B = nn.Parameter(torch.zeros(s, d, rank, device=device))  # (S, D, r)
        for a in (self.lora_in_A, self.lora_out_A):
            for i in range(s):  # each expert's A as nn.Linear would initialise an (r, in) weight
                nn.init.kaiming_uniform_(a.data[i], a=math.sqrt(5))
        self.register_buffer("_ids", torch.tensor(ids, dtype=torch.long, device=device), persistent=False)
        self.dropout = _dropout(dropout)

    # the expert-kind attributes other code reads (dispatch, metrics, HF export)
    @property
    def num_experts(self) -> int:
        return self.base.num_experts

    @property
    def d_model(self) -> int:
        return self.base.d_model

    @property
    def d_ff(self) -> int:
        return self.base.d_ff

    @property
    def activation(self) -> str:
        return self.base.activation

    @property
    def widths(self) -> tuple[int, int, int]:
        return self.base.widths

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.base.weight_dtype

    @property
    def requires_grad(self) -> bool:
        return any(p.requires_grad for p in self.parameters())

    @property
    def all_experts(self) -> bool:
        return len(self.expert_ids) == self.base.num_experts

    def _full(self, p: Tensor, dtype: torch.dtype) -> Tensor:
        """An (S, ...) factor as (E, ...) in `dtype`: experts without an adapter get zeros."""
        p = p.to(dtype)
        if self.all_experts:
            return p
        return p.new_zeros((self.base.num_experts, *p.shape[1:])).index_copy(0, self._ids, p)

    def _bias(self, name: str, dtype: torch.dtype) -> Tensor | None:
        b = getattr(self.base, name)
        return None if b is None else b.to(dtype)

    def _base_grouped(self, which: str, x_NI: Tensor, offs_E: Tensor) -> Tensor:
        if isinstance(self.base, QuantizedExperts):
            q_in, q_out = self.base.qweights()
            return qgrouped_mm(x_NI, q_in if which == "in" else q_out, offs_E)
        w = self.base.w_in if which == "in" else self.base.w_out
        return grouped_mm(x_NI, w.to(x_NI.dtype).transpose(1, 2), offs_E)

    def _base_padded(self, which: str, x_ECI: Tensor) -> Tensor:
        if isinstance(self.base, QuantizedExperts):
            q_in, q_out = self.base.qweights()
            return qbmm(x_ECI, q_in if which == "in" else q_out)
        w = self.base.w_in if which == "in" else self.base.w_out
        return torch.bmm(x_ECI, w.to(x_ECI.dtype).transpose(1, 2))

    def forward_grouped(self, x_ND: Tensor, offs_E: Tensor, expert_N: Tensor) -> Tensor:
        dt = x_ND.dtype
        a_in, b_in = self._full(self.lora_in_A, dt), self._full(self.lora_in_B, dt)
        a_out, b_out = self._full(self.lora_out_A, dt), self._full(self.lora_out_B, dt)
        h_NH = self._base_grouped("in", x_ND, offs_E)
        xa_Nr = grouped_mm(self.dropout(x_ND), a_in.transpose(1, 2), offs_E) * self.scaling  # (N, r)
        h_NH = h_NH + grouped_mm(xa_Nr, b_in.transpose(1, 2), offs_E)
        if (bias := self._bias("b_in", dt)) is not None:
            h_NH = h_NH + bias[expert_N]
        act_NF = activate(h_NH, self.activation)
        y_ND = self._base_grouped("out", act_NF, offs_E)
        aa_Nr = grouped_mm(self.dropout(act_NF), a_out.transpose(1, 2), offs_E) * self.scaling  # (N, r)
        y_ND = y_ND + grouped_mm(aa_Nr, b_out.transpose(1, 2), offs_E)
        if (bias := self._bias("b_out", dt)) is not None:
            y_ND = y_ND + bias[expert_N]
        return y_ND

    def forward_padded(self, x_ECD: Tensor) -> Tensor:
        dt = x_ECD.dtype
        a_in, b_in = self._full(self.lora_in_A, dt), self._full(self.lora_in_B, dt)
        a_out, b_out = self._full(self.lora_out_A, dt), self._full(self.lora_out_B, dt)
        h_ECH = self._base_padded("in", x_ECD)
        xa_ECr = torch.bmm(self.dropout(x_ECD), a_in.transpose(1, 2)) * self.scaling
        h_ECH = h_ECH + torch.bmm(xa_ECr, b_in.transpose(1, 2))
        if (bias := self._bias("b_in", dt)) is not None:
            h_ECH = h_ECH + bias.unsqueeze(1)
        act_ECF = activate(h_ECH, self.activation)
        y_ECD = self._base_padded("out", act_ECF)
        aa_ECr = torch.bmm(self.dropout(act_ECF), a_out.transpose(1, 2)) * self.scaling
        y_ECD = y_ECD + torch.bmm(aa_ECr, b_out.transpose(1, 2))
        if (bias := self._bias("b_out", dt)) is not None:
            y_ECD = y_ECD + bias.unsqueeze(1)
        return y_ECD

    def effective(self, e: int, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Expert e's (W_in + s B_in A_in (H, D), W_out + s B_out A_out (D, F)), materialised: the
        slow form, for references, merging and one-expert calls."""
        if isinstance(self.base, QuantizedExperts):
            q_in, q_out = self.base.qweights()
            w_in, w_out = dequantize(q_in[e]), dequantize(q_out[e])
        else:
            w_in, w_out = self.base.w_in[e].float(), self.base.w_out[e].float()
        if e in self.expert_ids:
            i = self.expert_ids.index(e)
            w_in = w_in + self.scaling * (self.lora_in_B[i].float() @ self.lora_in_A[i].float())
            w_out = w_out + self.scaling * (self.lora_out_B[i].float() @ self.lora_out_A[i].float())
        return w_in.to(dtype), w_out.to(dtype)

    def forward_one(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e on all rows (shared experts call this every forward): the grouped form with
        every row in group e, so no weight is materialised."""
        n = x_ND.shape[0]
        offs_E = torch.tensor([0] * e + [n] * (self.num_experts - e), dtype=torch.int32, device=x_ND.device)
        return self.forward_grouped(x_ND, offs_E, torch.full((n,), e, dtype=torch.long, device=x_ND.device))

    def weights(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Every expert's effective stacks (E, H, D), (E, D, F) in `dtype` (a full copy)."""
        pairs = [self.effective(e, dtype) for e in range(self.num_experts)]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    @torch.no_grad()
    def merged(self) -> Experts:
        """Plain stacked `Experts` holding W + s B A for every expert (float, in the base's dtype)."""
        base = self.base
        d, _, f = base.widths
        dtype = base.weight_dtype
        has_bias = base.b_in is not None
        out = Experts(base.num_experts, d, f, base.activation, bias=has_bias)
        out = out.to(device=_device(base), dtype=dtype)
        w_in, w_out = self.weights(torch.float32)
        out.w_in.copy_(w_in)
        out.w_out.copy_(w_out)
        if has_bias:
            out.b_in.copy_(base.b_in)
            out.b_out.copy_(base.b_out)
        out.init_std = getattr(base, "init_std", 0.02)
        return out

    def extra_repr(self) -> str:
        which = "all" if self.all_experts else self.expert_ids
        return f"rank={self.rank}, alpha={self.alpha}, scaling={self.scaling:g}, experts={which}"


class LowRankDelta(nn.Module):
    """Parametrization W -> W + s * B @ A for a weight (out, in), e.g. a router's (E, D)."""

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float, rslora: bool = False,
                 device=None):
        super().__init__()
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (self.scaling * (self.lora_B @ self.lora_A)).to(weight.dtype)
