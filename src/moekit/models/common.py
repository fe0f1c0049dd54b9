"""Pieces every model shares: config checks, RMSNorm, applying rotary embeddings (the tables
are built in `models/rope.py`), the dense FFN, and the analytic parameter count of one MoE layer.

Shape legend: B batch, L query length, S key length (cache + new), H query heads, G key/value
heads, Dh head dim, D d_model, F ffn width, E experts.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.config import MoEConfig
from moekit.layers.routers import ROUTERS
from moekit.ops.activations import ACTIVATIONS, GATED, activate
from moekit.validate import check_bool, check_choice, check_float, check_int  # noqa: F401  (models use C.check_*)

# ---------------------------------------------------------------------------------------------
# Config validation: every error names the config class, the field and what is allowed.


def nested_moe(owner: str, moe: Any, d_model: int, *, causal: bool) -> MoEConfig | None:
    """Accept None, a dict of MoEConfig fields or a MoEConfig; fill in d_model and causal.

    A dict need not repeat d_model (the model's own is used). A MoEConfig given with a different
    d_model is an error rather than silently rebuilt, so a typo cannot change the expert shapes.
    """
    if moe is None:
        return None
    if isinstance(moe, dict):
        given = dict(moe)
        if "d_model" in given and given["d_model"] != d_model:
            raise ValueError(f"{owner}.moe.d_model ({given['d_model']}) must equal {owner}.d_model ({d_model})")
        given["d_model"] = d_model
        given.setdefault("causal", causal)
        if causal and not given["causal"]:
            raise ValueError(f"{owner}.moe.causal must be True in a causal model")
        return MoEConfig(**given)
    if not isinstance(moe, MoEConfig):
        raise TypeError(f"{owner}.moe must be None, a dict or a MoEConfig, got {type(moe).__name__}")
    if moe.d_model != d_model:
        raise ValueError(f"{owner}.moe.d_model ({moe.d_model}) must equal {owner}.d_model ({d_model})")
    if causal and not moe.causal:
        # Re-validating with causal=True makes a non-causal router (expert choice, soft) fail loudly.
        from dataclasses import replace

        return replace(moe, causal=True)
    return moe


# ---------------------------------------------------------------------------------------------
# Normalisation and position


class RMSNorm(nn.Module):
    """Zhang & Sennrich 2019. Statistics in float32 whatever the input dtype, then the weight is
    applied in the input dtype: the order `transformers` uses for Llama, Mixtral, Qwen and OLMoE,
    which matters for bf16 parity."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHLd: Tensor, cos_BLd: Tensor, sin_BLd: Tensor) -> Tensor:
    cos, sin = cos_BLd.unsqueeze(1), sin_BLd.unsqueeze(1)  # (B, 1, L, d): broadcast over heads
    return x_BHLd * cos + rotate_half(x_BHLd) * sin


def apply_rope_interleaved(x_BHLd: Tensor, cos_BLd: Tensor, sin_BLd: Tensor) -> Tensor:
    """DeepSeek's layout: pairs (x0, x1), (x2, x3), ... rotate together; the output is written
    de-interleaved (evens then odds), as the released DeepSeek-V3 code and `transformers` do."""
    half = cos_BLd.shape[-1] // 2
    cos, sin = cos_BLd[..., :half].unsqueeze(1), sin_BLd[..., :half].unsqueeze(1)
    x1, x2 = x_BHLd[..., 0::2], x_BHLd[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


# ---------------------------------------------------------------------------------------------
# Dense feed-forward


class DenseFFN(nn.Module):
    """The dense feed-forward block. Gated activations (SwiGLU, Shazeer 2020) use gate_proj and
    up_proj, the layout of Llama/Mixtral/Qwen dense MLPs; others use up_proj only (BERT, ViT)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "swiglu", bias: bool = False,
                 init_std: float = 0.02):
        super().__init__()
        check_choice("DenseFFN", "activation", activation, ACTIVATIONS)
        self.activation = activation
        self.gated = activation in GATED
        self.gate_proj = nn.Linear(d_model, d_ff, bias=bias) if self.gated else None
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)
        for lin in (self.gate_proj, self.up_proj, self.down_proj):
            if lin is not None:
                nn.init.normal_(lin.weight, std=init_std)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            h = torch.cat((self.gate_proj(x), self.up_proj(x)), dim=-1)
            return self.down_proj(activate(h, self.activation))
        return self.down_proj(activate(self.up_proj(x), self.activation))


def dense_ffn_params(d_model: int, d_ff: int, activation: str, bias: bool) -> int:
    mats = 3 if activation in GATED else 2
    biases = ((mats - 1) * d_ff + d_model) if bias else 0
    return mats * d_model * d_ff + biases


# ---------------------------------------------------------------------------------------------
# Analytic parameter counts of one MoE layer


def router_params(cfg: MoEConfig) -> int:
    return ROUTERS[cfg.router].num_params(cfg)


def experts_per_token(cfg: MoEConfig) -> float:
    """How many routed experts a token's output passes through, on average (see the router
    classes: top_k for token choice, c for expert choice, every expert for dense and Soft MoE)."""
    return ROUTERS[cfg.router].experts_per_token(cfg)


def moe_params(cfg: MoEConfig) -> tuple[int, int]:
    """(total, active per token) parameters of one MoE layer built with stacked experts."""
    one_expert = dense_ffn_params(cfg.d_model, cfg.d_ff, cfg.activation, cfg.expert_bias)
    shared = 0
    if cfg.num_shared_experts > 0:
        shared = dense_ffn_params(cfg.d_model, cfg.shared_width, cfg.activation, cfg.expert_bias)
        shared += cfg.d_model if cfg.shared_expert_gate else 0
    fixed = router_params(cfg) + shared  # every token uses the whole router and shared experts
    total = fixed + cfg.num_experts * one_expert
    active = fixed + round(experts_per_token(cfg) * one_expert)
    return total, active


def module_moe_active(moe: nn.Module) -> tuple[int, int]:
    """(total, active) parameters of an instantiated MoE module (stacked or user experts)."""
    total = sum(p.numel() for p in moe.parameters())
    experts = sum(p.numel() for p in moe.experts.parameters())
    share = experts_per_token(moe.cfg) / moe.cfg.num_experts
    return total, total - experts + round(experts * share)


def count_module(model: nn.Module) -> tuple[int, int]:
    """(total, active per token) of any module: all parameters, less the routed experts a token
    does not use in every MoE layer it contains."""
    from moekit.layers.moe import MoE

    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in model.modules():
        if isinstance(m, MoE):
            t, a = module_moe_active(m)
            inactive += t - a
    return total, total - inactive


def causal_lm_loss(logits_BLV: Tensor, labels_BL: Tensor, ignore_index: int = -100) -> Tensor:
    """Mean next-token cross-entropy: position t predicts labels[t+1] (the shift is ours)."""
    logits = logits_BLV[:, :-1].reshape(-1, logits_BLV.shape[-1]).float()
    target = labels_BL[:, 1:].reshape(-1)
    return F.cross_entropy(logits, target, ignore_index=ignore_index)
