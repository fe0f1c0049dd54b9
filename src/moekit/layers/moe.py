"""The MoE block: router + dispatch + experts (+ shared experts).

Shape legend: T tokens (all leading dims flattened), D d_model, E experts.

    out = moe(x)        # x: (..., D)
    out = moe(x, mask=m)  # m: (...) bool, False = padding (no routing, no capacity, no losses)
    out.output          # (..., D), dtype of x; zero at padded positions
    out.aux_loss        # scalar: the router's auxiliary losses, already weighted
    out.metrics         # mapping of detached tensors, computed on first read (layers/metrics.py)
    out.routing         # the router's typed output (which experts each token chose, ...)

The second-to-last input dimension is the sequence for the routers that need one (Soft MoE
mixes within a sequence, DeepSeek's balance loss is per sequence, causal capacity counts
positions in it); a (T, D) input is one sequence. With a padding mask the layer reads how many
tokens are real (one host read): none padded, it runs as without a mask; all padded, it returns
zeros. A causal layer with capacity takes a `CausalState` to carry its counts across calls
(generation with a KV cache, layers/capacity.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from moekit.layers.capacity import CausalState
from moekit.layers.config import MoEConfig
from moekit.layers.dispatch import dispatch_expert_choice, dispatch_soft, dispatch_token_choice
from moekit.layers.experts import Experts, ModuleExperts, SharedExpert
from moekit.layers.metrics import LazyMetrics, empty_metrics, routing_metrics
from moekit.layers.plan import make_plan
from moekit.layers.routers import ROUTERS, ExpertChoice, Routing, SoftRouting, TokenChoice
from moekit.ops.permute import expert_counts


@dataclass
class MoEOutput:
    output: Tensor
    aux_loss: Tensor
    metrics: Mapping[str, Tensor]
    routing: Routing | None = None


class MoE(nn.Module):
    """A sparse Mixture-of-Experts feed-forward layer.

    `experts`: optional list of user modules mapping (n, D) -> (n, D), used instead of the
    stacked feed-forward experts (then `d_ff` and `activation` describe nothing and are ignored).
    """

    def __init__(self, cfg: MoEConfig, experts: Sequence[nn.Module] | None = None):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"MoE expects a MoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.router = ROUTERS[cfg.router](cfg)
        if experts is None:
            self.experts = Experts(
                cfg.num_experts, cfg.d_model, cfg.d_ff, cfg.activation, cfg.expert_bias, cfg.init_std
            )
        else:
            if len(experts) != cfg.num_experts:
                raise ValueError(
                    f"MoE got {len(experts)} expert modules but MoEConfig.num_experts={cfg.num_experts}"
                )
            self.experts = ModuleExperts(experts, cfg.d_model)
        self.shared_expert = None
        if cfg.num_shared_experts > 0:
            self.shared_expert = SharedExpert(
                cfg.d_model, cfg.shared_width, cfg.activation, cfg.expert_bias, cfg.shared_expert_gate, cfg.init_std
            )

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"MoE input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"MoE input must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.cfg.d_model:
            raise ValueError(
                f"MoE input must have last dimension d_model={self.cfg.d_model}, got shape {tuple(x.shape)}"
            )

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.experts.weight_dtype

    def _token_mask(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor | None, bool]:
        """(mask_T or None when every token is real, whether every token is padding)."""
        if mask is None:
            return None, False
        if not isinstance(mask, Tensor) or tuple(mask.shape) != tuple(x.shape[:-1]):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise ValueError(f"MoE mask must have the input's leading shape {tuple(x.shape[:-1])}, got {shape}")
        if mask.dtype != torch.bool and (mask.is_floating_point() or mask.is_complex()):
            raise TypeError(f"MoE mask must be bool (or 0/1 integers), got dtype {mask.dtype}")
        mask_T = mask.reshape(-1).to(device=x.device, dtype=torch.bool)
        if torch.compiler.is_compiling():
            return mask_T, False
        num_real = int(mask_T.sum())  # one host read; it spares the unpadded call everything below
        return (None if num_real == mask_T.numel() else mask_T), num_real == 0

    def _empty(self, x: Tensor) -> MoEOutput:
        # The result still depends on the parameters so an empty micro-batch backpropagates.
        zero = sum(p.sum() for p in self.parameters()) * 0.0
        metrics = empty_metrics(self.cfg.num_experts, x.device)
        return MoEOutput(x.new_zeros(x.shape) + zero.to(x.dtype), zero.float(), metrics)

    def forward(self, x: Tensor, mask: Tensor | None = None, state: CausalState | None = None) -> MoEOutput:
        self._check_input(x)
        cfg = self.cfg
        seq_len = x.shape[-2] if x.dim() >= 2 else 1
        x_TD = x if x.dim() == 2 else x.reshape(-1, cfg.d_model)
        mask_T, all_padding = self._token_mask(x, mask)
        if x_TD.shape[0] == 0 or all_padding:
            return self._empty(x)
        plan = make_plan(x_TD, self.router, self.experts, cfg, self.training, self._compute_dtype(x),
                         masked=mask_T is not None)
        # Routers compute in float32 whatever autocast says (see routers/base.py). Entering the
        # disabling context only when autocast is on saves its cost on every plain call.
        device = x.device.type
        with torch.autocast(device, enabled=False) if torch.is_autocast_enabled(device) else nullcontext():
            routing = self.router(x_TD, seq_len, plan, mask_T)
            if self.router.tracks_load:
                self.router.observe_load(self._load(routing, mask_T))
            xc_TD = x_TD if x_TD.dtype == plan.compute_dtype else x_TD.to(plan.compute_dtype)
            if isinstance(routing, TokenChoice):
                y_TD, stats = dispatch_token_choice(xc_TD, routing, self.experts, cfg, plan, seq_len, mask_T, state)
            elif isinstance(routing, ExpertChoice):
                y_TD, stats = dispatch_expert_choice(xc_TD, routing, self.experts, plan, mask_T)
            elif isinstance(routing, SoftRouting):
                y_TD, stats = dispatch_soft(xc_TD, routing, self.experts)
            else:  # pragma: no cover - a new router kind must be wired here
                raise TypeError(f"unknown routing output {type(routing).__name__}")
            if self.shared_expert is not None:
                y_TD = y_TD + self.shared_expert(xc_TD).to(y_TD.dtype)
            if mask_T is not None:
                y_TD = y_TD * mask_T.unsqueeze(1).to(y_TD.dtype)
        probs_TE = routing.probs_TE if mask_T is None else routing.probs_TE[mask_T]
        if torch.compiler.is_compiling():  # a compiled graph returns plain tensors
            metrics = routing_metrics(probs_TE, stats, routing.losses)
        else:
            metrics = LazyMetrics(probs_TE, stats, routing.losses)
        # (no .to where the dtype already matches: at decode sizes each skipped call saves tens of
        # microseconds of cold code, docs/performance.md)
        y_TD = y_TD if y_TD.dtype == x.dtype else y_TD.to(x.dtype)
        return MoEOutput(y_TD if x.dim() == 2 else y_TD.view(x.shape), routing.aux_loss, metrics, routing)

    def _load(self, routing: TokenChoice, mask_T: Tensor | None) -> Tensor:
        """Assignments per expert (E,) float32 the router made for real tokens."""
        expert_N = routing.expert_idx_TK.reshape(-1)
        if mask_T is None:
            return expert_counts(expert_N, self.cfg.num_experts).float()
        real_N = mask_T.unsqueeze(1).expand_as(routing.expert_idx_TK).reshape(-1)
        return expert_counts(expert_N, self.cfg.num_experts, real_N.float())

    @torch.no_grad()
    def apply_router_updates(self) -> None:
        """Run the router's once-per-step update if it has one (DeepSeek-V3 bias balancing)."""
        self.router.step_update()


def apply_router_updates(model: nn.Module) -> None:
    """Call after each optimizer step when routers use `bias_update="manual"`."""
    for module in model.modules():
        if isinstance(module, MoE):
            module.apply_router_updates()


def needs_router_updates(model: nn.Module) -> bool:
    """Whether some router of `model` waits for `apply_router_updates` after each optimizer step."""
    return any(isinstance(m, MoE) and m.router.needs_step_update for m in model.modules())
