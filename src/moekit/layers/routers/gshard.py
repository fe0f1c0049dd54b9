"""GShard top-2 gating with random routing, group capacity and the GShard auxiliary loss.

Lepikhin et al., "GShard: Scaling Giant Models with Conditional Computation and Automatic
Sharding", ICLR 2021 (arXiv 2006.16668), section 2.2 and Algorithm 1:

- Top-2: the first expert is the argmax of the softmax gate, the second the argmax of the rest.
  The two gates are renormalised, g1 <- g1 / (g1 + g2), g2 <- g2 / (g1 + g2).
- Random routing: the second expert is used only if 2 * g2 > u, u ~ Uniform(0, 1), so an expert
  with a small second gate is mostly skipped (probability proportional to its weight).
- Local group dispatch: the T tokens are split into G groups (`num_groups` in the MoE config);
  expert capacity is enforced per group, first choices before second choices, which the
  dispatcher does for every router when `capacity_factor` is set.
- Auxiliary loss: mean_e (c_e / S) * m_e per group, with c_e the count of first choices; see
  `losses.gshard_aux_loss` for the scaling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.layers.losses import gshard_aux_loss, real
from moekit.layers.routers.base import Router, TokenChoice

if TYPE_CHECKING:
    from moekit.layers.plan import Plan

SECOND_POLICIES = ("random", "all")


@dataclass
class GShardOptions:
    second_expert_policy: str = "random"  # "random": GShard's random routing; "all": always use it
    random_in_eval: bool = False  # GShard samples in training; evaluation keeps both by default

    def __post_init__(self):
        if self.second_expert_policy not in SECOND_POLICIES:
            raise ValueError(
                f"router_options.second_expert_policy must be one of {list(SECOND_POLICIES)}, "
                f"got {self.second_expert_policy!r}"
            )


class GShardRouter(Router):
    options_cls = GShardOptions
    fixed_top_k = 2

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.top_k != 2 or cfg.num_experts < 2:
            raise ValueError(
                f"router 'gshard' is top-2: MoEConfig.top_k must be 2 and num_experts >= 2, "
                f"got top_k={cfg.top_k}, num_experts={cfg.num_experts}"
            )
        super().check_config(cfg)

    def forward(self, x_TD: Tensor, seq_len: int, plan: Plan | None = None,
                mask_T: Tensor | None = None) -> TokenChoice:
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top_TK, expert_idx_TK = probs_TE.topk(2, dim=-1)
        weight_TK = top_TK / top_TK.sum(dim=-1, keepdim=True).clamp_min(1e-9)
        active_TK = None
        sample = self.training or self.opts.random_in_eval
        if self.opts.second_expert_policy == "random" and sample:
            u_T = torch.rand(weight_TK.shape[0], device=weight_TK.device)
            keep_second = 2.0 * weight_TK[:, 1] > u_T
            active_TK = torch.stack([torch.ones_like(keep_second), keep_second], dim=-1)
        routing = TokenChoice(
            logits_TE, probs_TE, expert_idx_TK, weight_TK, active_TK=active_TK, priority_T=weight_TK[:, 0]
        )
        aux = gshard_aux_loss(real(probs_TE, mask_T), real(expert_idx_TK[:, 0], mask_T), self.cfg.num_groups)
        return self.finish(routing, logits_TE, {"gshard_aux_loss": aux}, mask_T)

    def global_balance_losses(self, routing: TokenChoice, x_TD: Tensor, seq_len: int, batch) -> dict[str, Tensor]:
        # Algorithm 1 per group of the *global* batch: groups are contiguous runs of
        # ceil(T_global / G) tokens, as gshard_aux_loss splits the concatenated batch.
        probs_TE = routing.probs_TE
        num_experts = probs_TE.shape[-1]
        total = batch.total
        size = -(-total // max(1, self.cfg.num_groups))
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
