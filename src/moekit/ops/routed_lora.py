"""The routed expert FFN with per-expert LoRA on both projections, as one autograd Function.

Shape legend: T tokens, D d_model, E experts, N routed rows sorted by expert, H first-projection
width (2F for gated activations), F down-projection width, r the LoRA rank.

    u = s x A_in^T (N, r)      h = x W_in^T + u B_in^T (N, H)      a = act(h) (N, F)
    v = s a A_out^T (N, r)     y = gate * (a W_out^T + v B_out^T)  out[t] = sum of y over t's rows

with W_in (E, H, D), W_out (E, D, F) frozen (or not), A_in (E, r, D), B_in (E, H, r),
A_out (E, r, F), B_out (E, D, r), each row using its expert's slices. Every product is a grouped
product on the same sorted rows (ops/grouped.py), so an adapter costs two thin products per
projection and never a materialised (H, D) delta per expert.

Why a Function instead of autograd over the pieces (layers/lora.py's `forward_grouped`, which
stays the slow reference path and the one taken with dropout): the backward reuses the fused
op's dataflow (ops/routed.py): the gate gradient comes from the same row dot as there,
<dL/d(a), a>, because the adapter's share of it folds into dL/da (the derivation is in
`_Backward`); the input rows are gathered again rather than kept; the frozen base weights get no
gradient and no product is spent on one. Measured against the pieces, `benchmarks/bench_lora.py`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.ops.activations import act_forward, scaled_act_backward
from moekit.ops.grouped import gmm, gmm_accumulate, gmm_into, gmm_wgrad
from moekit.ops.routed import _kept, _out_dtype, _scatter_rows, _scratch


class _RoutedLora(torch.autograd.Function):
    """Temporaries come from the routed op's per-thread CPU workspace (ops/routed.py: `_scratch`
    for buffers that die inside the op, `_kept` for h, kept for the backward), and the products
    write into them (`gmm_into`) or add onto them (`gmm_accumulate`): fresh buffers of tens of MiB
    cost more in page faults than the thin products cost in arithmetic."""

    @staticmethod
    def forward(ctx, x_TD, token_N, gate_N, offs_E, w_in, w_out, a_in, b_in, a_out, b_out, scaling, activation,
                rows_per_expert):
        rpe = rows_per_expert
        num_rows, hidden = token_N.shape[0], w_in.shape[1]
        backward = any(ctx.needs_input_grad)
        rows_ND = _scratch("lora_rows", (num_rows, x_TD.shape[1]), x_TD)
        x_ND = torch.index_select(x_TD, 0, token_N, out=rows_ND)  # (N, D) rows grouped by expert
        u_Nr = gmm(x_ND, a_in.transpose(1, 2), offs_E, rpe).mul_(scaling)
        h_NH = _kept((num_rows, hidden), x_TD) if backward else _scratch("lora_h", (num_rows, hidden), x_TD)
        gmm_into(h_NH, x_ND, w_in.transpose(1, 2), offs_E, rpe)
        gmm_accumulate(h_NH, u_Nr, b_in.transpose(1, 2), offs_E, 1.0, rpe)
        a_NF = act_forward(h_NH, activation, out=_scratch("lora_act", (num_rows, w_out.shape[2]), x_TD))
        v_Nr = gmm(a_NF, a_out.transpose(1, 2), offs_E, rpe).mul_(scaling)
        y_ND = gmm_into(rows_ND, a_NF, w_out.transpose(1, 2), offs_E, rpe)  # x's rows are dead: reuse them
        del a_NF
        gmm_accumulate(y_ND, v_Nr, b_out.transpose(1, 2), offs_E, 1.0, rpe)
        y_ND.mul_(gate_N.to(y_ND.dtype).unsqueeze(1))
        out_TD = _scatter_rows(y_ND, token_N, x_TD.shape[0], None, _out_dtype(x_TD.dtype))
        if backward:
            ctx.save_for_backward(x_TD, token_N, gate_N, offs_E, w_in, w_out, a_in, b_in, a_out, b_out, h_NH, u_Nr,
                                  v_Nr)
        ctx.scaling, ctx.activation, ctx.rpe = scaling, activation, rpe
        return out_TD

    @staticmethod
    def backward(ctx, grad_TD):
        """With g the output rows' gradient before the gate (N, D):

        dv = g B_out (N, r, ungated); d(a) = g W_out + s dv A_out, so the gate gradient
        <g, a W_out^T + v B_out^T> = <d(a), a> is the fused op's row dot; then
        dB_out = g^T (gate v), dA_out = s dv^T (gate a), dB_in = dh^T u, du = dh B_in,
        dA_in = s du^T x, dx = dh W_in + s du A_in (all per expert over its rows).
        """
        (x_TD, token_N, gate_N, offs_E, w_in, w_out, a_in, b_in, a_out, b_out, h_NH, u_Nr,
         v_Nr) = ctx.saved_tensors
        s, act, rpe = ctx.scaling, ctx.activation, ctx.rpe
        need = ctx.needs_input_grad
        dt = h_NH.dtype
        num_rows, width = h_NH.shape[0], w_out.shape[2]
        rows_ND = _scratch("lora_rows", (num_rows, x_TD.shape[1]), h_NH)
        g_ND = torch.index_select(grad_TD.to(dt), 0, token_N, out=rows_ND)  # (N, D)
        gate_N1 = gate_N.to(dt).unsqueeze(1)
        dv_Nr = gmm(g_ND, b_out, offs_E, rpe)  # (N, r), before the gate
        dga_NF = gmm_into(_scratch("lora_dga", (num_rows, width), h_NH), g_ND, w_out, offs_E, rpe)
        gmm_accumulate(dga_NF, dv_Nr, a_out, offs_E, s, rpe)
        dh_NH, grad_gate_N, ga_NF = scaled_act_backward(
            dga_NF, h_NH, gate_N1, act, dh_out=_scratch("lora_dh", tuple(h_NH.shape), h_NH),
            ga_out=_scratch("lora_ga", (num_rows, width), h_NH))
        grad_b_out = gmm_wgrad(g_ND, v_Nr * gate_N1, offs_E, rpe) if need[9] else None
        grad_a_out = gmm_wgrad(dv_Nr, ga_NF, offs_E, rpe).mul_(s) if need[8] else None
        grad_w_out = gmm_wgrad(g_ND, ga_NF, offs_E, rpe) if need[5] else None
        du_Nr = gmm(dh_NH, b_in, offs_E, rpe)  # (N, r)
        grad_b_in = gmm_wgrad(dh_NH, u_Nr, offs_E, rpe) if need[7] else None
        # the input rows are gathered again rather than kept, into the gradient rows' (dead) buffer
        x_ND = torch.index_select(x_TD, 0, token_N, out=rows_ND)
        grad_a_in = gmm_wgrad(du_Nr, x_ND, offs_E, rpe).mul_(s) if need[6] else None
        grad_w_in = gmm_wgrad(dh_NH, x_ND, offs_E, rpe) if need[4] else None
        grad_x_TD = None
        if need[0]:
            dx_ND = gmm_into(rows_ND, dh_NH, w_in, offs_E, rpe)  # x's rows are dead now
            gmm_accumulate(dx_ND, du_Nr, a_in, offs_E, s, rpe)
            grad_x_TD = _scatter_rows(dx_ND, token_N, x_TD.shape[0], None, x_TD.dtype)
        grad_gate = grad_gate_N.to(gate_N.dtype) if need[2] else None
        return (grad_x_TD, None, grad_gate, None, grad_w_in, grad_w_out, grad_a_in, grad_b_in, grad_a_out,
                grad_b_out, None, None, None)


def routed_ffn_lora(x_TD: Tensor, token_N: Tensor, gate_N: Tensor, offs_E: Tensor, w_in_EHD: Tensor,
                    w_out_EDF: Tensor, a_in_ErD: Tensor, b_in_EHr: Tensor, a_out_ErF: Tensor, b_out_EDr: Tensor,
                    scaling: float, activation: str, rows_per_expert: int = 0) -> Tensor:
    """sum_n gate[n] * expert_{e_n}(x[token[n]]) with LoRA-adapted experts, (T, D) in float32
    (float64 for float64 x). Rows grouped by expert (`offs_E` cumulative counts) or, with
    `rows_per_expert` > 0, the padded layout; weights and factors in x's dtype."""
    gate_N = gate_N.to(_out_dtype(x_TD.dtype))
    return _RoutedLora.apply(x_TD, token_N, gate_N, offs_E.to(torch.int32), w_in_EHD, w_out_EDF, a_in_ErD,
                             b_in_EHr, a_out_ErF, b_out_EDr, float(scaling), activation, rows_per_expert)
