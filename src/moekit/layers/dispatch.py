"""Permute tokens to experts, run the experts, combine: dropless and capacity paths.

Shape legend: T tokens, D d_model, E experts, K assignments per token, N = T*K assignments,
G groups, C capacity per expert and group, X = E*S soft slots, B sequences, L tokens per sequence.

Token choice, dropless: a stable argsort of the N expert ids groups the rows by expert, a gather
builds the sorted activations, one grouped GEMM per projection runs all experts, and the outputs
are weighted and summed back per token. No Python loop over experts, no host sync.

Token choice with capacity: assignments are ranked per (group, expert) bucket in priority order
(all first choices before second choices, GShard Algorithm 1; with `overflow_policy="score"`
tokens are first sorted by their top gate, V-MoE's batch prioritized routing, Riquelme et al.
2021 section 4), the first C of each bucket are kept and written to a fixed (E, G*C, D) buffer
that runs through batched matmuls. Dropped assignments contribute zero; the residual stream
around the layer carries the token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.layers.config import MoEConfig
from moekit.layers.routers.base import ExpertChoice, SoftRouting, TokenChoice
from moekit.ops.permute import expert_counts, positions_in_bucket, sort_by_expert


def acc_dtype(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float32 for half types, the input's own for float32/float64."""
    return torch.promote_types(x.dtype, torch.float32)


@dataclass
class DispatchStats:
    tokens_per_expert: Tensor  # (E,) float32 assignments each expert computed (after drops)
    dropped: Tensor  # scalar float32: assignments (or tokens, for expert choice) dropped
    offered: Tensor  # scalar float32: assignments (or tokens) the router asked for


