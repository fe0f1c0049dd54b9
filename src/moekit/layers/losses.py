"""Auxiliary router losses as pure functions of router outputs.

Shape legend: T tokens, E experts, K top-k, G groups, B sequences, L tokens per sequence.
All functions take float32 scores and return an unweighted float32 scalar; the caller applies
the coefficient. Each is scaled so that a perfectly balanced router scores 1 (load balancing)
or 0 (CV^2), which keeps coefficients comparable across routers.

Padding: the per-token losses are computed on the real tokens only (`real(t, mask_T)` drops the
padded rows, so a padded batch scores what its real tokens alone score); the per-sequence loss
takes the mask itself.
"""

from __future__ import annotations

import torch
from torch import Tensor


def real(t: Tensor, mask_T: Tensor | None) -> Tensor:
    """The rows of a per-token tensor that are real tokens (all of them without a mask)."""
    return t if mask_T is None else t[mask_T]


def expert_fraction(expert_idx: Tensor, num_experts: int, active: Tensor | None = None) -> Tensor:
    """Fraction of (token, choice) assignments that go to each expert, shape (E,)."""
    idx = expert_idx.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.float32, device=idx.device)
    if active is None:  # every assignment counts: the total is known without a reduction
        return counts.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32)).div_(max(idx.numel(), 1))
    weight = active.reshape(-1).float()
    return counts.index_add_(0, idx, weight) / weight.sum().clamp_min(1.0)


def load_balancing_loss(probs_TE: Tensor, expert_idx_TK: Tensor) -> Tensor:
    """Switch Transformers eq. 4-6 (Fedus et al. 2021): E * sum_e f_e * P_e.

    f_e is the fraction of assignments dispatched to expert e (not differentiable) and P_e the
    mean router probability of e (differentiable). For top-k the fraction is taken over all T*K
    assignments, as in ST-MoE and Mixtral, so a uniform router scores exactly 1.
    """
    num_experts = probs_TE.shape[-1]
    f_E = expert_fraction(expert_idx_TK, num_experts)
    p_E = probs_TE.mean(dim=0)
    return num_experts * (f_E * p_E).sum()


