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

import torch
from torch import Tensor

from moekit.layers import losses as L
from moekit.layers.routers.base import Router, TokenChoice

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

    def forward(self, x_TD: Tensor, seq_len: int) -> TokenChoice:
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
        aux = L.gshard_aux_loss(probs_TE, expert_idx_TK[:, 0], self.cfg.num_groups)
        return self.finish(routing, logits_TE, {"gshard_aux_loss": aux})
