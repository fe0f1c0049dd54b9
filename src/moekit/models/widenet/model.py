"""WideNet (Xue et al. 2022, "Go Wider Instead of Deeper", AAAI; arXiv 2107.11817).

One transformer block's weights (attention and a MoE feed-forward, router included) are shared
by all layers; only the LayerNorms are per layer. Section 3: sharing cuts parameters by the
depth factor, MoE gives the width back, and the individual LayerNorms let the shared router
see differently normalised inputs at each depth, so layers still route differently.

Built on the ViT of `models/vision` (the paper's main setting); the unshared twin is the V-MoE
of the same shapes with MoE in every block, and `moekit info` prints both counts.

Shape legend: B images, N tokens (patches + class token), D d_model, C classes.

Parameter counts: "total" is what is stored; "active per token" counts each shared weight once
(the routed experts a token does not use in a layer excluded), like every other model here.
Compute per token is n_layers applications of the shared block, which is the unshared twin's
active count; `describe_widenet` prints both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.moe import MoE
from moekit.models import common
from moekit.models.vision.model import (
    Attention,
    PatchEmbedding,
    VisionConfig,
    VisionOutput,
    count_vision,
    stem_and_head_params,
)


@dataclass
class WideNetConfig(VisionConfig):
    moe_interval: int = 1  # every layer is the shared MoE block

    def __post_init__(self):
        super().__post_init__()
        if self.moe is None:
            raise ValueError("WideNetConfig.moe is required: the shared block's feed-forward is a MoE")
        if self.moe_interval != 1:
            raise ValueError(
                f"WideNetConfig.moe_interval must be 1 (one shared MoE block in every layer), got {self.moe_interval}"
            )


class WideNet(nn.Module):
    def __init__(self, cfg: WideNetConfig):
        super().__init__()
        if not isinstance(cfg, WideNetConfig):
            raise TypeError(f"WideNet expects a WideNetConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.patch = PatchEmbedding(cfg)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.init_std)  # shared by every layer
        self.ffn = MoE(cfg.moe)  # shared by every layer, router included
        self.norms1 = nn.ModuleList(nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) for _ in range(cfg.n_layers))
        self.norms2 = nn.ModuleList(nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, images, labels=None) -> VisionOutput:
        x_BND = self.patch(images)
        aux_loss = x_BND.new_zeros((), dtype=torch.float32)
        layer_metrics = []
        for i in range(self.cfg.n_layers):  # same weights, the layer's own LayerNorms
            x_BND = x_BND + self.drop(self.attn(self.norms1[i](x_BND)))
            out = self.ffn(self.norms2[i](x_BND))
            x_BND = x_BND + self.drop(out.output)
            aux_loss = aux_loss + out.aux_loss
            layer_metrics.append((i, out.metrics))
        x_BND = self.norm(x_BND)
        pooled_BD = x_BND[:, 0] if self.cfg.pool == "cls" else x_BND[:, 1:].mean(dim=1)
        result = VisionOutput(self.head(pooled_BD), aux_loss, layer_metrics)
        if labels is not None:
            result.task_loss = F.cross_entropy(result.logits.float(), labels)
            result.loss = result.task_loss + aux_loss
        return result


def unshared_twin(cfg: WideNetConfig) -> VisionConfig:
    """The same network with separate weights in every layer (a V-MoE with MoE everywhere)."""
    fields = {f: getattr(cfg, f) for f in VisionConfig.__dataclass_fields__}
    return VisionConfig(**{**fields, "preset": None})


def count_widenet(cfg: WideNetConfig) -> tuple[int, int]:
    d = cfg.d_model
    attn = (3 * d * d + 3 * d) + (d * d + d)
    moe_total, moe_active = common.moe_params(cfg.moe)
    fixed = stem_and_head_params(cfg) + attn + cfg.n_layers * 2 * 2 * d
    return fixed + moe_total, fixed + moe_active


def describe_widenet(cfg: WideNetConfig) -> list[tuple[str, str]]:
    m = cfg.moe
    total, active = count_widenet(cfg)
    u_total, u_active = count_vision(unshared_twin(cfg))
    return [
        ("input", f"{cfg.in_channels}x{cfg.image_size}x{cfg.image_size}, patch {cfg.patch_size} -> "
                  f"{cfg.num_patches} patches"),
        ("shared block", f"attention ({cfg.n_heads} heads, d_model {cfg.d_model}) + MoE ({m.num_experts} experts x "
                         f"d_ff {m.d_ff}, {m.router} top_k {m.top_k}) applied {cfg.n_layers} times"),
        ("per-layer", f"{cfg.n_layers} x 2 LayerNorms (the only unshared weights)"),
        ("stored vs unshared twin", f"{total:,} vs {u_total:,} parameters ({u_total / total:.1f}x fewer)"),
        ("compute per token", f"{u_active:,} parameter applications (the unshared twin's active count; "
                              f"{active:,} distinct)"),
    ]


def widenet_dense_twin(cfg: WideNetConfig, match: str) -> VisionConfig:
    """The dense twin of the unshared network (compute-matched for match='active')."""
    from moekit.models.vision.model import vision_dense_twin

    return vision_dense_twin(unshared_twin(cfg), match)


__all__ = ["WideNet", "WideNetConfig", "count_widenet", "describe_widenet", "unshared_twin", "widenet_dense_twin"]
