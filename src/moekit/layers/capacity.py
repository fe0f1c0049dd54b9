"""Which token-choice assignments fit in the experts' capacity: the two rules.

Shape legend: T tokens, E experts, K top-k, N = T*K assignments (token-major, n = t*K + k),
G groups (or sequences), C rows per (group, expert) in the padded buffer, S sequences, L tokens
per sequence.

**Non-causal** (encoders, vision): the tokens are cut into G groups of ceil(T/G) tokens (GShard
local group dispatch); in each (group, expert) bucket the first C assignments in claim order are
kept, C = ceil(capacity_factor * tokens_per_group * K / E). Claim order is choice-major then
token order, so every token's first choice is served before any second choice (GShard
Algorithm 1, Switch's token order), or, with `overflow_policy="score"`, tokens by descending
top gate (V-MoE's batch prioritized routing, Riquelme et al. 2021 section 4).

**Causal** (decoders, `MoEConfig.causal=True`): the non-causal order lets a later token take an
earlier token's slot (its first choice is served before the earlier token's second choice), so
changing the future would change the past. Here a token's assignments depend only on tokens at
or before it in its own sequence: the group is the sequence, tokens claim in position order, and
the token at position p (counting real tokens from 0) keeps its claim on expert e while e holds
fewer than C(p + 1) tokens of the sequence, C(n) = max(min_capacity, ceil(capacity_factor * n *
K / E)) the capacity of an n-token prefix, so at the end of a sequence of L tokens an expert holds
at most C(L), what the non-causal rule gives a group of L. That first-come rule is sequential, but
with a prefix capacity that never shrinks it has a closed form: after its j-th claim an expert
holds c_j = j + min(0, min over i <= j of (C_i - i)) tokens (C_i the capacity at the i-th
claim), so a whole sequence is decided at once by a running minimum, and in generation with a
KV cache one token at a time from the claims and that minimum the cache carries
(`CausalState`): cached and uncached generation keep the same assignments.

Padding (`mask_T`, False = padding): padded tokens claim nothing; non-causal groups are cut from
the real tokens only (their count is read on the host), and causal positions count real tokens,
so padding changes nothing for the real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit.layers.routers.base import TokenChoice
from moekit.ops.permute import positions_in_bucket


@dataclass
class Kept:
    """Which assignments survive and where each kept one goes in the (E, G*C) buffer."""

    keep_N: Tensor  # bool (N,)
    group_N: Tensor  # int64 (N,) group (or sequence) of each assignment
    slot_N: Tensor  # int64 (N,) row of a kept assignment within its (group, expert) bucket
    num_groups: int
    capacity: int  # buffer rows per (group, expert)
    active_N: Tensor | None  # bool (N,): assignments that claimed (None: all)


@dataclass
class CausalState:
    """What a causal layer with capacity carries from one call to the next in generation with a
    KV cache: per sequence, the real tokens seen so far, and per expert the claims so far and the
    running minimum of (capacity - claims) (the tokens the expert holds are claims + minimum)."""

    seen_S: Tensor | None = None  # int64 (S,)
    claims_SE: Tensor | None = None  # int64 (S, E)
    slack_SE: Tensor | None = None  # int64 (S, E), <= 0


def active_assignments(routing: TokenChoice, mask_T: Tensor | None) -> Tensor | None:
    """(T, K) bool of the assignments that claim an expert: the router's own (GShard's random
    second expert) and not padding; None when all do."""
    active_TK = routing.active_TK
    if mask_T is None:
        return active_TK
    real_TK = mask_T.unsqueeze(1).expand_as(routing.expert_idx_TK)
    return real_TK if active_TK is None else active_TK & real_TK


def group_size(num_tokens: int, num_groups: int) -> int:
    return -(-num_tokens // num_groups)


def keep_noncausal(routing: TokenChoice, num_experts: int, group_len: int, capacity: int, policy: str,
                   active_TK: Tensor | None, real_rank_T: Tensor | None = None) -> Kept:
    """The non-causal rule. `real_rank_T`: each token's index among the real tokens (padding
    present), so that groups are cut from the real tokens only."""
    num_tokens, k = routing.expert_idx_TK.shape
    device = routing.expert_idx_TK.device
    expert_N = routing.expert_idx_TK.reshape(-1)
    token_N = torch.arange(num_tokens, device=device).repeat_interleave(k)
    if real_rank_T is None:
        num_groups = -(-num_tokens // group_len)
        group_N = token_N // group_len
    else:
        num_real = int(real_rank_T.max()) + 1 if real_rank_T.numel() else 0
        num_groups = max(1, -(-num_real // group_len))
        group_N = real_rank_T.clamp_min(0).index_select(0, token_N) // group_len
    bucket_N = group_N * num_experts + expert_N
    active_N = None if active_TK is None else active_TK.reshape(-1)
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
    return Kept(keep_N, group_N, pos_N, num_groups, capacity, active_N)


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


def prefix_capacity(n: Tensor | int, factor: float, k: int, num_experts: int, min_capacity: int):
    """C(n) = max(1, min(max(ceil(factor * n * K / E), min_capacity), n)): the capacity of an
    n-token prefix (MoEConfig.capacity's formula with n tokens per group)."""
    if isinstance(n, int):
        return max(1, min(max(math.ceil(factor * n * k / num_experts), min_capacity), n))
    cap = torch.ceil(factor * n.double() * k / num_experts).long()  # the same float64 operations
    return torch.minimum(cap.clamp_min(min_capacity), n).clamp_min(1)


def keep_causal(routing: TokenChoice, num_experts: int, seq_len: int, factor: float, min_capacity: int,
                active_TK: Tensor | None, mask_T: Tensor | None, state: CausalState | None) -> Kept:
    """The causal rule (module docstring); updates `state` in place when given."""
    expert_TK = routing.expert_idx_TK
    num_tokens, k = expert_TK.shape
    device = expert_TK.device
    num_seq = num_tokens // seq_len
    spare = num_seq * num_experts  # the bucket of assignments that claim nothing
    real_SL = (torch.ones(num_seq, seq_len, dtype=torch.long, device=device) if mask_T is None
               else mask_T.reshape(num_seq, seq_len).long())
    zeros_SE = torch.zeros(num_seq, num_experts, dtype=torch.long, device=device)
    seen_S, claims_SE, slack_SE = torch.zeros(num_seq, dtype=torch.long, device=device), zeros_SE, zeros_SE
    if state is not None and state.seen_S is not None:
        if state.seen_S.shape != (num_seq,) or state.claims_SE.shape != (num_seq, num_experts):
            raise ValueError(f"CausalState holds {state.seen_S.shape[0]} sequences of {state.claims_SE.shape[1]} "
                             f"experts; this call has {num_seq} sequences of {num_experts}")
        seen_S, claims_SE, slack_SE = state.seen_S, state.claims_SE, state.slack_SE
    pos_SL = real_SL.cumsum(dim=1) - 1 + seen_S.unsqueeze(1)  # position of each real token
    token_N = torch.arange(num_tokens, device=device).repeat_interleave(k)
    bucket_N = (token_N // seq_len) * num_experts + expert_TK.reshape(-1)  # (sequence, expert)
    active_N = None if active_TK is None else active_TK.reshape(-1)
    if active_N is not None:
        bucket_N = torch.where(active_N, bucket_N, spare)
    # Claims by bucket; token-major order is position order within a sequence (stable sort).
    order_N = torch.argsort(bucket_N, stable=True)
    bucket_s = bucket_N.index_select(0, order_N)
    counts = torch.zeros(spare + 1, dtype=torch.long, device=device).index_add_(0, bucket_N, torch.ones_like(bucket_N))
    first = torch.cumsum(counts, 0) - counts
    rank_s = torch.arange(bucket_N.numel(), device=device) - first.index_select(0, bucket_s)
    padded_zero = torch.zeros(1, dtype=torch.long, device=device)
    prior_claims_s = torch.cat([claims_SE.reshape(-1), padded_zero]).index_select(0, bucket_s)
    prior_slack_s = torch.cat([slack_SE.reshape(-1), padded_zero]).index_select(0, bucket_s)
    j_s = prior_claims_s + rank_s + 1  # this is the expert's j-th claim in the sequence
    pos_s = pos_SL.reshape(-1).index_select(0, token_N.index_select(0, order_N))
    v_s = prefix_capacity(pos_s + 1, factor, k, num_experts, min_capacity) - j_s
    # Running minimum within each bucket: a decreasing offset per bucket keeps earlier buckets'
    # values above every later one, so one cummin over all claims restarts at each bucket.
    big = int(j_s.max()) + int(pos_s.abs().max()) + 4 if j_s.numel() else 1
    offset_s = (spare - bucket_s) * big
    slack_s = torch.minimum(torch.cummin(v_s + offset_s, dim=0).values - offset_s, prior_slack_s.clamp_max(0))
    slack_s = slack_s.clamp_max(0)
    before_s = torch.where(rank_s == 0, prior_slack_s, slack_s.roll(1))
    keep_s = (slack_s == before_s) & (bucket_s != spare)  # held tokens grew by one: kept
    keep_N = torch.empty_like(keep_s)
    keep_N[order_N] = keep_s
    slot_N = positions_in_bucket(torch.where(keep_N, bucket_N, spare), spare + 1)
    longest = int(seen_S.max()) + seq_len if num_seq and state is not None else seq_len
    capacity = min(seq_len, prefix_capacity(longest, factor, k, num_experts, min_capacity))
    if state is not None:
        last = torch.zeros(spare + 1, dtype=torch.long, device=device).scatter_reduce_(
            0, bucket_s, slack_s, reduce="amin", include_self=True)
        state.claims_SE = claims_SE + counts[:spare].view(num_seq, num_experts)
        state.slack_SE = torch.minimum(slack_SE, last[:spare].view(num_seq, num_experts))
        state.seen_S = seen_S + real_SL.sum(dim=1)
    return Kept(keep_N, token_N // seq_len, slot_N, max(num_seq, 1), capacity, active_N)
