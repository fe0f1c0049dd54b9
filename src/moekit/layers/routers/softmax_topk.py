"""Softmax then top-k, with optional renormalisation over the chosen k.

The router of Mixtral (Jiang et al. 2024, "Mixtral of Experts", eq. 1-2: softmax over the top-k
logits, which equals renormalised top-k of the full softmax), Qwen1.5/2-MoE (no renormalisation
by default, `norm_topk_prob=False`) and OLMoE (Muennighoff et al. 2024). Balanced with the
Switch load-balancing loss computed over all T*K assignments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.layers.losses import global_fraction_and_mean_prob, load_balancing_loss, real
from moekit.layers.plan import router_decode_ok
from moekit.layers.routers.base import Router, TokenChoice
from moekit.ops import native

NATIVE_INPUT_DTYPES = (torch.float32, torch.bfloat16)

if TYPE_CHECKING:
    from moekit.layers.plan import Plan


@dataclass
class SoftmaxTopKOptions:
    norm_topk_prob: bool = True  # renormalise the k chosen probabilities to sum to 1

    def __post_init__(self):
        if not isinstance(self.norm_topk_prob, bool):
            raise TypeError(
                f"router_options.norm_topk_prob must be True or False, got {self.norm_topk_prob!r}"
            )


class SoftmaxTopKRouter(Router):
    options_cls = SoftmaxTopKOptions

    def forward(self, x_TD: Tensor, seq_len: int, plan: Plan | None = None,
                mask_T: Tensor | None = None) -> TokenChoice:
        cfg = self.cfg
        decode = plan.router_decode if plan is not None else router_decode_ok(x_TD, self)
        fits = x_TD.dtype in NATIVE_INPUT_DTYPES and self.weight.dtype == torch.float32 and self.weight.is_cpu
        if decode and mask_T is None and fits:
            # A few tokens without gradient on CPU: one native call instead of some fifteen torch
            # ops, the same values, except that experts with tied probabilities (an all-zero
            # token) go to the lower ids, where the order torch.topk gives ties is unspecified.
            logits_TE, probs_TE, expert_idx_TK, weight_TK, priority_T, balance, z_loss, aux_loss = (
                native.route_softmax_topk(x_TD, self.weight, self.top_k, self.opts.norm_topk_prob,
                                          cfg.aux_loss_coef, cfg.z_loss_coef))
            losses = {"load_balancing_loss": balance, **({"z_loss": z_loss} if cfg.z_loss_coef > 0 else {})}
            return TokenChoice(logits_TE, probs_TE, expert_idx_TK, weight_TK, priority_T=priority_T,
                               aux_loss=aux_loss, losses=losses)
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        weight_TK, expert_idx_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.opts.norm_topk_prob:
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        routing = TokenChoice(logits_TE, probs_TE, expert_idx_TK, weight_TK, priority_T=weight_TK[:, 0])
        return self.finish(
            routing, logits_TE,
            {"load_balancing_loss": load_balancing_loss(real(probs_TE, mask_T), real(expert_idx_TK, mask_T))}, mask_T
        )

    def global_balance_losses(self, routing: TokenChoice, x_TD: Tensor, seq_len: int, batch) -> dict[str, Tensor]:
        # Switch eq. 4-6 / ST-MoE, as load_balancing_loss: E * sum_e f_e P_e over all T*K choices.
        f_E, p_E = global_fraction_and_mean_prob(routing.probs_TE, routing.expert_idx_TK, batch)
        return {"load_balancing_loss": self.num_experts * (f_E * p_E).sum()}
