"""Router auxiliary losses and metrics over the global token set, from per-rank sufficient statistics.

Shape legend: T tokens on this rank, E experts, K top-k, G groups, X = E*S soft slots.

Each router's balancing loss is a function of sums over tokens (the fraction of assignments per
expert, the mean router probability per expert, CV^2 of summed gates, per-group or per-sequence
terms). Under EP each rank computes its partial sums, one all-reduce gives the global sums, and
the router's own loss function (layers/losses.py) is applied to them: the same number the
single-process layer computes on the concatenated batch, with O(E) (or O(G*E)) bytes on the
wire instead of gathering tokens. Differentiable sums use `GlobalBatch.sum` (forward-only
all-reduce whose backward scales by the world size; see parallel/comm.py for why that is exact).

A rule per router class says which statistics to reduce. A router class with no rule is refused
by `EPMoE` with an error naming it; users with their own router add a rule through
`register_router_rule`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.layers import losses as L
from moekit.layers.dispatch import DispatchStats
from moekit.layers.metrics import routing_metrics
from moekit.layers.routers import ROUTERS
from moekit.layers.routers.base import Router, Routing
from moekit.parallel.global_batch import GlobalBatch

# rule(router, routing, x_TD, seq_len, batch) -> {name: unweighted global loss}, in the order
# the router itself lists its balancing terms (the weighted sum then adds them in that order).
RouterRule = Callable[[Router, Routing, Tensor, int, GlobalBatch], dict[str, Tensor]]
RULES: dict[type, RouterRule] = {}


def register_router_rule(router_cls: type, rule: RouterRule) -> None:
    """Teach EP the global version of a router's balancing losses (exact class match)."""
    RULES[router_cls] = rule


def rule_for(router: Router) -> RouterRule:
    rule = RULES.get(type(router))
    if rule is None:
        raise ValueError(
            f"router {type(router).__name__} has no expert-parallel rule for its auxiliary losses "
            f"(needed to compute them over the global batch); routers with rules: "
            f"{sorted(c.__name__ for c in RULES)}. Register one with "
            f"moekit.parallel.register_router_rule({type(router).__name__}, rule)"
        )
    return rule


def _fraction_and_mean_prob(probs_TE: Tensor, expert_idx_TK: Tensor, batch: GlobalBatch) -> tuple[Tensor, Tensor]:
    """Global f_E (share of assignments per expert, no gradient) and P_E (mean probability)."""
    num_experts = probs_TE.shape[-1]
    counts_E = torch.zeros(num_experts, device=probs_TE.device).index_add_(
        0, expert_idx_TK.reshape(-1), torch.ones(expert_idx_TK.numel(), device=probs_TE.device)
    )
    counts_E = batch.sum_nograd(counts_E)
    f_E = counts_E / (batch.total * expert_idx_TK.shape[-1] if batch.total else 1.0)
    p_E = batch.sum(probs_TE.sum(dim=0)) / max(batch.total, 1)
    return f_E, p_E


def _load_balancing(router, routing, x_TD, seq_len, batch) -> dict[str, Tensor]:
    # Switch eq. 4-6 / ST-MoE, as L.load_balancing_loss: E * sum_e f_e P_e over all T*K choices.
    f_E, p_E = _fraction_and_mean_prob(routing.probs_TE, routing.expert_idx_TK, batch)
    return {"load_balancing_loss": router.num_experts * (f_E * p_E).sum()}


def _dense(router, routing, x_TD, seq_len, batch) -> dict[str, Tensor]:
    # Importance CV^2 (Shazeer et al. 2017 eq. 6) of the globally summed gates.
    return {"importance_loss": L.cv_squared(batch.sum(routing.probs_TE.sum(dim=0)))}


def _noisy_topk(router, routing, x_TD, seq_len, batch) -> dict[str, Tensor]:
    k, num_experts = router.top_k, router.num_experts
    logits_TE, expert_idx_TK, weight_TK = routing.logits_TE, routing.expert_idx_TK, routing.weight_TK
    gates_TE = torch.zeros_like(logits_TE).scatter(1, expert_idx_TK, weight_TK)
    terms = {"importance_loss": L.cv_squared(batch.sum(gates_TE.sum(dim=0)))}
    if router.training and k < num_experts:
        # The smooth load estimator of the paper's appendix A (eq. 8-11), summed over the global
        # batch before CV^2. The router does not expose its per-expert load, so the clean logits
        # and noise scale are recomputed here exactly as NoisyTopKRouter.forward does; the
        # parity tests against the single-process layer keep the two in step.
        clean_TE = router.gate_logits(x_TD)
        std_TE = F.softplus(F.linear(x_TD.float(), router.noise_weight.float())) + router.opts.noise_epsilon
        top_vals = logits_TE.topk(min(k + 1, num_experts), dim=-1).values
        in_topk = logits_TE >= top_vals[:, k - 1 : k]
        threshold_TE = torch.where(in_topk, top_vals[:, k : k + 1], top_vals[:, k - 1 : k])
        normal = torch.distributions.Normal(0.0, 1.0)
        load_E = batch.sum(normal.cdf((clean_TE - threshold_TE) / std_TE).sum(dim=0))
    else:
        load_E = batch.sum_nograd(gates_TE.gt(0).float().sum(dim=0))
    terms["load_loss"] = L.load_loss(load_E)
    return terms


