"""Routing decisions that depend on other ranks' tokens: capacity and expert choice.

Shape legend: T tokens on this rank, Tg tokens in the global batch, E experts, K top-k,
N = T*K assignments (token-major, n = t*K + k), G groups, L tokens per group, C capacity.

Both compete within groups of the global batch (contiguous runs of ceil(Tg / num_groups)
tokens of the rank-ordered concatenation), exactly as the single-process layer does on that
concatenation:

- capacity (token choice): an assignment is kept if it is among the first C to claim its
  (group, expert) bucket, claims ordered choice-major then by token (or by descending score
  with `overflow_policy="score"`), GShard Algorithm 1 / V-MoE BPR;
- expert choice: each expert takes the top-C tokens of each group by router probability
  (Zhou et al. 2022, section 3.1).

When every group lies within one rank (`GlobalBatch.groups_are_local`: num_groups a multiple of
the world size and equal per-rank batches, GShard's "local group dispatch"), the decision is made
on local data with no communication. Otherwise the per-token metadata (expert ids, activity and
priority, or router probabilities) is all-gathered and every rank decides for the global batch,
then keeps its own slice: O(Tg*K) integers, or O(Tg*E) floats for expert choice, against the
O(T*K*D) activations of the token exchange.
"""

from __future__ import annotations

import torch
from torch import Tensor

from moekit.layers.capacity import CausalState, keep_causal
from moekit.layers.config import MoEConfig
from moekit.layers.routers.base import TokenChoice
from moekit.layers.routers.expert_choice import expert_choice_capacity
from moekit.ops.permute import positions_in_bucket
from moekit.parallel.global_batch import GlobalBatch


def _claim_order(num_tokens: int, k: int, priority_T: Tensor | None, device) -> Tensor:
    """Assignment ids (t*K + k) in the order they claim capacity: choice-major, then token
    order or descending priority (stable, so ties keep token order)."""
    if priority_T is None:
        token_order_T = torch.arange(num_tokens, device=device)
    else:
        token_order_T = torch.argsort(priority_T, descending=True, stable=True)
    choices_K = torch.arange(k, device=device)
    return (token_order_T.unsqueeze(0) * k + choices_K.unsqueeze(1)).reshape(-1)  # (K*T,)


def _keep_within_capacity(expert_idx_TK: Tensor, active_TK: Tensor | None, priority_T: Tensor | None,
                          num_experts: int, group_size: int, capacity: int) -> Tensor:
    """(N,) bool: which assignments survive capacity; groups are runs of `group_size` tokens."""
    num_tokens, k = expert_idx_TK.shape
    device = expert_idx_TK.device
    num_groups = max(1, -(-num_tokens // group_size))
    expert_N = expert_idx_TK.reshape(-1)
    group_N = torch.arange(num_tokens, device=device).repeat_interleave(k) // group_size
    bucket_N = group_N * num_experts + expert_N
    active_N = None if active_TK is None else active_TK.reshape(-1)
    if active_N is not None:
        # Declined assignments queue in a bucket of their own and never take capacity.
        bucket_N = torch.where(active_N, bucket_N, num_groups * num_experts)
    order = _claim_order(num_tokens, k, priority_T, device)
    pos_in_order = positions_in_bucket(bucket_N[order], num_groups * num_experts + 1)
    pos_N = torch.empty_like(pos_in_order)
    pos_N[order] = pos_in_order
    keep_N = pos_N < capacity
    return keep_N if active_N is None else keep_N & active_N


@torch.no_grad()
def token_choice_keep(routing: TokenChoice, cfg: MoEConfig, batch: GlobalBatch, training: bool, seq_len: int = 1,
                      state: CausalState | None = None) -> Tensor:
    """(N,) bool for this rank's assignments: active and, with capacity, within capacity.

    Causal layers apply the causal rule (layers/capacity.py) per sequence, and sequences never
    span ranks: that decision is this rank's alone."""
    expert_idx_TK = routing.expert_idx_TK
    active_TK = routing.active_TK
    factor = cfg.active_capacity_factor(training)
    if cfg.causal and factor is not None:
        if expert_idx_TK.shape[0] == 0:
            return torch.zeros(0, dtype=torch.bool, device=expert_idx_TK.device)
        return keep_causal(routing, cfg.num_experts, seq_len, factor, cfg.min_capacity, active_TK, None, state).keep_N
    group_size = max(1, -(-batch.total // cfg.num_groups))
    capacity = cfg.capacity(group_size, training)
    if capacity is None:  # dropless: only the router's own declines (GShard's random routing)
        if active_TK is None:
            return torch.ones(expert_idx_TK.numel(), dtype=torch.bool, device=expert_idx_TK.device)
        return active_TK.reshape(-1).clone()
    priority_T = None
    if cfg.overflow_policy == "score":
        priority_T = routing.priority_T if routing.priority_T is not None else routing.weight_TK.max(dim=-1).values
        priority_T = priority_T.detach().float()
    if batch.world == 1 or batch.groups_are_local(group_size):
        return _keep_within_capacity(expert_idx_TK, active_TK, priority_T, cfg.num_experts, group_size, capacity)
    k = expert_idx_TK.shape[1]
    g_idx = batch.gather_rows(expert_idx_TK)
    g_active = None if active_TK is None else batch.gather_rows(active_TK)
    g_prio = None if priority_T is None else batch.gather_rows(priority_T)
    keep = _keep_within_capacity(g_idx, g_active, g_prio, cfg.num_experts, group_size, capacity)
    start = batch.offset * k
    return keep[start : start + expert_idx_TK.numel()]


@torch.no_grad()
def expert_choice_select(probs_TE: Tensor, cfg: MoEConfig, batch: GlobalBatch, training: bool
                         ) -> tuple[Tensor, int]:
    """Global token ids (E, n) each expert takes, in the groups this rank decided, and G*C.

    Mirrors ExpertChoiceRouter.forward on the global batch. Returns the selection and the global
    number of slots per expert (num_groups * C) for the tokens_per_expert metric.
    """
    num_groups, num_experts = cfg.num_groups, cfg.num_experts
    total = batch.total
    if total % num_groups:
        raise ValueError(
            f"expert_choice routes within num_groups={num_groups} equal groups of the global batch, but "
            f"the ranks hold {batch.sizes} tokens (T={total}), which num_groups does not divide"
        )
    group_size = total // num_groups
    factor = cfg.active_capacity_factor(training)
    factor = float(cfg.top_k) if factor is None else factor
    cap = expert_choice_capacity(group_size, num_experts, factor)
    if batch.world == 1 or batch.groups_are_local(group_size):
        scores_TE, first = probs_TE.detach(), batch.offset
    else:
        scores_TE, first = batch.gather_rows(probs_TE.detach().contiguous()), 0
    groups_here = scores_TE.shape[0] // group_size
    probs_GEL = scores_TE.reshape(groups_here, group_size, num_experts).transpose(1, 2)
    local_idx_GEC = probs_GEL.topk(cap, dim=-1).indices  # (G, E, C)
    offset_G11 = (torch.arange(groups_here, device=probs_TE.device) * group_size + first).view(-1, 1, 1)
    token_idx_EC = (local_idx_GEC + offset_G11).transpose(0, 1).reshape(num_experts, -1)  # (E, G*C)
    return token_idx_EC, num_groups * cap
