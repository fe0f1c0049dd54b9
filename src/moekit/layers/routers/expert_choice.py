"""Expert-choice routing: each expert picks its top-C tokens.

Zhou et al., "Mixture-of-Experts with Expert Choice Routing", NeurIPS 2022 (arXiv 2202.09368),
section 3.1: S = Softmax(X W_g) over experts (T, E); for each expert, G, I = TopK(S^T, C) over
the tokens; the expert's output for token I[e, c] is weighted by G[e, c]. Capacity
C = T * c / E, where c (the capacity factor, `capacity_factor` in the MoE config, default
`top_k`) is the average number of experts per token. Load is perfectly balanced by construction,
so no balancing loss is needed; a token may get zero experts (counted as dropped).

An expert sees every token of the group before choosing, so the routing of a token depends on
tokens that come after it: this router is for non-causal use (encoders, vision) and refuses
`causal=True`.

Tokens compete within groups of `num_groups` (T must divide evenly); C is per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from moekit.layers.routers.base import ExpertChoice, Router

if TYPE_CHECKING:
    from moekit.layers.plan import Plan


@dataclass
class ExpertChoiceOptions:
    pass


def expert_choice_capacity(num_tokens: int, num_experts: int, factor: float) -> int:
    """C = ceil(T * c / E), at least 1 and at most T (an expert takes a token once)."""
    return max(1, min(num_tokens, math.ceil(num_tokens * factor / num_experts)))


class ExpertChoiceRouter(Router):
    options_cls = ExpertChoiceOptions
    kind = "expert"
    causal = False

    @classmethod
    def experts_per_token(cls, cfg) -> float:
        # Zhou et al. 2022: the capacity factor c is the average number of experts per token.
        c = cfg.capacity_factor if cfg.capacity_factor is not None else cfg.top_k
        return float(min(c, cfg.num_experts))

    def forward(self, x_TD: Tensor, seq_len: int, plan: Plan | None = None,
                mask_T: Tensor | None = None) -> ExpertChoice:
        logits_TE = self.gate_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        # With padding the experts choose among the real tokens only: the selection runs on the
        # real tokens gathered in order (so groups and capacity are those of the unpadded batch)
        # and maps back to positions in the padded batch.
        real_R = None if mask_T is None else mask_T.nonzero().squeeze(1)
        token_idx_EC, weight_EC = self._select(probs_TE if real_R is None else probs_TE.index_select(0, real_R))
        if real_R is not None:
            token_idx_EC = real_R[token_idx_EC]
        routing = ExpertChoice(logits_TE, probs_TE, token_idx_EC, weight_EC)
        return self.finish(routing, logits_TE, {}, mask_T)

    def _select(self, probs_TE: Tensor) -> tuple[Tensor, Tensor]:
        """Each expert's top-C tokens of each group: token ids and weights, (E, G*C) each."""
        num_tokens = probs_TE.shape[0]
        num_groups = self.cfg.num_groups
        if num_tokens % num_groups:
            raise ValueError(
                f"expert_choice routes within num_groups={num_groups} equal groups, but got "
                f"T={num_tokens} (real) tokens, which it does not divide"
            )
        group_size = num_tokens // num_groups
        factor = self.cfg.active_capacity_factor(self.training)
        factor = float(self.top_k) if factor is None else factor
        cap = expert_choice_capacity(group_size, self.num_experts, factor)
        probs_GEL = probs_TE.view(num_groups, group_size, self.num_experts).transpose(1, 2)
        weight_GEC, local_idx_GEC = probs_GEL.topk(cap, dim=-1)  # (G, E, C)
        offset_G11 = (torch.arange(num_groups, device=probs_TE.device) * group_size).view(-1, 1, 1)
        token_idx_EC = (local_idx_GEC + offset_G11).transpose(0, 1).reshape(self.num_experts, -1)  # (E, G*C)
        weight_EC = weight_GEC.transpose(0, 1).reshape(self.num_experts, -1)  # (E, G*C)
        return token_idx_EC, weight_EC

    def global_balance_losses(self, routing: ExpertChoice, x_TD: Tensor, seq_len: int, batch) -> dict[str, Tensor]:
        return {}  # balanced by construction
