"""Noisy top-k gating with importance and load losses.

Shazeer, Mirhoseini, Maziarz, Davis, Le, Hinton and Dean, "Outrageously Large Neural Networks:
The Sparsely-Gated Mixture-of-Experts Layer", ICLR 2017 (arXiv 1701.06538).

- Eq. 3-5: H(x)_i = (x W_g)_i + StandardNormal() * Softplus((x W_noise)_i);
  G(x) = Softmax(KeepTopK(H(x), k)). The noise is trainable through W_noise and only used in
  training.
- Eq. 6-7: L_importance = w * CV(sum_x G(x))^2.
- Eq. 8-11 (appendix A): the smooth load estimator
  P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x W_noise)_i)),
  Load_i = sum_x P(x, i), L_load = w * CV(Load)^2. kth_excluding(v, k, i) is the k-th largest
  component of v with component i left out: for a chosen expert it is the (k+1)-th largest value
  of H, for an unchosen one the k-th.
Both losses are weighted by `aux_loss_coef`. W_g and W_noise start at zero as in the paper's
code, so routing is uniform and the noise std is softplus(0) at the start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.losses import cv_squared, importance_loss, load_loss, real
from moekit.layers.routers.base import Router, TokenChoice

if TYPE_CHECKING:
    from moekit.layers.plan import Plan


@dataclass
class NoisyTopKOptions:
    noise_epsilon: float = 1e-2  # floor added to the noise std, as in the paper's code

    def __post_init__(self):
        if not (isinstance(self.noise_epsilon, (int, float)) and self.noise_epsilon > 0):
            raise ValueError(f"router_options.noise_epsilon must be > 0, got {self.noise_epsilon!r}")


class NoisyTopKRouter(Router):
    options_cls = NoisyTopKOptions

    @classmethod
    def num_params(cls, cfg) -> int:
        return 2 * cfg.num_experts * cfg.d_model  # gate and noise weights

    def __init__(self, cfg):
        super().__init__(cfg)
        self.noise_weight = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if hasattr(self, "noise_weight"):
            nn.init.zeros_(self.noise_weight)

    def forward(self, x_TD: Tensor, seq_len: int, plan: Plan | None = None,
                mask_T: Tensor | None = None) -> TokenChoice:
        k, num_experts = self.top_k, self.num_experts
        clean_TE = self.gate_logits(x_TD)
        noisy = self.training
        if noisy:
            noise_TE = F.linear(x_TD.to(clean_TE.dtype), self.noise_weight.to(clean_TE.dtype))
            std_TE = F.softplus(noise_TE) + self.opts.noise_epsilon
            logits_TE = clean_TE + torch.randn_like(clean_TE) * std_TE
        else:
            logits_TE = clean_TE
        # k+1 largest so the threshold for both chosen and unchosen experts is at hand.
        m = min(k + 1, num_experts)
        top_vals, top_idx = logits_TE.topk(m, dim=-1)
        expert_idx_TK = top_idx[:, :k]
        weight_TK = top_vals[:, :k].softmax(dim=-1)
        gates_TE = torch.zeros_like(logits_TE).scatter(1, expert_idx_TK, weight_TK)
        balance = {"importance_loss": importance_loss(real(gates_TE, mask_T))}
        if noisy and k < num_experts:
            # Phi((clean - threshold) / std): the probability that expert i would still be in
            # the top k if its own noise were redrawn, differentiable in W_g and W_noise.
            in_topk = logits_TE >= top_vals[:, k - 1 : k]
            threshold_TE = torch.where(in_topk, top_vals[:, k : k + 1], top_vals[:, k - 1 : k])
            normal = torch.distributions.Normal(0.0, 1.0)
            load_E = real(normal.cdf((clean_TE - threshold_TE) / std_TE), mask_T).sum(dim=0)
        else:
            # Without noise the estimator is undefined; the count of assignments is the load.
            load_E = real(gates_TE, mask_T).gt(0).float().sum(dim=0)
        balance["load_loss"] = load_loss(load_E)
        routing = TokenChoice(
            logits_TE, logits_TE.softmax(dim=-1), expert_idx_TK, weight_TK, priority_T=weight_TK[:, 0]
        )
        return self.finish(routing, logits_TE, balance, mask_T)

    def global_balance_losses(self, routing: TokenChoice, x_TD: Tensor, seq_len: int, batch) -> dict[str, Tensor]:
        k, num_experts = self.top_k, self.num_experts
        logits_TE, expert_idx_TK, weight_TK = routing.logits_TE, routing.expert_idx_TK, routing.weight_TK
        gates_TE = torch.zeros_like(logits_TE).scatter(1, expert_idx_TK, weight_TK)
        terms = {"importance_loss": cv_squared(batch.sum(gates_TE.sum(dim=0)))}
        if self.training and k < num_experts:
            # The smooth load estimator of appendix A (eq. 8-11), summed over the global batch
            # before CV^2. The routing output does not carry the per-expert load, so the clean
            # logits and noise scale are recomputed exactly as `forward` does; the EP parity
            # tests against the single-process layer keep the two in step.
            clean_TE = self.gate_logits(x_TD)
            std_TE = F.softplus(F.linear(x_TD.float(), self.noise_weight.float())) + self.opts.noise_epsilon
            top_vals = logits_TE.topk(min(k + 1, num_experts), dim=-1).values
            in_topk = logits_TE >= top_vals[:, k - 1 : k]
            threshold_TE = torch.where(in_topk, top_vals[:, k : k + 1], top_vals[:, k - 1 : k])
            normal = torch.distributions.Normal(0.0, 1.0)
            load_E = batch.sum(normal.cdf((clean_TE - threshold_TE) / std_TE).sum(dim=0))
        else:
            load_E = batch.sum_nograd(gates_TE.gt(0).float().sum(dim=0))
        terms["load_loss"] = load_loss(load_E)
        return terms
