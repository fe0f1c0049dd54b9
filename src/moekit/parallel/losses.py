"""Router auxiliary losses and metrics over the global token set, from per-rank sufficient statistics.

Shape legend: T tokens on this rank, E experts, K top-k, G groups, X = E*S soft slots.

Each router's balancing loss is a function of sums over tokens (the fraction of assignments per
expert, the mean router probability per expert, CV^2 of summed gates, per-group or per-sequence
terms). Under EP each rank computes its partial sums, one all-reduce gives the global sums, and
the router's own loss function (layers/losses.py) is applied to them: the same number the
single-process layer computes on the concatenated batch, with O(E) (or O(G*E)) bytes on the
wire instead of gathering tokens. Differentiable sums use `GlobalBatch.sum` (forward-only
all-reduce whose backward scales by the world size; see parallel/comm.py for why that is exact).

Each router class says how, in its own file (`Router.global_balance_losses`). A router class
without it is refused by `EPMoE` with an error naming it; `register_router_rule` gives one to a
router class from outside (a user's router that does not define it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from moekit.layers.dispatch import DispatchStats
from moekit.layers.metrics import routing_metrics
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
    if rule is not None:
        return rule
    # Its own class must define it: a subclass may compute other losses than the class it extends.
    if "global_balance_losses" in vars(type(router)):
        return type(router).global_balance_losses
    raise ValueError(
        f"router {type(router).__name__} has no expert-parallel rule for its auxiliary losses "
        f"(needed to compute them over the global batch): define "
        f"{type(router).__name__}.global_balance_losses (see layers/routers/base.py), or register one with "
        f"moekit.parallel.register_router_rule({type(router).__name__}, rule)"
    )


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
