"""Least-squares refit of the experts' output projections after a conversion, before (or instead
of some of) the distillation: not part of MoEBERT, a closed-form step that starts the
distillation much closer to the teacher.

Shape legend: N tokens routed to one expert, D d_model, Fe expert width, P = Fe + 1 features.

An expert cut from a dense FFN keeps only some of its neurons; the teacher's output on a token is
y = W2 a_all + b2 over all F neurons, the expert's is g (W_e a_e + b_e) over its Fe neurons (g the
token's combine weight, 1 for renormalised top-1). With the expert's first projection fixed, a_e
is known, so the best W_e, b_e for the tokens routed to it on sample data is a linear least-squares
problem: minimise sum_t || g_t [a_t, 1] [W_e, b_e]^T - y_t ||^2 (+ ridge). The remaining neurons'
contribution is thereby projected onto the kept ones, the layer-wise reconstruction that
post-training pruning methods solve for the weights they keep (e.g. Kwon et al. 2022, "A Fast
Post-Training Pruning Framework for Transformers", section 4.3; Frantar & Alistarh 2023,
SparseGPT). Inputs are the teacher's FFN inputs (one teacher pass); the routing is the student's
router on those inputs. Needs top-1 token-choice routing (each token's output is one expert's).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from moekit.convert.common import ConversionError, model_kind
from moekit.convert.moebert import as_kwargs
from moekit.layers.experts import Experts
from moekit.layers.moe import MoE
from moekit.layers.routers import TokenChoice
from moekit.models import common
from moekit.ops.activations import activate


def _pairs(student: nn.Module, teacher: nn.Module) -> list[int]:
    if model_kind(student) != model_kind(teacher) or len(student.blocks) != len(teacher.blocks):
        raise ConversionError("refit_experts needs the converted student and its dense teacher (same blocks)")
    layers = []
    for i, (s, t) in enumerate(zip(student.blocks, teacher.blocks)):
        if isinstance(s.ffn, MoE) and isinstance(t.ffn, common.DenseFFN):
            cfg = s.ffn.cfg
            if cfg.effective_top_k != 1 or s.ffn.router.kind != "token" or cfg.capacity_factor is not None:
                raise ConversionError(
                    f"refit_experts needs dropless top-1 token-choice routing (block {i}: router {cfg.router!r}, "
                    f"top_k {cfg.top_k}, capacity_factor {cfg.capacity_factor})"
                )
            if not isinstance(s.ffn.experts, Experts):
                raise ConversionError(f"refit_experts needs stacked experts (block {i} has user modules)")
            layers.append(i)
    if not layers:
        raise ConversionError("refit_experts found no block that is MoE in the student and dense in the teacher")
    return layers


@torch.no_grad()
def refit_experts(
    student: nn.Module,
    teacher: nn.Module,
    data: Iterable[Any],
    ridge: float = 1e-3,
    progress: Callable[[int], None] | None = None,
) -> dict[int, dict[str, float]]:
    """Refit each MoE layer's expert output projections w_out (and output biases, when the
    experts have them) in place by ridge-regularised least squares on `data`.

    ridge: relative Tikhonov weight, times the mean diagonal of each expert's Gram matrix.
    Returns per layer the relative squared error of the MoE against the dense FFN on the data,
    before and after, and the tokens each expert was fitted on."""
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not ridge >= 0:
        raise ConversionError(f"ridge must be a number >= 0, got {ridge!r}")
    layers = _pairs(student, teacher)
    data = data if isinstance(data, (list, tuple)) else list(data)  # read twice: fit, then measure
    inputs: dict[int, list[Tensor]] = {i: [] for i in layers}
    handles = [teacher.blocks[i].ffn.register_forward_hook(lambda _m, inp, _o, i=i: inputs[i].append(inp[0]))
               for i in layers]
    was = (student.training, teacher.training)
    student.eval()
    teacher.eval()
    stats: dict[int, dict[str, Any]] = {}
    try:
        gram = {i: None for i in layers}
        cross = {i: None for i in layers}
        err = {i: [0.0, 0.0] for i in layers}  # squared error before, squared norm of the target
        counts = {i: None for i in layers}
        seen = 0
        for batch_size, seq_len, x_by_layer in _ffn_inputs(teacher, data, layers, inputs):
            for i, x_ND in x_by_layer.items():
                g, c, e2, y2, n_E = _accumulate(student.blocks[i].ffn, teacher.blocks[i].ffn, x_ND, seq_len)
                gram[i] = g if gram[i] is None else gram[i] + g
                cross[i] = c if cross[i] is None else cross[i] + c
                counts[i] = n_E if counts[i] is None else counts[i] + n_E
                err[i][0] += e2
                err[i][1] += y2
            seen += batch_size
            if progress is not None:
                progress(batch_size)
        if seen == 0:
            raise ConversionError("refit_experts needs data: the data iterable gave no batch")
        for i in layers:
            _solve(student.blocks[i].ffn, gram[i], cross[i], counts[i], ridge)
            stats[i] = {"rel_err_before": err[i][0] / max(err[i][1], 1e-30), "tokens_per_expert": counts[i].tolist()}
        # The error after the refit, on the same data (a second teacher pass).
        after = {i: [0.0, 0.0] for i in layers}
        for _, _, x_by_layer in _ffn_inputs(teacher, data, layers, inputs):
            for i, x_ND in x_by_layer.items():
                y = teacher.blocks[i].ffn(x_ND).float()
                after[i][0] += (student.blocks[i].ffn(x_ND.unsqueeze(0)).output[0].float() - y).pow(2).sum().item()
                after[i][1] += y.pow(2).sum().item()
        for i in layers:
            stats[i]["rel_err_after"] = after[i][0] / max(after[i][1], 1e-30)
    finally:
        for h in handles:
            h.remove()
        student.train(was[0])
        teacher.train(was[1])
    return stats


def _ffn_inputs(teacher: nn.Module, data, layers, inputs: dict[int, list[Tensor]]):
    """Run the teacher over `data`; per batch yield (sequences, sequence length, {layer: the
    unpadded token rows its FFN received}), read from the forward hooks that fill `inputs`."""
    for batch in data:
        kwargs = as_kwargs(batch)
        kwargs.pop("labels", None)
        teacher(**kwargs)
        mask = kwargs.get("attention_mask")
        x_by_layer = {}
        for i in layers:
            x = inputs[i].pop()
            x_by_layer[i] = x[mask.bool()] if mask is not None else x.reshape(-1, x.shape[-1])
        yield kwargs["input_ids"].shape[0], x.shape[-2], x_by_layer


def _features(moe: MoE, x_ND: Tensor, seq_len: int) -> tuple[Tensor, Tensor, Tensor]:
    """Routed expert (N,), gate (N,) and expert activations a (N, Fe) of each token."""
    acc = torch.promote_types(x_ND.dtype, torch.float32)  # float32, or float64 for a float64 model
    routing = moe.router(x_ND.to(acc), seq_len)
    if not isinstance(routing, TokenChoice):  # pragma: no cover - _pairs refuses other routers
        raise ConversionError("refit_experts needs token-choice routing")
    e_N, g_N = routing.expert_idx_TK[:, 0], routing.weight_TK[:, 0].to(acc)
    if routing.active_TK is not None:
        g_N = g_N * routing.active_TK[:, 0].to(acc)
    ex = moe.experts
    h_NH = x_ND.new_empty(x_ND.shape[0], ex.w_in.shape[1], dtype=acc)
    for e in range(ex.num_experts):  # one matmul per expert over its tokens
        sel = e_N == e
        if sel.any():
            h_NH[sel] = x_ND[sel].to(acc) @ ex.w_in[e].to(acc).t()
    if ex.b_in is not None:
        h_NH = h_NH + ex.b_in.to(acc)[e_N]
    return e_N, g_N, activate(h_NH, ex.activation)


def _accumulate(moe: MoE, dense: common.DenseFFN, x_ND: Tensor, seq_len: int):
    """Gram matrices (E, P, P), cross terms (E, P, D) of phi = g [a, 1] against y = dense(x)."""
    ex = moe.experts
    E, Fe = ex.num_experts, ex.d_ff
    e_N, g_N, a_NF = _features(moe, x_ND, seq_len)
    y_ND = dense(x_ND).to(a_NF.dtype)
    phi_NP = torch.cat((a_NF, torch.ones_like(a_NF[:, :1])), dim=1) * g_N[:, None]  # (N, Fe + 1)
    gram = torch.zeros(E, Fe + 1, Fe + 1, dtype=torch.float64)
    cross = torch.zeros(E, Fe + 1, y_ND.shape[1], dtype=torch.float64)
    for e in range(E):
        sel = e_N == e
        if sel.any():
            p = phi_NP[sel]  # float32 products, float64 sums across batches
            gram[e] = (p.t() @ p).double()
            cross[e] = (p.t() @ y_ND[sel]).double()
    y_moe = moe(x_ND.unsqueeze(0)).output[0].to(y_ND.dtype)
    return gram, cross, (y_moe - y_ND).pow(2).sum().item(), y_ND.pow(2).sum().item(), torch.bincount(e_N, minlength=E)


def _solve(moe: MoE, gram_EPP: Tensor, cross_EPD: Tensor, counts_E: Tensor, ridge: float) -> None:
    ex = moe.experts
    Fe = ex.d_ff
    for e in range(ex.num_experts):
        if counts_E[e] == 0:
            continue  # no token reached this expert: nothing to fit, keep its weights
        G = gram_EPP[e]
        lam = ridge * G.diagonal().mean().clamp_min(1e-12)
        reg = torch.eye(G.shape[0], dtype=G.dtype) * lam
        if ex.b_out is None:  # no bias to fit: drop the constant feature
            W_PD = torch.linalg.solve(G[:Fe, :Fe] + reg[:Fe, :Fe], cross_EPD[e][:Fe])
        else:
            reg[Fe, Fe] = 0  # the bias is not shrunk
            W_PD = torch.linalg.solve(G + reg, cross_EPD[e])
            ex.b_out[e].copy_(W_PD[Fe])
        ex.w_out[e].copy_(W_PD[:Fe].t())
