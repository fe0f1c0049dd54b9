"""Routing metrics: plain detached tensors any logger can take.

tokens_per_expert (E,)   assignments each expert computed, after capacity drops
drop_fraction            share of the router's assignments dropped by capacity (for expert
                         choice: share of tokens no expert took)
router_entropy           mean over tokens of the entropy (nats) of the router's distribution
load_imbalance           max / mean of tokens_per_expert (1 = perfectly balanced)
max_load, mean_load      the two numbers behind load_imbalance
experts_without_tokens   how many experts got no token
loss/<name>              each unweighted auxiliary loss term the router computed

`MoE` returns them as a `LazyMetrics` mapping, computed on first read: about twenty small ops
that an inference forward nobody reads the metrics of does not pay (docs/performance.md,
"Numbers behind the code").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import Tensor

from moekit.layers.dispatch import DispatchStats


@torch.no_grad()
def routing_metrics(probs_TE: Tensor, stats: DispatchStats, losses: dict[str, Tensor]) -> dict[str, Tensor]:
    tpe = stats.tokens_per_expert.detach().float()
    p = probs_TE.detach().float()
    entropy = -(p * p.clamp_min(1e-20).log()).sum(dim=-1).mean() if p.numel() else p.new_zeros(())
    mean_load = tpe.mean()
    max_load = tpe.max()
    metrics = {
        "tokens_per_expert": tpe,
        "drop_fraction": (stats.dropped / stats.offered.clamp_min(1.0)).float(),
        "router_entropy": entropy,
        "load_imbalance": torch.where(mean_load > 0, max_load / mean_load.clamp_min(1e-20), 0.0),
        "max_load": max_load,
        "mean_load": mean_load,
        "experts_without_tokens": (tpe == 0).sum().float(),
    }
    for name, value in losses.items():
        metrics[f"loss/{name}"] = value.detach().float()
    return metrics


class LazyMetrics(Mapping):
    """`routing_metrics(probs_TE, stats, losses)` as a read-only mapping computed on first read."""

    __slots__ = ("_args", "_values")

    def __init__(self, probs_TE: Tensor, stats: DispatchStats, losses: dict[str, Tensor]):
        self._args = (probs_TE.detach(), stats, dict(losses))
        self._values: dict[str, Tensor] | None = None

    def _computed(self) -> dict[str, Tensor]:
        if self._values is None:
            self._values, self._args = routing_metrics(*self._args), None
        return self._values

    def __getitem__(self, key: str) -> Tensor:
        return self._computed()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._computed())

    def __len__(self) -> int:
        return len(self._computed())

    def __repr__(self) -> str:
        return f"LazyMetrics({self._computed()!r})"


def empty_metrics(num_experts: int, device: torch.device) -> dict[str, Tensor]:
    zero = torch.zeros((), device=device)
    return {
        "tokens_per_expert": torch.zeros(num_experts, device=device),
        "drop_fraction": zero.clone(),
        "router_entropy": zero.clone(),
        "load_imbalance": zero.clone(),
        "max_load": zero.clone(),
        "mean_load": zero.clone(),
        "experts_without_tokens": torch.tensor(float(num_experts), device=device),
    }
