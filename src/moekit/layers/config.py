"""`MoEConfig`: the validated description of one MoE layer.

Router-specific knobs live in each router's own options dataclass (see `layers/routers/`), passed
as `router_options` (a dict or the dataclass); everything else is common to all routers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from moekit.layers.routers import ROUTERS
from moekit.layers.routers.base import build_options
from moekit.ops.activations import ACTIVATIONS, GATED
from moekit.validate import check_bool, check_choice, check_float, check_int

OVERFLOW_POLICIES = ("position", "score")


@dataclass
class MoEConfig:
    d_model: int
    d_ff: int  # hidden width of one routed expert
    num_experts: int
    top_k: int = 2
    router: str = "softmax_topk"
    router_options: Any = None  # dict or the router's options dataclass; see layers/routers/
    # Capacity: None = dropless. Otherwise each expert takes at most
    # C = ceil(capacity_factor * tokens_per_group * top_k / num_experts) assignments per group.
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None  # None = same as capacity_factor
    num_groups: int = 1  # GShard local group dispatch: capacity is enforced per group
    overflow_policy: str = "position"  # "position" (first come) or "score" (V-MoE BPR)
    min_capacity: int = 1
    activation: str = "swiglu"
    expert_bias: bool = False
    num_shared_experts: int = 0
    shared_d_ff: int | None = None  # None = d_ff * num_shared_experts
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid(x w) scales the shared expert
    aux_loss_coef: float = 0.01  # weight of the router's own balancing loss(es)
    z_loss_coef: float = 0.0  # ST-MoE router z-loss weight (they use 1e-3)
    causal: bool = False  # set by decoder models; refused by non-causal routers
    init_std: float = 0.02

    def __post_init__(self):
        own = "MoEConfig"
        for name in ("d_model", "d_ff", "num_experts", "top_k"):
            check_int(own, name, getattr(self, name), 1)
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router: unknown router {self.router!r}; valid: {list(ROUTERS)}")
        check_float(own, "capacity_factor", self.capacity_factor, allow_none=True)
        check_float(own, "eval_capacity_factor", self.eval_capacity_factor, allow_none=True)
        check_int(own, "num_groups", self.num_groups, 1)
        check_int(own, "min_capacity", self.min_capacity, 1)
        check_choice(own, "overflow_policy", self.overflow_policy, OVERFLOW_POLICIES)
        check_choice(own, "activation", self.activation, ACTIVATIONS)
        check_bool(own, "expert_bias", self.expert_bias)
        check_int(own, "num_shared_experts", self.num_shared_experts, 0)
        check_int(own, "shared_d_ff", self.shared_d_ff, 1, allow_none=True)
        check_bool(own, "shared_expert_gate", self.shared_expert_gate)
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("MoEConfig.shared_expert_gate needs num_shared_experts >= 1")
        check_float(own, "aux_loss_coef", self.aux_loss_coef, strict=False)
        check_float(own, "z_loss_coef", self.z_loss_coef, strict=False)
        check_float(own, "init_std", self.init_std)
        check_bool(own, "causal", self.causal)
        if self.causal and (self.capacity_factor is not None or self.eval_capacity_factor is not None):
            # Causal capacity is per sequence and prefix (layers/capacity.py): groups across the
            # batch and ordering by score would let later tokens decide earlier ones.
            if self.overflow_policy != "position":
                raise ValueError("MoEConfig.overflow_policy must be 'position' with causal=True: ordering by score "
                                 "(batch prioritized routing) lets later tokens take earlier tokens' capacity")
            if self.num_groups != 1:
                raise ValueError("MoEConfig.num_groups must be 1 with causal=True and a capacity_factor: causal "
                                 "capacity is counted per sequence, so groups across the batch do not apply")
        # What depends on the router (fixed top-k, capacity, causality) lives on its class.
        ROUTERS[self.router].check_config(self)
        self.router_options = build_options(ROUTERS[self.router].options_cls, self.router_options, self.router)

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def effective_top_k(self) -> int:
        """Assignments per token: every expert for the dense gate, else top_k."""
        return self.num_experts if ROUTERS[self.router].every_expert else self.top_k

    @property
    def shared_width(self) -> int:
        return self.shared_d_ff if self.shared_d_ff is not None else self.d_ff * self.num_shared_experts

    def active_capacity_factor(self, training: bool) -> float | None:
        if not training and self.eval_capacity_factor is not None:
            return self.eval_capacity_factor
        return self.capacity_factor

    def capacity(self, tokens_per_group: int, training: bool) -> int | None:
        """Per-expert, per-group capacity C for token-choice routers; None when dropless."""
        factor = self.active_capacity_factor(training)
        if factor is None:
            return None
        cap = math.ceil(factor * tokens_per_group * self.effective_top_k / self.num_experts)
        # An expert can take a token at most once, so C beyond the group size buys nothing.
        return max(1, min(max(cap, self.min_capacity), tokens_per_group))
