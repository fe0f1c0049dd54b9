"""Dense softmax gate: every expert runs on every token.

Jacobs, Jordan, Nowlan and Hinton, "Adaptive Mixtures of Local Experts", Neural Computation 3(1),
1991. The gate is a softmax over all experts and the output is the gate-weighted sum of all
expert outputs (their eq. 1.3 uses this mixture for the output). No sparsity, so no balancing is
needed for compute; `aux_loss_coef` applies the importance CV^2 of Shazeer et al. 2017 so that
users who want balanced usage can ask for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.layers.losses import cv_squared, importance_loss, real
from moekit.layers.routers.base import Router, TokenChoice

if TYPE_CHECKING:
    from moekit.layers.plan import Plan


@dataclass
class DenseOptions:
    pass


class DenseRouter(Router):
    options_cls = DenseOptions
    every_expert = True
    drops = False

    def forward(self, x_TD: Tensor, seq_len: int, plan: Plan | None = None,
                mask_T: Tensor | None = None) -> TokenChoice:
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        num_tokens = x_TD.shape[0]
        expert_idx_TK = torch.arange(self.num_experts, device=x_TD.device).expand(num_tokens, -1)
        routing = TokenChoice(logits_TE, probs_TE, expert_idx_TK, probs_TE)
        return self.finish(routing, logits_TE, {"importance_loss": importance_loss(real(probs_TE, mask_T))}, mask_T)

    def global_balance_losses(self, routing: TokenChoice, x_TD: Tensor, seq_len: int, batch) -> dict[str, Tensor]:
        # Importance CV^2 (Shazeer et al. 2017 eq. 6) of the globally summed gates.
        return {"importance_loss": cv_squared(batch.sum(routing.probs_TE.sum(dim=0)))}