def dispatch_token_choice(
    x_TD: Tensor, routing: TokenChoice, experts, cfg: MoEConfig, training: bool
) -> tuple[Tensor, DispatchStats]:
    num_tokens = x_TD.shape[0]
    group_size = -(-num_tokens // cfg.num_groups)
    capacity = cfg.capacity(group_size, training)
    if capacity is None:
        return _dropless(x_TD, routing, experts)
    return _with_capacity(x_TD, routing, experts, group_size, capacity, cfg.overflow_policy)


def _dropless(x_TD: Tensor, routing: TokenChoice, experts) -> tuple[Tensor, DispatchStats]:
    num_tokens, d_model = x_TD.shape
    num_experts = experts.num_experts
    k = routing.expert_idx_TK.shape[1]
    expert_N = routing.expert_idx_TK.reshape(-1)  # token-major: n = t*K + k
    weight_N = routing.weight_TK.reshape(-1)
    if routing.active_TK is not None:
        # Declined assignments still flow through (no data-dependent shapes) with weight 0.
        weight_N = weight_N * routing.active_TK.reshape(-1)
    order_N, counts_E, offs_E = sort_by_expert(expert_N, num_experts)
    x_sorted_ND = x_TD[order_N // k]  # gather: (N, D) rows grouped by expert
    y_sorted_ND = experts.forward_grouped(x_sorted_ND, offs_E, expert_N[order_N])
    y_sorted_ND = y_sorted_ND.to(acc_dtype(x_TD)) * weight_N[order_N].unsqueeze(-1)
    inverse_N = torch.empty_like(order_N)
    inverse_N[order_N] = torch.arange(order_N.numel(), device=order_N.device)
    # Summing the K rows of a token in float32 is deterministic (no atomics) and exact enough
    # for bf16 activations.
    out_TD = y_sorted_ND[inverse_N].view(num_tokens, k, d_model).sum(dim=1)
    if routing.active_TK is None:
        tokens_per_expert = counts_E.float()
        offered_t = torch.tensor(float(expert_N.numel()), device=x_TD.device)
    else:
        active_N = routing.active_TK.reshape(-1).float()
        tokens_per_expert = expert_counts(expert_N, num_experts, active_N)
        offered_t = active_N.sum()
    return out_TD, DispatchStats(tokens_per_expert, offered_t.new_zeros(()), offered_t)


def assignment_priority(routing: TokenChoice, policy: str) -> Tensor:
    """Assignment ids (t*K + k) in the order they claim capacity.

    "position": choice-major then token order, so every token's first choice is served before
    any second choice (GShard Algorithm 1, Switch's token order). "score": the same, but tokens
    ordered by descending top gate (V-MoE batch prioritized routing).
    """
    num_tokens, k = routing.expert_idx_TK.shape
    device = routing.expert_idx_TK.device
    if policy == "score":
        priority_T = routing.priority_T
        if priority_T is None:
            priority_T = routing.weight_TK.max(dim=-1).values
        token_order_T = torch.argsort(priority_T.detach(), descending=True, stable=True)
    else:
        token_order_T = torch.arange(num_tokens, device=device)
    choices_K = torch.arange(k, device=device)
    return (token_order_T.unsqueeze(0) * k + choices_K.unsqueeze(1)).reshape(-1)  # (K*T,)


def _with_capacity(
    x_TD: Tensor, routing: TokenChoice, experts, group_size: int, capacity: int, policy: str
) -> tuple[Tensor, DispatchStats]:
    num_tokens, d_model = x_TD.shape
    num_experts = experts.num_experts
    k = routing.expert_idx_TK.shape[1]
    num_groups = -(-num_tokens // group_size)
    expert_N = routing.expert_idx_TK.reshape(-1)
    token_N = torch.arange(num_tokens, device=x_TD.device).repeat_interleave(k)
    group_N = token_N // group_size
    bucket_N = group_N * num_experts + expert_N
    active_N = None if routing.active_TK is None else routing.active_TK.reshape(-1)
    if active_N is not None:
        # Declined assignments queue in a bucket of their own and never take capacity.
        bucket_N = torch.where(active_N, bucket_N, num_groups * num_experts)
    prio_N = assignment_priority(routing, policy)
    pos_prio = positions_in_bucket(bucket_N[prio_N], num_groups * num_experts + 1)
    pos_N = torch.empty_like(pos_prio)
    pos_N[prio_N] = pos_prio
    keep_N = pos_N < capacity
    if active_N is not None:
        keep_N = keep_N & active_N
    slots = num_experts * num_groups * capacity
    # Slot of a kept assignment in the (E, G*C) buffer; dropped ones point at a spare slot.
    slot_N = torch.where(keep_N, (expert_N * num_groups + group_N) * capacity + pos_N, slots)
    # Table slot -> token (T means "empty", a zero row), then one gather builds the buffer.
    table = torch.full((slots + 1,), num_tokens, dtype=torch.long, device=x_TD.device)
    table.scatter_(0, slot_N, torch.where(keep_N, token_N, num_tokens))
    x_pad = torch.cat([x_TD, x_TD.new_zeros(1, d_model)])
    buf_ECD = x_pad[table[:slots]].view(num_experts, num_groups * capacity, d_model)  # (E, G*C, D)
    y_ECD = experts.forward_padded(buf_ECD)
    y_flat = torch.cat([y_ECD.reshape(slots, d_model), y_ECD.new_zeros(1, d_model)])  # (E*G*C+1, D)
    weight_N = routing.weight_TK.reshape(-1) * keep_N
    out_TD = (y_flat[slot_N].to(acc_dtype(x_TD)) * weight_N.unsqueeze(-1)).view(num_tokens, k, d_model).sum(dim=1)
    tokens_per_expert = expert_counts(expert_N, num_experts, keep_N.float())
    offered = active_N.float().sum() if active_N is not None else torch.tensor(float(expert_N.numel()))
    offered = offered.to(x_TD.device)
    return out_TD, DispatchStats(tokens_per_expert, offered - keep_N.float().sum(), offered)


def dispatch_expert_choice(x_TD: Tensor, routing: ExpertChoice, experts) -> tuple[Tensor, DispatchStats]:
    num_tokens, d_model = x_TD.shape
    num_experts, cap = routing.token_idx_EC.shape
    buf_ECD = x_TD[routing.token_idx_EC.reshape(-1)].view(num_experts, cap, d_model)  # (E, C, D)
    y_ECD = experts.forward_padded(buf_ECD)
    y_ND = y_ECD.reshape(-1, d_model).to(acc_dtype(x_TD)) * routing.weight_EC.reshape(-1, 1)
    out_TD = torch.zeros(num_tokens, d_model, dtype=y_ND.dtype, device=x_TD.device).index_add_(
        0, routing.token_idx_EC.reshape(-1), y_ND
    )
    taken_T = torch.zeros(num_tokens, device=x_TD.device).index_fill_(0, routing.token_idx_EC.reshape(-1), 1.0)
    tokens_per_expert = torch.full((num_experts,), float(cap), device=x_TD.device)
    offered = torch.tensor(float(num_tokens), device=x_TD.device)
    return out_TD, DispatchStats(tokens_per_expert, offered - taken_T.sum(), offered)


def dispatch_soft(x_TD: Tensor, routing: SoftRouting, experts) -> tuple[Tensor, DispatchStats]:
    num_tokens, d_model = x_TD.shape
    num_seq, seq_len, num_slots = routing.dispatch_BNX.shape
    num_experts = experts.num_experts
    per_expert = num_slots // num_experts
    x_BLD = x_TD.view(num_seq, seq_len, d_model)
    slots_BXD = torch.einsum("bld,blx->bxd", x_BLD.to(routing.dispatch_BNX.dtype), routing.dispatch_BNX)  # (B, X, D)
    # (B, E, S, D) -> (E, B*S, D): every expert sees its S slots of every sequence.
    slots_ECD = slots_BXD.view(num_seq, num_experts, per_expert, d_model).transpose(0, 1)
    slots_ECD = slots_ECD.reshape(num_experts, num_seq * per_expert, d_model).to(x_TD.dtype)
    y_ECD = experts.forward_padded(slots_ECD)
    y_BXD = y_ECD.view(num_experts, num_seq, per_expert, d_model).transpose(0, 1).reshape(num_seq, num_slots, d_model)
    out_BLD = torch.einsum("blx,bxd->bld", routing.combine_BNX, y_BXD.to(routing.combine_BNX.dtype))
    tokens_per_expert = torch.full((num_experts,), float(num_seq * per_expert), device=x_TD.device)
    zero = torch.zeros((), device=x_TD.device)
    return out_BLD.reshape(num_tokens, d_model), DispatchStats(tokens_per_expert, zero, zero + num_tokens)