def gshard_aux_loss(probs_TE: Tensor, top1_T: Tensor, num_groups: int) -> Tensor:
    """GShard (Lepikhin et al. 2020, Algorithm 1): per group, mean_e (c_e / S) * m_e.

    c_e counts the tokens whose *first* choice is e, m_e is the mean gate of e, S the group size.
    The reference implementation (mesh-tensorflow `_top_2_gating`) multiplies the mean over e by
    E^2 so a balanced router scores 1; we keep that scaling and average over groups.
    """
    num_tokens, num_experts = probs_TE.shape
    groups = _split_groups(num_tokens, num_groups)
    total = probs_TE.new_zeros(())
    for start, end in groups:
        f_E = expert_fraction(top1_T[start:end], num_experts)
        m_E = probs_TE[start:end].mean(dim=0)
        total = total + num_experts * (f_E * m_E).sum()
    return total / len(groups)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE eq. 5 (Zoph et al. 2022): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, var / mean^2 (Shazeer et al. 2017, eq. 6-7).

    Population variance, as the original `tf.nn.moments`; zero for fewer than two values.
    """
    if values.numel() < 2:
        return values.new_zeros(())
    return values.var(unbiased=False) / (values.mean().square() + eps)


def importance_loss(gates_TE: Tensor) -> Tensor:
    """Shazeer et al. 2017, eq. 6: CV^2 of Importance_e = sum over tokens of the gate of e."""
    return cv_squared(gates_TE.sum(dim=0))


def load_loss(load_E: Tensor) -> Tensor:
    """Shazeer et al. 2017, eq. 10-11: CV^2 of the smooth load estimate (see noisy_topk)."""
    return cv_squared(load_E)


def sequence_balance_loss(scores_TE: Tensor, expert_idx_TK: Tensor, seq_len: int,
                          mask_T: Tensor | None = None) -> Tensor:
    """DeepSeek-V3 eq. 17-20: per sequence, sum_i f_i P_i with f_i = E/(K*L) * count_i and
    P_i the mean of the per-token normalised affinities s_i / sum_j s_j; averaged over sequences.
    A balanced router scores 1. With `mask_T` (False = padding) L counts a sequence's real
    tokens and sequences without any are left out of the mean.
    """
    if mask_T is not None:
        return _masked_sequence_balance_loss(scores_TE, expert_idx_TK, seq_len, mask_T)
    num_tokens, num_experts = scores_TE.shape
    k = expert_idx_TK.shape[-1]
    seq_len = max(1, min(seq_len, num_tokens))
    if num_tokens % seq_len:
        seq_len = num_tokens  # irregular leading shape: treat the call as one sequence
    num_seq = num_tokens // seq_len
    s_BLE = scores_TE.reshape(num_seq, seq_len, num_experts)
    s_BLE = s_BLE / s_BLE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    p_BE = s_BLE.mean(dim=1)
    one_hot = torch.zeros(num_tokens, num_experts, dtype=scores_TE.dtype, device=scores_TE.device)
    one_hot.scatter_(1, expert_idx_TK, 1.0)  # (T, E), distinct experts per token
    f_BE = one_hot.reshape(num_seq, seq_len, num_experts).sum(dim=1) * (num_experts / (k * seq_len))
    return (f_BE * p_BE).sum(dim=-1).mean()


def _masked_sequence_balance_loss(scores_TE: Tensor, expert_idx_TK: Tensor, seq_len: int, mask_T: Tensor) -> Tensor:
    num_tokens, num_experts = scores_TE.shape
    k = expert_idx_TK.shape[-1]
    num_seq = num_tokens // seq_len  # the caller's (..., L, D) input: L divides T
    m_BL1 = mask_T.reshape(num_seq, seq_len, 1).to(scores_TE.dtype)
    s_BLE = scores_TE.reshape(num_seq, seq_len, num_experts)
    s_BLE = s_BLE / s_BLE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    n_B1 = m_BL1.sum(dim=1)  # real tokens per sequence
    p_BE = (s_BLE * m_BL1).sum(dim=1) / n_B1.clamp_min(1.0)
    one_hot = torch.zeros(num_tokens, num_experts, dtype=scores_TE.dtype, device=scores_TE.device)
    one_hot.scatter_(1, expert_idx_TK, 1.0)
    counts_BE = (one_hot.reshape(num_seq, seq_len, num_experts) * m_BL1).sum(dim=1)
    f_BE = counts_BE * num_experts / (k * n_B1.clamp_min(1.0))
    has_B = n_B1.squeeze(1) > 0
    return (f_BE * p_BE).sum(dim=-1)[has_B].mean()


def global_fraction_and_mean_prob(probs_TE: Tensor, expert_idx_TK: Tensor, batch) -> tuple[Tensor, Tensor]:
    """f_E (share of assignments per expert, no gradient) and P_E (mean probability) over a batch
    spread across ranks (`batch`: moekit.parallel.GlobalBatch), for the load-balancing loss."""
    num_experts = probs_TE.shape[-1]
    counts_E = torch.zeros(num_experts, device=probs_TE.device).index_add_(
        0, expert_idx_TK.reshape(-1), torch.ones(expert_idx_TK.numel(), device=probs_TE.device)
    )
    counts_E = batch.sum_nograd(counts_E)
    f_E = counts_E / (batch.total * expert_idx_TK.shape[-1] if batch.total else 1.0)
    p_E = batch.sum(probs_TE.sum(dim=0)) / max(batch.total, 1)
    return f_E, p_E


def sequence_count(num_tokens: int, seq_len: int) -> int:
    """Sequences `sequence_balance_loss` sees in a (T, E) call (mirrors its irregular-shape rule)."""
    if num_tokens == 0:
        return 0
    seq = max(1, min(seq_len, num_tokens))
    return num_tokens // (seq if num_tokens % seq == 0 else num_tokens)


def _split_groups(num_tokens: int, num_groups: int) -> list[tuple[int, int]]:
    """Contiguous groups of ceil(T/G) tokens (the last may be shorter), never empty."""
    size = -(-num_tokens // max(1, num_groups))
    return [(s, min(s + size, num_tokens)) for s in range(0, num_tokens, max(1, size))]
