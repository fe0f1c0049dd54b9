"""`MoEConfig`: the validated description of one MoE layer.

Router-specific knobs live in each router's own options dataclass (see `layers/routers/`), passed
as `router_options` (a dict or the dataclass); everything else is common to all routers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")
OVERFLOW_POLICIES = ("position", "score")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"MoEConfig.{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"MoEConfig.{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any, *, allow_none: bool, positive: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        none = " or None" if allow_none else ""
        raise TypeError(f"MoEConfig.{name} must be a finite number{none}, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"MoEConfig.{name} must be > 0, got {value}")
    if not positive and value < 0:
        raise ValueError(f"MoEConfig.{name} must be >= 0, got {value}")


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
        from moekit.layers.routers import NON_CAUSAL_ROUTERS, ROUTERS
        from moekit.layers.routers.base import build_options

        _check_int("d_model", self.d_model, 1)
        _check_int("d_ff", self.d_ff, 1)
        _check_int("num_experts", self.num_experts, 1)
        _check_int("top_k", self.top_k, 1)
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router: unknown router {self.router!r}; valid: {list(ROUTERS)}")
        if self.top_k > self.num_experts and self.router != "dense":
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) must be <= num_experts ({self.num_experts})"
            )
        if self.router == "switch" and self.top_k != 1:
            raise ValueError(f"MoEConfig.top_k must be 1 for router 'switch' (top-1 routing), got {self.top_k}")
        if self.router == "gshard" and (self.top_k != 2 or self.num_experts < 2):
            raise ValueError(
                f"router 'gshard' is top-2: MoEConfig.top_k must be 2 and num_experts >= 2, "
                f"got top_k={self.top_k}, num_experts={self.num_experts}"
            )
        _check_float("capacity_factor", self.capacity_factor, allow_none=True)
        _check_float("eval_capacity_factor", self.eval_capacity_factor, allow_none=True)
        if self.router in ("dense", "soft") and self.capacity_factor is not None:
            raise ValueError(
                f"MoEConfig.capacity_factor must be None for router {self.router!r}: it never drops tokens"
            )
        _check_int("num_groups", self.num_groups, 1)
        _check_int("min_capacity", self.min_capacity, 1)
        if self.overflow_policy not in OVERFLOW_POLICIES:
            raise ValueError(
                f"MoEConfig.overflow_policy must be one of {list(OVERFLOW_POLICIES)}, got {self.overflow_policy!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"MoEConfig.activation must be one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if not isinstance(self.expert_bias, bool):
            raise TypeError(f"MoEConfig.expert_bias must be True or False, got {self.expert_bias!r}")
        _check_int("num_shared_experts", self.num_shared_experts, 0)
        if self.shared_d_ff is not None:
            _check_int("shared_d_ff", self.shared_d_ff, 1)
        if not isinstance(self.shared_expert_gate, bool):
            raise TypeError(f"MoEConfig.shared_expert_gate must be True or False, got {self.shared_expert_gate!r}")
        if self.shared_expert_gate and self.num_shared_experts == 0:
            raise ValueError("MoEConfig.shared_expert_gate needs num_shared_experts >= 1")
        _check_float("aux_loss_coef", self.aux_loss_coef, allow_none=False, positive=False)
        _check_float("z_loss_coef", self.z_loss_coef, allow_none=False, positive=False)
        _check_float("init_std", self.init_std, allow_none=False)
        if not isinstance(self.causal, bool):
            raise TypeError(f"MoEConfig.causal must be True or False, got {self.causal!r}")
        if self.causal and self.router in NON_CAUSAL_ROUTERS:
            raise ValueError(
                f"router {self.router!r} is non-causal (a token's routing depends on later tokens), "
                f"so it cannot be used with causal=True; use a token-choice router "
                f"({', '.join(r for r in ROUTERS if r not in NON_CAUSAL_ROUTERS)})"
            )
        self.router_options = build_options(ROUTERS[self.router].options_cls, self.router_options, self.router)

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    @property
    def effective_top_k(self) -> int:
        """Assignments per token: every expert for the dense gate, else top_k."""
        return self.num_experts if self.router == "dense" else self.top_k

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
