"""Permute tokens to experts, run the experts, combine: dropless and capacity paths, expert
choice and Soft MoE. The path of the expert compute comes from the layer's plan (layers/plan.py),
decided once per forward; the functions here follow it.

Shape legend: T tokens, D d_model, E experts, K assignments per token, N = T*K assignments (or
slots of a padded layout), G groups, C capacity per expert and group, X = E*S soft slots,
B sequences, L tokens per sequence.

Token choice, dropless: a stable argsort of the N expert ids groups the rows by expert, a gather
builds the sorted activations, one grouped GEMM per projection runs all experts, and the outputs
are weighted and summed back per token. No Python loop over experts, no host sync.

Token choice with capacity: which assignments fit is decided by the capacity rule
(layers/capacity.py: GShard's group order for non-causal layers, a prefix rule for causal ones);
the kept ones are written to a fixed (E, G*C, D) buffer that runs through batched matmuls.
Dropped assignments contribute zero; the residual stream around the layer carries the token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.layers.capacity import (
    CausalState,
    Kept,
    active_assignments,
    group_size,
    keep_causal,
    keep_noncausal,
    prefix_capacity,
)
from moekit.layers.config import MoEConfig
from moekit.layers.plan import Path, Plan
from moekit.layers.routers.base import ExpertChoice, SoftRouting, TokenChoice
from moekit.ops.decode import routed_ffn_decode, routed_ffn_decode_native
from moekit.ops.permute import expert_counts, inverse_permutation, sort_by_expert
from moekit.ops.routed import routed_ffn
from moekit.ops.routed_lora import routed_ffn_lora


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half types, the input's own for float32/float64."""
    return torch.promote_types(x.dtype, torch.float32)


@dataclass
class DispatchStats:
    tokens_per_expert: Tensor  # (E,) float32 assignments each expert computed (after drops)
    dropped: Tensor  # scalar float32: assignments (or tokens, for expert choice) dropped
    offered: Tensor  # scalar float32: assignments (or tokens) the router asked for


def fused_rows(x_TD: Tensor, token_N: Tensor, gate_N: Tensor, offs_E: Tensor, experts, plan: Plan, *,
               expert_N: Tensor | None = None, rows_per_expert: int = 0, inverse_N: Tensor | None = None) -> Tensor:
    """out[t] = sum over rows n of token t of gate[n] * expert_{e_n}(x[t]), (T, D) in float32.

    Rows are grouped by expert (`offs_E` cumulative counts; `expert_N` the expert of each row);
    `rows_per_expert` > 0 declares the padded layout of exactly that many rows per expert.
    `inverse_N` (dropless only: every token has K rows, row of assignment t*K+k) makes the
    combine deterministic off CPU. Stacked experts only (the plan's fused paths and PIECES).
    """
    if plan.path is Path.ROUTED and getattr(experts, "low_rank", False):  # LoRA experts (layers/lora.py)
        return routed_ffn_lora(x_TD, token_N, gate_N, offs_E, *experts.base.weights(plan.compute_dtype),
                               *experts.factors(plan.compute_dtype), experts.scaling, experts.activation,
                               rows_per_expert)
    if plan.path is Path.ROUTED:
        w_in, w_out = experts.weights(plan.compute_dtype)
        return routed_ffn(x_TD, token_N, gate_N, offs_E, w_in, w_out, experts.activation, rows_per_expert, inverse_N)
    if plan.decode:  # a few tokens, no gradient, sorted rows: memory-bound, see ops/decode.py
        return routed_ffn_decode(x_TD, token_N, gate_N, offs_E, *experts.weights(plan.compute_dtype),
                                 experts.activation)
    # PIECES, experts with biases: the same dataflow from differentiable pieces (slower, rarely used).
    x_ND = x_TD.index_select(0, token_N)
    if rows_per_expert > 0:
        y_ND = experts.forward_padded(x_ND.view(experts.num_experts, rows_per_expert, -1)).reshape(x_ND.shape)
    else:
        if expert_N is None:
            rows_N = torch.arange(token_N.shape[0], device=offs_E.device, dtype=offs_E.dtype)
            expert_N = torch.searchsorted(offs_E, rows_N, right=True)
        y_ND = experts.forward_grouped(x_ND, offs_E, expert_N)
    acc = acc_dtype(x_TD)
    y_ND = y_ND.to(acc) * gate_N.to(acc).unsqueeze(1)
    return y_ND.new_zeros(x_TD.shape).index_add_(0, token_N, y_ND)


