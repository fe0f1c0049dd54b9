"""DeepSeek-V3 routing: sigmoid affinities, aux-loss-free bias balancing, group-limited top-k.

DeepSeek-AI, "DeepSeek-V3 Technical Report", arXiv 2412.19437, section 2.1.2:

- Eq. 15: s_{i,t} = Sigmoid(u_t^T e_i), the token-to-expert affinity.
- Eq. 16: selection uses s_{i,t} + b_i, where b_i is a per-expert bias that only affects which
  experts are chosen; the gate value itself is s_{i,t}, normalised over the chosen K (eq. 13)
  and multiplied by the routed scaling factor (2.5 in the released config).
- Bias update: at the end of each step b_i is decreased by gamma if expert i is overloaded and
  increased by gamma if underloaded; we use gamma * sign(mean_load - load_i) with gamma =
  `bias_update_rate` (0.001 in the report's first 14.3T tokens).
- Node-limited / group-limited routing (DeepSeek-V2 section 2.2.2 and the released V3 code):
  experts are split into `n_group` groups, a group scores the sum of its top-2 biased
  affinities, only the best `topk_group` groups are eligible.
- Eq. 17-20: the complementary sequence-wise balance loss, weighted by `aux_loss_coef` (the
  report uses 1e-4; set 0 for the purely aux-loss-free variant).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.layers.losses import sequence_balance_loss, sequence_count
from moekit.layers.routers.base import Router, TokenChoice

if TYPE_CHECKING:
    from moekit.layers.plan import Plan

BIAS_UPDATES = ("forward", "manual")


@dataclass
class SigmoidBiasOptions:
    n_group: int = 1
    topk_group: int = 1
    bias_update_rate: float = 1e-3
    # "forward": every training forward updates the bias from its own load (standalone use);
    # "manual": loads accumulate and `apply_bias_update()` runs once per optimizer step.
    bias_update: str = "forward"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0

    def __post_init__(self):
        for name in ("n_group", "topk_group"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"router_options.{name} must be an integer >= 1, got {value!r}")
        if self.topk_group > self.n_group:
            raise ValueError(
                f"router_options.topk_group ({self.topk_group}) must be <= n_group ({self.n_group})"
            )
        if not (isinstance(self.bias_update_rate, (int, float)) and self.bias_update_rate >= 0):
            raise ValueError(
                f"router_options.bias_update_rate must be >= 0, got {self.bias_update_rate!r}"
            )
        if self.bias_update not in BIAS_UPDATES:
            raise ValueError(
                f"router_options.bias_update must be one of {list(BIAS_UPDATES)}, got {self.bias_update!r}"
            )
        if not (isinstance(self.routed_scaling_factor, (int, float)) and self.routed_scaling_factor > 0):
            raise ValueError(
                f"router_options.routed_scaling_factor must be > 0, got {self.routed_scaling_factor!r}"
            )


class SigmoidBiasRouter(Router):
    options_cls = SigmoidBiasOptions

    def __init__(self, cfg):
        super().__init__(cfg)
        opts = self.opts
        if cfg.num_experts % opts.n_group:
            raise ValueError(
                f"router_options.n_group ({opts.n_group}) must divide num_experts ({cfg.num_experts})"
            )
        per_group = cfg.num_experts // opts.n_group
        if cfg.top_k > opts.topk_group * per_group:
            raise ValueError(
                f"top_k ({cfg.top_k}) exceeds the experts in topk_group={opts.topk_group} groups of "
                f"{per_group}; raise router_options.topk_group or lower top_k"
            )
        # Persistent: the bias is part of the trained state (HF calls it e_score_correction_bias).
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        self.register_buffer("load_accumulator", torch.zeros(cfg.num_experts), persistent=False)

    def select(self, scores_TE: Tensor) -> Tensor:
        """Group-limited top-k on biased scores; returns the chosen expert ids (T, K)."""
        opts, num_experts = self.opts, self.num_experts
        biased_TE = scores_TE + self.expert_bias.float()
        if opts.n_group > 1 and opts.topk_group < opts.n_group:
            num_tokens = scores_TE.shape[0]
            grouped = biased_TE.view(num_tokens, opts.n_group, num_experts // opts.n_group)
            top2 = min(2, grouped.shape[-1])
            group_score = grouped.topk(top2, dim=-1).values.sum(dim=-1)  # (T, n_group)
            group_idx = group_score.topk(opts.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_score).scatter_(1, group_idx, 1.0)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
            biased_TE = biased_TE.masked_fill(expert_mask == 0, float("-inf"))
        return biased_TE.topk(self.top_k, dim=-1).indices

    def forward(self, x_TD: Tensor, seq_len: int, plan: Plan | None = None,
                mask_T: Tensor | None = None) -> TokenChoice:
        logits_TE = self.gate_logits(x_TD)
        scores_TE = logits_TE.sigmoid()
        expert_idx_TK = self.select(scores_TE)
        weight_TK = scores_TE.gather(1, expert_idx_TK)
        if self.opts.norm_topk_prob:
            weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weight_TK = weight_TK * self.opts.routed_scaling_factor
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        routing = TokenChoice(logits_TE, probs_TE, expert_idx_TK, weight_TK, priority_T=weight_TK.max(-1).values)
        balance = {"sequence_balance_loss": sequence_balance_loss(scores_TE, expert_idx_TK, seq_len, mask_T)}
        return self.finish(routing, logits_TE, balance, mask_T)

    @property
    def tracks_load(self) -> bool:
        return self.training and self.opts.bias_update_rate > 0

    @property
    def needs_step_update(self) -> bool:
        return self.opts.bias_update == "manual"

    @torch.no_grad()
    def observe_load(self, counts_E: Tensor) -> None:
        """Fold in how many assignments each expert got (the layer's own tokens on one process,
        the global batch's under expert parallelism, so every rank's bias moves alike)."""
        self.load_accumulator.add_(counts_E)
        if self.opts.bias_update == "forward":
            self.apply_bias_update()

    def step_update(self) -> None:
        self.apply_bias_update()

    @torch.no_grad()
    def apply_bias_update(self) -> None:
        """b_i += gamma * sign(mean load - load_i), then reset the accumulated load."""
        load_E = self.load_accumulator
        self.expert_bias.add_(self.opts.bias_update_rate * torch.sign(load_E.mean() - load_E))
        load_E.zero_()

    def global_balance_losses(self, routing: TokenChoice, x_TD: Tensor, seq_len: int, batch) -> dict[str, Tensor]:
        # Eq. 17-20 is a mean over sequences; sequences never span ranks (each rank's
        # second-to-last input dim), so the global mean is the sum over ranks of (local mean *
        # count) divided by the global count of sequences.
        scores_TE = routing.logits_TE.sigmoid()
        num_seq = sequence_count(scores_TE.shape[0], seq_len)
        if num_seq:
            local = sequence_balance_loss(scores_TE, routing.expert_idx_TK, seq_len) * num_seq
        else:
            local = scores_TE.sum() * 0.0  # keeps the graph (and the collective) identical on every rank
        total_seq = sum(sequence_count(n, seq_len) for n in batch.sizes) if batch.world > 1 else num_seq
        return {"sequence_balance_loss": batch.sum(local) / max(total_seq, 1)}