def _gshard(router, routing, x_TD, seq_len, batch) -> dict[str, Tensor]:
    # GShard Algorithm 1 per group of the *global* batch: groups are contiguous runs of
    # ceil(T_global / G) tokens, as L.gshard_aux_loss splits the concatenated batch.
    probs_TE = routing.probs_TE
    num_experts = probs_TE.shape[-1]
    total = batch.total
    size = -(-total // max(1, router.cfg.num_groups))
    num_groups = -(-total // size)
    group_T = (torch.arange(probs_TE.shape[0], device=probs_TE.device) + batch.offset) // size
    prob_sum_GE = torch.zeros(num_groups, num_experts, device=probs_TE.device).index_add(0, group_T, probs_TE)
    prob_sum_GE = batch.sum(prob_sum_GE)
    top1_GE = torch.zeros(num_groups, num_experts, device=probs_TE.device)
    top1_GE.index_put_((group_T, routing.expert_idx_TK[:, 0]), torch.ones_like(group_T, dtype=torch.float32),
                       accumulate=True)
    top1_GE = batch.sum_nograd(top1_GE)
    starts = torch.arange(num_groups, device=probs_TE.device) * size
    group_len_G1 = (torch.clamp(total - starts, max=size)).float().unsqueeze(1)  # the last may be short
    per_group = num_experts * ((top1_GE / group_len_G1) * (prob_sum_GE / group_len_G1)).sum(dim=-1)
    return {"gshard_aux_loss": per_group.sum() / num_groups}


def sequence_count(num_tokens: int, seq_len: int) -> int:
    """Sequences L.sequence_balance_loss sees in a (T, E) call (mirrors its irregular-shape rule)."""
    if num_tokens == 0:
        return 0
    seq = max(1, min(seq_len, num_tokens))
    return num_tokens // (seq if num_tokens % seq == 0 else num_tokens)


def _sigmoid_bias(router, routing, x_TD, seq_len, batch) -> dict[str, Tensor]:
    # DeepSeek-V3 eq. 17-20 is a mean over sequences; sequences never span ranks (each rank's
    # second-to-last input dim), so the global mean is sum over ranks of (local mean * count)
    # divided by the global count of sequences.
    scores_TE = routing.logits_TE.sigmoid()
    num_seq = sequence_count(scores_TE.shape[0], seq_len)
    if num_seq:
        local = L.sequence_balance_loss(scores_TE, routing.expert_idx_TK, seq_len) * num_seq
    else:
        local = scores_TE.sum() * 0.0  # keeps the graph (and the collective) identical on every rank
    total_seq = sum(sequence_count(n, seq_len) for n in batch.sizes) if batch.world > 1 else num_seq
    return {"sequence_balance_loss": batch.sum(local) / max(total_seq, 1)}


def _none(router, routing, x_TD, seq_len, batch) -> dict[str, Tensor]:
    return {}  # expert choice and Soft MoE are balanced by construction


for _name, _rule in {
    "dense": _dense,
    "noisy_topk": _noisy_topk,
    "switch": _load_balancing,
    "gshard": _gshard,
    "softmax_topk": _load_balancing,
    "sigmoid_bias": _sigmoid_bias,
    "expert_choice": _none,
    "soft": _none,
}.items():
    register_router_rule(ROUTERS[_name], _rule)


def router_z_loss(logits_TX: Tensor, batch: GlobalBatch) -> Tensor:
    """ST-MoE eq. 5 over the global batch: mean of logsumexp(logits)^2."""
    local = torch.logsumexp(logits_TX.float(), dim=-1).square().sum()
    return batch.sum(local) / max(batch.total, 1)


def global_aux_loss(router: Router, routing: Routing, logits_TX: Tensor, x_TD: Tensor, seq_len: int,
                    batch: GlobalBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """(weighted aux loss, unweighted terms), summed in the order Router.finish uses."""
    cfg = router.cfg
    losses = dict(rule_for(router)(router, routing, x_TD, seq_len, batch))
    total = logits_TX.new_zeros(())
    for value in losses.values():
        total = total + cfg.aux_loss_coef * value
    if cfg.z_loss_coef > 0:
        losses["z_loss"] = router_z_loss(logits_TX, batch)
        total = total + cfg.z_loss_coef * losses["z_loss"]
    return total, losses


@torch.no_grad()
def global_metrics(probs_TE: Tensor, stats: DispatchStats, losses: dict[str, Tensor],
                   batch: GlobalBatch) -> dict[str, Tensor]:
    """layers/metrics.routing_metrics over the global batch, from this rank's dispatch counts.

    One all-reduce carries the (E,) tokens per expert, the dropped and offered counts and the
    entropy sum. The router entropy, a mean over tokens, is the only metric built from
    per-token values: each rank's mean is weighted by its token count.
    """
    if batch.world == 1:
        return routing_metrics(probs_TE, stats, losses)
    local_entropy = routing_metrics(probs_TE, stats, {})["router_entropy"] * batch.local
    packed = batch.sum_nograd(torch.cat([stats.tokens_per_expert.float().reshape(-1), stats.dropped.reshape(1).float(),
                                         stats.offered.reshape(1).float(), local_entropy.reshape(1).float()]))
    stats = DispatchStats(packed[:-3], packed[-3], packed[-2])
    metrics = routing_metrics(probs_TE, stats, losses)
    metrics["router_entropy"] = packed[-1] / max(batch.total, 1)
    return metrics