def dispatch_token_choice(x_TD: Tensor, routing: TokenChoice, experts, cfg: MoEConfig, plan: Plan, seq_len: int,
                          mask_T: Tensor | None = None, state: CausalState | None = None,
                          ) -> tuple[Tensor, DispatchStats]:
    """Token choice, dropless or within capacity (layers/capacity.py: the causal rule for causal
    layers, which updates `state` in generation, the non-causal one otherwise). `mask_T` (T,)
    bool marks real tokens: padded ones claim nothing and get a zero output."""
    active_TK = active_assignments(routing, mask_T)
    if plan.capacity_factor is None:
        return _dropless(x_TD, routing, experts, plan, active_TK)
    num_experts = experts.num_experts
    if cfg.causal:
        kept = keep_causal(routing, num_experts, seq_len, plan.capacity_factor, cfg.min_capacity, active_TK,
                           mask_T, state)
    else:
        num_real, real_rank_T = x_TD.shape[0], None
        if mask_T is not None:  # groups are cut from the real tokens (their count is read here)
            num_real = int(mask_T.sum())
            real_rank_T = mask_T.long().cumsum(0) - 1
        group_len = group_size(max(num_real, 1), cfg.num_groups)
        capacity = prefix_capacity(group_len, plan.capacity_factor, cfg.effective_top_k, num_experts,
                                   cfg.min_capacity)
        kept = keep_noncausal(routing, num_experts, group_len, capacity, cfg.overflow_policy, active_TK,
                              real_rank_T)
    return _with_capacity(x_TD, routing, experts, plan, kept)


def _dropless(x_TD: Tensor, routing: TokenChoice, experts, plan: Plan, active_TK: Tensor | None
              ) -> tuple[Tensor, DispatchStats]:
    num_tokens, d_model = x_TD.shape
    num_experts = experts.num_experts
    k = routing.expert_idx_TK.shape[1]
    if plan.path is Path.NATIVE_DECODE and active_TK is None:
        # sort, gather and combine inside one native call (declined or padded assignments take
        # the sorted decode path below, which weights them to zero)
        w_in, w_out = experts.weights(plan.compute_dtype)
        out_TD, tokens_per_expert, dropped, offered = routed_ffn_decode_native(
            x_TD, routing.expert_idx_TK, routing.weight_TK, w_in, w_out, experts.activation)
        return out_TD, DispatchStats(tokens_per_expert, dropped, offered)
    expert_N = routing.expert_idx_TK.reshape(-1)  # token-major: n = t*K + k
    weight_N = routing.weight_TK.reshape(-1)
    if active_TK is not None:
        # Declined assignments still flow through (no data-dependent shapes) with weight 0.
        weight_N = weight_N * active_TK.reshape(-1)
    order_N, counts_E, offs_E = sort_by_expert(expert_N, num_experts)
    token_N = order_N // k  # token of each row, rows grouped by expert
    gate_N = weight_N.index_select(0, order_N)
    if plan.path is not Path.MODULES:
        # Off CPU the combine sums each token's K rows through the inverse permutation rather
        # than with atomics, so it stays deterministic; on CPU index_add_ already is.
        inverse_N = None if x_TD.device.type == "cpu" else inverse_permutation(order_N)
        out_TD = fused_rows(x_TD, token_N, gate_N, offs_E, experts, plan, inverse_N=inverse_N)
    else:
        x_sorted_ND = x_TD.index_select(0, token_N)  # (N, D) rows grouped by expert
        y_sorted_ND = experts.forward_grouped(x_sorted_ND, offs_E, expert_N.index_select(0, order_N))
        y_sorted_ND = y_sorted_ND.to(acc_dtype(x_TD)) * gate_N.unsqueeze(-1)
        # Summing the K rows of a token in float32 through the inverse permutation is
        # deterministic (no atomics) and exact enough for bf16 activations.
        y_TKD = y_sorted_ND.index_select(0, inverse_permutation(order_N)).view(num_tokens, k, d_model)
        out_TD = y_TKD.sum(dim=1)
    if active_TK is None:
        tokens_per_expert = counts_E.float()
        offered_t = torch.tensor(float(expert_N.numel()), device=x_TD.device)
    else:
        active_N = active_TK.reshape(-1).float()
        tokens_per_expert = expert_counts(expert_N, num_experts, active_N)
        offered_t = active_N.sum()
    return out_TD, DispatchStats(tokens_per_expert, offered_t.new_zeros(()), offered_t)


