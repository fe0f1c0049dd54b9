"""Slow, obviously-correct versions of every dispatch op: the test oracle.

Shape legend: T tokens, D d_model, E experts, K assignments per token, C capacity.
These loop over experts, tokens or assignments in Python and use one-hot masks; they are never
used on a hot path. Parity tests run them beside the real path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.ops.activations import activate


def expert_ffn(x_ND: Tensor, w_in_HD: Tensor, w_out_DF: Tensor, activation: str,
               b_in_H: Tensor | None = None, b_out_D: Tensor | None = None) -> Tensor:
    """One feed-forward expert written out: x W_in^T (+b), nonlinearity, W_out^T (+b)."""
    h = x_ND @ w_in_HD.t()
    if b_in_H is not None:
        h = h + b_in_H
    y = activate(h, activation) @ w_out_DF.t()
    if b_out_D is not None:
        y = y + b_out_D
    return y


def run_expert(experts, e: int, x_ND: Tensor) -> Tensor:
    """Expert e of a stacked `Experts` (from its weights), of `QuantizedExperts` (its weights
    dequantized by the reference below) or of a `ModuleExperts` (its module)."""
    if hasattr(experts, "w_in_q"):
        b_in = None if experts.b_in is None else experts.b_in[e].to(x_ND.dtype)
        b_out = None if experts.b_out is None else experts.b_out[e].to(x_ND.dtype)
        w_in, w_out = (dequantize_reference(q[e]).to(x_ND.dtype) for q in experts.qweights())
        return expert_ffn(x_ND, w_in, w_out, experts.activation, b_in, b_out)
    if hasattr(experts, "w_in"):
        b_in = None if experts.b_in is None else experts.b_in[e].to(x_ND.dtype)
        b_out = None if experts.b_out is None else experts.b_out[e].to(x_ND.dtype)
        return expert_ffn(x_ND, experts.w_in[e].to(x_ND.dtype), experts.w_out[e].to(x_ND.dtype),
                          experts.activation, b_in, b_out)
    return experts.experts[e](x_ND)


def token_choice(x_TD: Tensor, expert_idx_TK: Tensor, weight_TK: Tensor, experts) -> Tensor:
    """out_t = sum_k weight[t, k] * expert_{idx[t, k]}(x_t), by a loop over experts with masks."""
    out = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(experts.num_experts):
        mask_TK = expert_idx_TK == e
        gate_T = (weight_TK.float() * mask_TK).sum(dim=1)  # a token picks e at most once
        rows = mask_TK.any(dim=1).nonzero().flatten()
        if rows.numel() == 0:
            continue
        y = run_expert(experts, e, x_TD[rows]).float()
        out = out.index_add(0, rows, y * gate_T[rows].unsqueeze(-1))
    return out


def capacity_keep(expert_idx_TK: Tensor, num_experts: int, group_size: int, capacity: int,
                  active_TK: Tensor | None = None, priority_T: Tensor | None = None) -> Tensor:
    """Which assignments survive capacity: a plain loop in claim order with per-bucket counters.

    Claim order: choice k=0 of every token, then k=1, ...; tokens in index order, or by
    descending priority when `priority_T` is given (batch prioritized routing).
    """
    num_tokens, k = expert_idx_TK.shape
    if priority_T is None:
        token_order = list(range(num_tokens))
    else:
        token_order = sorted(range(num_tokens), key=lambda t: (-float(priority_T[t].detach()), t))
    used: dict[tuple[int, int], int] = {}
    keep = torch.zeros(num_tokens, k, dtype=torch.bool)
    for choice in range(k):
        for t in token_order:
            if active_TK is not None and not bool(active_TK[t, choice]):
                continue
            bucket = (t // group_size, int(expert_idx_TK[t, choice]))
            if used.get(bucket, 0) < capacity:
                used[bucket] = used.get(bucket, 0) + 1
                keep[t, choice] = True
    return keep.to(expert_idx_TK.device)


def causal_capacity_keep(expert_idx_TK: Tensor, num_experts: int, seq_len: int, factor: float, min_capacity: int,
                         active_TK: Tensor | None = None, mask_T: Tensor | None = None) -> Tensor:
    """The causal capacity rule as a plain first-come loop: per sequence, tokens in position
    order, each token's choices in order; expert e takes the token at real position p while it
    holds fewer than C(p + 1) = max(1, min(max(ceil(factor (p+1) K / E), min_capacity), p + 1))."""
    import math

    num_tokens, k = expert_idx_TK.shape
    keep = torch.zeros(num_tokens, k, dtype=torch.bool)
    for s in range(num_tokens // seq_len):
        held: dict[int, int] = {}
        pos = 0
        for t in range(s * seq_len, (s + 1) * seq_len):
            if mask_T is not None and not bool(mask_T[t]):
                continue
            n = pos + 1
            cap = max(1, min(max(math.ceil(factor * n * k / num_experts), min_capacity), n))
            for c in range(k):
                if active_TK is not None and not bool(active_TK[t, c]):
                    continue
                e = int(expert_idx_TK[t, c])
                if held.get(e, 0) < cap:
                    held[e] = held.get(e, 0) + 1
                    keep[t, c] = True
            pos += 1
    return keep.to(expert_idx_TK.device)


def expert_choice(x_TD: Tensor, token_idx_EC: Tensor, weight_EC: Tensor, experts) -> Tensor:
    out = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(token_idx_EC.shape[0]):
        rows = token_idx_EC[e]
        y = run_expert(experts, e, x_TD[rows]).float()
        for c in range(rows.numel()):
            out[rows[c]] += weight_EC[e, c].float() * y[c]
    return out


def soft(x_BLD: Tensor, dispatch_BLX: Tensor, combine_BLX: Tensor, experts) -> Tensor:
    """Soft MoE written per sequence and per expert: slots = D^T x, y = C expert(slots)."""
    num_seq, seq_len, num_slots = dispatch_BLX.shape
    per_expert = num_slots // experts.num_experts
    out = torch.zeros(x_BLD.shape, dtype=torch.float32, device=x_BLD.device)
    for b in range(num_seq):
        slot_out = []
        for e in range(experts.num_experts):
            cols = slice(e * per_expert, (e + 1) * per_expert)
            slots = dispatch_BLX[b, :, cols].t().float() @ x_BLD[b].float()  # (S, D)
            slot_out.append(run_expert(experts, e, slots.to(x_BLD.dtype)).float())
        out[b] = combine_BLX[b].float() @ torch.cat(slot_out)
    return out


def routed_rows(x_TD: Tensor, token_N: Tensor, gate_N: Tensor, expert_N: Tensor, w_in_EHD: Tensor,
                w_out_EDF: Tensor, activation: str) -> Tensor:
    """out[t] = sum over rows n with token[n] == t of gate[n] * expert_{expert[n]}(x[t]), one row at a time.

    The oracle of `moekit.ops.routed.routed_ffn`; differentiable through plain autograd.
    """
    out = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for n in range(token_N.numel()):
        t, e = int(token_N[n]), int(expert_N[n])
        y = expert_ffn(x_TD[t : t + 1], w_in_EHD[e], w_out_EDF[e], activation)
        out = out.index_add(0, token_N[n : n + 1], gate_N[n].float() * y.float())
    return out


# ---------------------------------------------------------------------------------------------
# Weight-only quantization (ops/quant.py, format "moekit-q/1"): one block at a time, written out.


def _nf4_nearest(x: float) -> int:
    """Index of the NF4 level nearest to x, a tie going to the upper level (written out)."""
    from moekit.ops.quant import NF4_LEVELS

    best = 0
    for i, level in enumerate(NF4_LEVELS):
        if abs(x - level) <= abs(x - NF4_LEVELS[best]):
            best = i
    return best


def quantize_reference(w: Tensor, bits: int, block: int, code: str = "int"):
    """`ops.quant.quantize` one row and one block at a time, nibbles packed by hand."""
    from moekit.ops.quant import QMAX, QTensor, padded_width

    nf4 = code == "nf4"
    qmax = 1 if nf4 else QMAX[bits]
    lead, width = w.shape[:-1], w.shape[-1]
    rows = w.detach().to(torch.float32).reshape(-1, width)
    p = padded_width(width, block)
    data = torch.zeros(rows.shape[0], p if bits == 8 else p // 2, dtype=torch.int8 if bits == 8 else torch.uint8)
    scales = torch.zeros(rows.shape[0], p // block, dtype=torch.float32)
    for r in range(rows.shape[0]):
        for b in range(p // block):
            values = rows[r, b * block:(b + 1) * block]  # the last block may be short: padding is zero
            scale = values.abs().max() / qmax if values.numel() else torch.tensor(0.0)
            scales[r, b] = scale
            for j in range(block):
                col = b * block + j
                if nf4:  # stored as the level's index - 8, so the packing below is shared
                    v = (7 if col >= width or scale == 0 else _nf4_nearest(float(values[j] / scale))) - 8
                else:
                    v = 0 if col >= width or scale == 0 else int(torch.round(values[j] / scale).clamp(-qmax, qmax))
                if bits == 8:
                    data[r, col] = v
                elif col % 2 == 0:
                    data[r, col // 2] = v + 8
                else:
                    data[r, col // 2] = int(data[r, col // 2]) | ((v + 8) << 4)
    return QTensor(data.reshape(*lead, -1), scales.reshape(*lead, -1), bits, block, width, code)


def dequantize_reference(q) -> Tensor:
    """w'[r, c] = value[r, c] * scale[r, c // block], float32, element by element."""
    data = q.data.reshape(-1, q.data.shape[-1])
    scales = q.scales.reshape(-1, q.scales.shape[-1])
    out = torch.zeros(data.shape[0], q.width, dtype=torch.float32)
    for r in range(data.shape[0]):
        for c in range(q.width):
            if q.bits == 8:
                v = int(data[r, c])
            else:
                byte = int(data[r, c // 2])
                v = (byte & 0x0F if c % 2 == 0 else byte >> 4) - 8
            if q.code == "nf4":
                from moekit.ops.quant import NF4_LEVELS

                v = NF4_LEVELS[v + 8]
            out[r, c] = v * scales[r, c // q.block]
    return out.reshape(*q.data.shape[:-1], q.width)


def qlinear_reference(x: Tensor, q, bias: Tensor | None = None) -> Tensor:
    """The oracle of every quantized product: dequantize the whole weight, then multiply."""
    y = x @ dequantize_reference(q).to(x.dtype).t()
    return y if bias is None else y + bias.to(y.dtype)
