"""Typed router outputs and the base class every router shares.

Shape legend: T tokens, D d_model, E experts, K top-k, C capacity per expert, B sequences,
L tokens per sequence, S slots per expert and X = E*S slots (Soft MoE).

A router scores tokens and says where they go. There are three ways to say it:

- `TokenChoice`: each token picks K experts (every router of the literature except two).
- `ExpertChoice`: each expert picks C tokens (Zhou et al. 2022).
- `SoftRouting`: every slot is a convex mix of all tokens and every token a mix of all slots
  (Puigcerver et al. 2023).

Routers compute their auxiliary losses themselves from pure functions in `layers/losses.py`, and
return them already weighted in `aux_loss`, with the unweighted terms in `losses` for logging.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.losses import real, router_z_loss

if TYPE_CHECKING:
    from moekit.layers.config import MoEConfig
    from moekit.layers.plan import Plan


@dataclass
class TokenChoice:
    logits_TE: Tensor  # float32 raw router logits (for z-loss and inspection)
    probs_TE: Tensor  # float32 per-token distribution over experts (entropy, balancing)
    expert_idx_TK: Tensor  # int64 chosen experts, distinct per token
    weight_TK: Tensor  # float32 combine weights
    # False where the router itself declined an assignment (GShard's random second expert);
    # None means every assignment is active.
    active_TK: Tensor | None = None
    # Per-token priority for capacity overflow by score (V-MoE batch prioritized routing).
    priority_T: Tensor | None = None
    aux_loss: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ExpertChoice:
    logits_TE: Tensor
    probs_TE: Tensor
    token_idx_EC: Tensor  # int64 token each expert slot takes
    weight_EC: Tensor  # float32 combine weight of that token for that expert
    aux_loss: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class SoftRouting:
    logits_BLX: Tensor  # X = E * S slots
    dispatch_BLX: Tensor  # softmax over the L tokens of a sequence, per slot
    combine_BLX: Tensor  # softmax over the X slots, per token
    probs_TE: Tensor  # combine weight summed per expert, for entropy and load metrics
    aux_loss: Tensor | None = None
    losses: dict[str, Tensor] = field(default_factory=dict)

    # The names before the shape letters were made one meaning each (N is routed rows elsewhere).
    @property
    def logits_BNX(self) -> Tensor:
        return self.logits_BLX

    @property
    def dispatch_BNX(self) -> Tensor:
        return self.dispatch_BLX

    @property
    def combine_BNX(self) -> Tensor:
        return self.combine_BLX


Routing = TokenChoice | ExpertChoice | SoftRouting


def build_options(options_cls: type, given: Any, router_name: str):
    """Turn `router_options` (None, a dict or the dataclass itself) into a validated dataclass."""
    if given is None:
        return options_cls()
    if isinstance(given, options_cls):
        return given
    if isinstance(given, dict):
        allowed = {f.name for f in fields(options_cls)}
        unknown = sorted(set(given) - allowed)
        if unknown:
            raise ValueError(
                f"MoEConfig.router_options: unknown key(s) {unknown} for router '{router_name}'; "
                f"allowed: {sorted(allowed) or 'none'}"
            )
        return options_cls(**given)
    raise TypeError(
        f"MoEConfig.router_options must be None, a dict or {options_cls.__name__} for router "
        f"'{router_name}', got {type(given).__name__}"
    )


class Router(nn.Module):
    """A linear gate W_g (E, D) whose logits are always computed in float32.

    Switch Transformers (Fedus et al. 2021, section 2.4) found bfloat16 routers unstable: the
    softmax's exponent amplifies rounding error, so the gate input and weight are upcast.
    """

    options_cls: type = type(None)
    # What the layer, its config and expert parallelism need to know about a router family lives
    # on its class, so a new router touches its own file and the registry only.
    kind: str = "token"  # its output: "token" (TokenChoice), "expert" (ExpertChoice) or "soft" (SoftRouting)
    causal: bool = True  # False: a token's routing depends on later tokens, so decoders refuse it
    drops: bool = True  # False: it never drops a token, so capacity_factor must stay None
    fixed_top_k: int | None = None  # the k its paper fixes (Switch 1, GShard 2)
    every_expert: bool = False  # every token uses every expert (the dense gate): top_k is no limit

    @classmethod
    def check_config(cls, cfg: MoEConfig) -> None:
        """Refuse a MoEConfig this router cannot run, naming the field."""
        name = cfg.router
        if cfg.top_k > cfg.num_experts and not cls.every_expert:
            raise ValueError(f"MoEConfig.top_k ({cfg.top_k}) must be <= num_experts ({cfg.num_experts})")
        if cls.fixed_top_k is not None and cfg.top_k != cls.fixed_top_k:
            k = cls.fixed_top_k
            raise ValueError(f"MoEConfig.top_k must be {k} for router {name!r} (top-{k} routing), got {cfg.top_k}")
        if not cls.drops and cfg.capacity_factor is not None:
            raise ValueError(f"MoEConfig.capacity_factor must be None for router {name!r}: it never drops tokens")
        if cfg.causal and not cls.causal:
            from moekit.layers.routers import ROUTERS

            causal = ", ".join(n for n, c in ROUTERS.items() if c.causal)
            raise ValueError(
                f"router {name!r} is non-causal (a token's routing depends on later tokens), so it cannot be "
                f"used with causal=True; use a token-choice router ({causal})"
            )

    @classmethod
    def experts_per_token(cls, cfg: MoEConfig) -> float:
        """How many routed experts a token's output passes through, on average (for counting
        active parameters and FLOPs): top_k, or every expert for the dense gate."""
        return float(cfg.num_experts if cls.every_expert else cfg.top_k)

    @classmethod
    def num_params(cls, cfg: MoEConfig) -> int:
        """Parameters of the router itself (the gate W_g, E x D)."""
        return cfg.num_experts * cfg.d_model

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.opts = cfg.router_options
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Small init keeps the initial routing near uniform (Switch, section 2.4: scale 0.1).
        nn.init.normal_(self.weight, std=0.1 / self.cfg.d_model**0.5)

    def gate_logits(self, x_TD: Tensor) -> Tensor:
        dtype = torch.promote_types(x_TD.dtype, torch.float32)  # float32, or float64 for gradcheck
        return F.linear(x_TD.to(dtype), self.weight.to(dtype))  # (T, E)

    def finish(self, routing: Routing, logits: Tensor, balance: dict[str, Tensor],
               mask_T: Tensor | None = None) -> Routing:
        """Attach z-loss and weighted aux loss; `balance` holds the router's own balancing terms
        (computed on the real tokens where `mask_T` marks padding; so is the z-loss)."""
        cfg = self.cfg
        losses = dict(balance)
        terms = [cfg.aux_loss_coef * value for value in balance.values()]
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = router_z_loss(real(logits, mask_T))
            terms.append(cfg.z_loss_coef * losses["z_loss"])
        total = terms[0] if terms else logits.new_zeros(())
        for term in terms[1:]:
            total = total + term
        routing.losses = losses
        routing.aux_loss = total
        return routing

    def forward(self, x_TD: Tensor, seq_len: int, plan: Plan | None = None,
                mask_T: Tensor | None = None) -> Routing:  # pragma: no cover
        """Route x_TD (T, D), whose sequences are `seq_len` tokens long; `mask_T` (T,) bool marks
        the real tokens (False = padding: their losses and choices do not count). No side effects:
        state a router keeps across steps changes only through `observe_load` and `step_update`."""
        raise NotImplementedError

    # Routers that balance by a running state (DeepSeek-V3's expert bias) track the load they
    # produced: the layer reports it after each training forward (with the global counts under
    # expert parallelism), and the trainer calls `step_update` once per optimizer step when the
    # router asks for it.
    @property
    def tracks_load(self) -> bool:
        return False

    @property
    def needs_step_update(self) -> bool:
        return False

    def global_balance_losses(self, routing: Routing, x_TD: Tensor, seq_len: int, batch) -> dict[str, Tensor]:
        """The unweighted balancing terms `forward` computes, over a batch spread across the
        ranks of expert parallelism: the same values as on the concatenation of every rank's
        tokens, from per-rank sums. `batch` (moekit.parallel.GlobalBatch) gives the sums over
        ranks (`sum`, differentiable; `sum_nograd`) and the layout (`total`, `offset`, `sizes`,
        `world`); this code never touches a process group. A router class that does not define it
        itself cannot run under expert parallelism (moekit.parallel refuses it, naming the class,
        unless a rule is registered with moekit.parallel.register_router_rule)."""
        raise TypeError(f"{type(self).__name__} defines no global_balance_losses (see moekit.parallel.losses.rule_for)")

    def observe_load(self, counts_E: Tensor) -> None:
        """Fold in the assignments per expert (E,) float32 of one forward."""

    def step_update(self) -> None:
        """The once-per-optimizer-step update of a router's running state."""