def _with_capacity(x_TD: Tensor, routing: TokenChoice, experts, plan: Plan, kept: Kept
                   ) -> tuple[Tensor, DispatchStats]:
    num_tokens, d_model = x_TD.shape
    num_experts = experts.num_experts
    k = routing.expert_idx_TK.shape[1]
    num_groups, capacity, keep_N, active_N = kept.num_groups, kept.capacity, kept.keep_N, kept.active_N
    expert_N = routing.expert_idx_TK.reshape(-1)
    token_N = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(k)
    slots = num_experts * num_groups * capacity
    # Slot of a kept assignment in the (E, G*C) buffer; dropped ones point at a spare slot.
    slot_N = torch.where(keep_N, (expert_N * num_groups + kept.group_N) * capacity + kept.slot_N, slots)
    weight_N = routing.weight_TK.reshape(-1) * keep_N
    if plan.path is not Path.MODULES:
        # Slot tables: the token each slot reads (empty slots read token 0 with gate 0, which
        # adds nothing) and its gate. The scatter is differentiable in the gate.
        token_S = torch.zeros(slots + 1, dtype=torch.long, device=x_TD.device).scatter_(0, slot_N, token_N)[:slots]
        gate_S = weight_N.new_zeros(slots + 1).scatter(0, slot_N, weight_N)[:slots]
        rows = num_groups * capacity
        offs_E = torch.arange(1, num_experts + 1, device=x_TD.device, dtype=torch.int32) * rows
        expert_S = torch.arange(num_experts, device=x_TD.device).repeat_interleave(rows)
        out_TD = fused_rows(x_TD, token_S, gate_S, offs_E, experts, plan, expert_N=expert_S, rows_per_expert=rows)
    else:
        # Table slot -> token (T means "empty", a zero row), then one gather builds the buffer.
        table = torch.full((slots + 1,), num_tokens, dtype=torch.long, device=x_TD.device)
        table.scatter_(0, slot_N, torch.where(keep_N, token_N, num_tokens))
        x_pad = torch.cat([x_TD, x_TD.new_zeros(1, d_model)])
        buf_ECD = x_pad.index_select(0, table[:slots]).view(num_experts, num_groups * capacity, d_model)  # (E, G*C, D)
        y_ECD = experts.forward_padded(buf_ECD)
        y_flat = torch.cat([y_ECD.reshape(slots, d_model), y_ECD.new_zeros(1, d_model)])  # (E*G*C+1, D)
        y_ND = y_flat.index_select(0, slot_N).to(acc_dtype(x_TD)) * weight_N.unsqueeze(-1)
        y_TKD = y_ND.view(num_tokens, k, d_model)
        out_TD = y_TKD.sum(dim=1)
    tokens_per_expert = expert_counts(expert_N, num_experts, keep_N.float())
    offered = active_N.float().sum() if active_N is not None else torch.tensor(float(expert_N.numel()))
    offered = offered.to(x_TD.device)
    return out_TD, DispatchStats(tokens_per_expert, offered - keep_N.float().sum(), offered)


def dispatch_expert_choice(x_TD: Tensor, routing: ExpertChoice, experts, plan: Plan,
                           mask_T: Tensor | None = None) -> tuple[Tensor, DispatchStats]:
    num_tokens, d_model = x_TD.shape
    num_experts, cap = routing.token_idx_EC.shape  # (E, G*C)
    token_S = routing.token_idx_EC.reshape(-1)  # slots grouped by expert, C each
    if plan.path is not Path.MODULES:
        offs_E = torch.arange(1, num_experts + 1, device=x_TD.device, dtype=torch.int32) * cap
        expert_S = torch.arange(num_experts, device=x_TD.device).repeat_interleave(cap)
        out_TD = fused_rows(x_TD, token_S, routing.weight_EC.reshape(-1), offs_E, experts, plan,
                            expert_N=expert_S, rows_per_expert=cap)
    else:
        buf_ECD = x_TD.index_select(0, token_S).view(num_experts, cap, d_model)  # (E, C, D)
        y_ECD = experts.forward_padded(buf_ECD)
        y_ND = y_ECD.reshape(-1, d_model).to(acc_dtype(x_TD)) * routing.weight_EC.reshape(-1, 1)
        out_TD = torch.zeros(num_tokens, d_model, dtype=y_ND.dtype, device=x_TD.device).index_add_(0, token_S, y_ND)
    taken_T = torch.zeros(num_tokens, device=x_TD.device).index_fill_(0, routing.token_idx_EC.reshape(-1), 1.0)
    tokens_per_expert = torch.full((num_experts,), float(cap), device=x_TD.device)
    # Padding: the experts chose among the real tokens only (routers/expert_choice.py).
    offered = torch.tensor(float(num_tokens), device=x_TD.device) if mask_T is None else mask_T.float().sum()
    return out_TD, DispatchStats(tokens_per_expert, offered - taken_T.sum(), offered)


def dispatch_soft(x_TD: Tensor, routing: SoftRouting, experts) -> tuple[Tensor, DispatchStats]:
    num_tokens, d_model = x_TD.shape
    num_seq, seq_len, num_slots = routing.dispatch_BLX.shape
    num_experts = experts.num_experts
    per_expert = num_slots // num_experts
    x_BLD = x_TD.view(num_seq, seq_len, d_model)
    slots_BXD = torch.einsum("bld,blx->bxd", x_BLD.to(routing.dispatch_BLX.dtype), routing.dispatch_BLX)  # (B, X, D)
    # (B, E, S, D) -> (E, B*S, D): every expert sees its S slots of every sequence.
    slots_ECD = slots_BXD.view(num_seq, num_experts, per_expert, d_model).transpose(0, 1)
    slots_ECD = slots_ECD.reshape(num_experts, num_seq * per_expert, d_model).to(x_TD.dtype)
    y_ECD = experts.forward_padded(slots_ECD)
    y_BXD = y_ECD.view(num_experts, num_seq, per_expert, d_model).transpose(0, 1).reshape(num_seq, num_slots, d_model)
    out_BLD = torch.einsum("blx,bxd->bld", routing.combine_BLX, y_BXD.to(routing.combine_BLX.dtype))
    tokens_per_expert = torch.full((num_experts,), float(num_seq * per_expert), device=x_TD.device)
    zero = torch.zeros((), device=x_TD.device)
    return out_BLD.reshape(num_tokens, d_model), DispatchStats(tokens_per_expert, zero, zero + num_tokens)
