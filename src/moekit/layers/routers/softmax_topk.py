"""Softmax then top-k, with optional renormalisation over the chosen k.

The router of Mixtral (Jiang et al. 2024, "Mixtral of Experts", eq. 1-2: softmax over the top-k
logits, which equals renormalised top-k of the full softmax), Qwen1.5/2-MoE (no renormalisation
by default, `norm_topk_prob=False`) and OLMoE (Muennighoff et al. 2024). Balanced with the
Switch load-balancing loss computed over all T*K assignments.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from moekit.layers import losses as L
from moekit.layers.routers.base import Router, TokenChoice
from moekit.ops.decode import route_softmax_topk_decode


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

    def forward(self, x_TD: Tensor, seq_len: int) -> TokenChoice:
        cfg = self.cfg
        decoded = route_softmax_topk_decode(x_TD, self.weight, self.top_k, self.opts.norm_topk_prob,
                                            cfg.aux_loss_coef, cfg.z_loss_coef)
        # A few tokens without gradient on CPU: one native call, the same values, except that
        # experts with tied probabilities (an all-zero token) go to the lower ids, where the
        # order torch.topk gives ties is unspecified.
        if decoded is not None:
            logits_TE, probs_TE, expert_idx_TK, weight_TK, priority_T, balance, z_loss, aux_loss = decoded
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
            routing, logits_TE, {"load_balancing_loss": L.load_balancing_loss(probs_TE, expert_idx_TK)}
        )
