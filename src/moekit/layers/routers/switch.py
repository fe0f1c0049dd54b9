"""Switch routing: top-1 with multiplicative jitter, capacity and the load-balancing loss.

Fedus, Zoph and Shazeer, "Switch Transformers: Scaling to Trillion Parameter Models with Simple
and Efficient Sparsity", JMLR 2022 (arXiv 2101.03961). Section 2.1: each token goes to the one
expert of highest probability p_i(x) and the output is scaled by p_i(x) (no renormalisation).
Section 2.4: the router input is multiplied by uniform noise in [1 - eps, 1 + eps] during
training ("jitter"). Eq. 4-6: auxiliary loss alpha * E * sum_i f_i P_i. Capacity, with
`capacity_factor` in the MoE config, is the tokens-per-expert budget beyond which tokens skip
the layer and ride the residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.layers.losses import global_fraction_and_mean_prob, load_balancing_loss, real
from moekit.layers.routers.base import Router, TokenChoice

if TYPE_CHECKING:
    from moekit.layers.plan import Plan


@dataclass
class SwitchOptions:
    jitter_eps: float = 0.0  # multiplicative router-input noise in training; the paper tried 1e-2

    def __post_init__(self):
        if not (isinstance(self.jitter_eps, (int, float)) and 0.0 <= self.jitter_eps < 1.0):
            raise ValueError(f"router_options.jitter_eps must be in [0, 1), got {self.jitter_eps!r}")


class SwitchRouter(Router):
    options_cls = SwitchOptions
    fixed_top_k = 1

    def forward(self, x_TD: Tensor, seq_len: int, plan: Plan | None = None,
                mask_T: Tensor | None = None) -> TokenChoice:
        x_TD = x_TD.to(torch.promote_types(x_TD.dtype, torch.float32))
        if self.training and self.opts.jitter_eps > 0:
            eps = self.opts.jitter_eps
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weight_TK, expert_idx_TK = probs_TE.max(dim=-1, keepdim=True)
        routing = TokenChoice(logits_TE, probs_TE, expert_idx_TK, weight_TK, priority_T=weight_TK[:, 0])
        return self.finish(
            routing, logits_TE,
            {"load_balancing_loss": load_balancing_loss(real(probs_TE, mask_T), real(expert_idx_TK, mask_T))}, mask_T
        )

    def global_balance_losses(self, routing: TokenChoice, x_TD: Tensor, seq_len: int, batch) -> dict[str, Tensor]:
        # Switch eq. 4-6 / ST-MoE, as load_balancing_loss: E * sum_e f_e P_e over all T*K choices.
        f_E, p_E = global_fraction_and_mean_prob(routing.probs_TE, routing.expert_idx_TK, batch)
        return {"load_balancing_loss": self.num_experts * (f_E * p_E).sum()}
