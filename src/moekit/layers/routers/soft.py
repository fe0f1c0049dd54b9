"""Soft MoE: slots are convex mixes of tokens, tokens convex mixes of slots; nothing dropped.

Puigcerver, Riquelme, Mustafa and Houlsby, "From Sparse to Soft Mixtures of Experts", ICLR 2024
(arXiv 2308.00951), section 2.1: with Phi (D, E*S) learned slot parameters and logits
X Phi (L, E*S) per sequence of L tokens, the dispatch weights are a softmax over the tokens (columns) and
the combine weights a softmax over the E*S slots (rows). Slot inputs X~ = D^T X; expert e
processes its S slots; Y = C Y~. Section 2.3 / appendix: for large D, l2-normalise X and Phi and
multiply by a learned scalar, which keeps the logits from collapsing the softmax.

Every slot sees the whole sequence, so this router is for non-causal use and refuses
`causal=True`. Sequences are the second-to-last input dimension ((B, L, D) input), or the whole
input when it is (T, D).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.routers.base import Router, SoftRouting

if TYPE_CHECKING:
    from moekit.layers.plan import Plan


@dataclass
class SoftOptions:
    slots_per_expert: int = 1
    normalize: bool = True

    def __post_init__(self):
        if not isinstance(self.slots_per_expert, int) or self.slots_per_expert < 1:
            raise ValueError(
                f"router_options.slots_per_expert must be an integer >= 1, got {self.slots_per_expert!r}"
            )


class SoftRouter(Router):
    options_cls = SoftOptions
    kind = "soft"
    causal = False
    drops = False

    @classmethod
    def experts_per_token(cls, cfg) -> float:
        return float(cfg.num_experts)  # every slot mixes every token of the sequence

    @classmethod
    def num_params(cls, cfg) -> int:
        opts = cfg.router_options
        return cfg.num_experts * opts.slots_per_expert * cfg.d_model + (1 if opts.normalize else 0)

    def __init__(self, cfg):
        super().__init__(cfg)
        slots = cfg.num_experts * self.opts.slots_per_expert
        # Phi is stored (slots, D) like a linear layer's weight; `weight` of the base class is unused.
        del self.weight
        self.slot_weight = nn.Parameter(torch.empty(slots, cfg.d_model))
        nn.init.normal_(self.slot_weight, std=cfg.d_model**-0.5)
        self.scale = nn.Parameter(torch.ones(())) if self.opts.normalize else None

    def reset_parameters(self) -> None:
        if hasattr(self, "slot_weight"):
            nn.init.normal_(self.slot_weight, std=self.cfg.d_model**-0.5)

    def forward(self, x_TD: Tensor, seq_len: int, plan: Plan | None = None,
                mask_T: Tensor | None = None) -> SoftRouting:
        num_tokens = x_TD.shape[0]
        if seq_len < 1 or num_tokens % seq_len:
            seq_len = num_tokens
        dtype = torch.promote_types(x_TD.dtype, torch.float32)
        x = x_TD.to(dtype)
        phi = self.slot_weight.to(dtype)
        if self.scale is not None:
            x = F.normalize(x, dim=-1)
            phi = F.normalize(phi, dim=-1) * self.scale.to(dtype)
        logits_BLX = F.linear(x, phi).view(num_tokens // seq_len, seq_len, -1)  # (B, L, E*S)
        if mask_T is None:
            dispatch_BLX = logits_BLX.softmax(dim=1)
            combine_BLX = logits_BLX.softmax(dim=2)
        else:
            # Slots mix the real tokens only; padded tokens take nothing back. A sequence without
            # real tokens gets all-zero dispatch weights (its softmax over nothing is 0/0).
            mask_BL1 = mask_T.view(num_tokens // seq_len, seq_len, 1)
            dispatch_BLX = logits_BLX.masked_fill(~mask_BL1, float("-inf")).softmax(dim=1).nan_to_num(0.0)
            combine_BLX = logits_BLX.softmax(dim=2) * mask_BL1
        probs_TE = combine_BLX.reshape(num_tokens, self.num_experts, -1).sum(-1)  # (T, E)
        routing = SoftRouting(logits_BLX, dispatch_BLX, combine_BLX, probs_TE)
        return self.finish(routing, logits_BLX.reshape(num_tokens, -1), {}, mask_T)

    def global_balance_losses(self, routing: SoftRouting, x_TD: Tensor, seq_len: int, batch) -> dict[str, Tensor]:
        return {}  # nothing is dropped and every slot mixes every token: nothing to balance
