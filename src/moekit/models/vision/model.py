"""Vision MoE (V-MoE, Riquelme et al. 2021, "Scaling Vision with Sparse Mixture of Experts"):
a ViT whose every other MLP is a MoE, with batch prioritized routing at inference.

Read top to bottom: config, patch embedding, block, model, counting and dense twin.

Shape legend: B images, P patches (+1 with the class token: N), D d_model, C classes.

ViT (Dosovitskiy et al. 2021): non-overlapping patches linearly embedded (a strided conv), a
learned class token and position embeddings, pre-LayerNorm blocks, a final LayerNorm and a
linear head on the class token (or the mean of the patch tokens).

V-MoE section 2: the MoE replaces the MLP in every other block (the odd ones, 0-based), each
expert a GELU MLP, top-k routing (k=2 in the paper) with a per-expert capacity. Batch prioritized
routing (section 4) ranks tokens by their top gate so that, when capacity is short, the least
important tokens are the ones dropped: with `overflow_policy="score"` and an
`eval_capacity_factor` below 1 the model skips work on part of the patches at inference and keeps
most of its accuracy. Dropped tokens pass through on the residual stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.config import MoEConfig
from moekit.layers.moe import MoE
from moekit.models import common
from moekit.ops.activations import ACTIVATIONS

POOLS = ("cls", "mean")


@dataclass
class VisionConfig:
    image_size: int = 32
    patch_size: int = 4
    in_channels: int = 3
    num_classes: int = 10
    d_model: int = 64
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 256
    activation: str = "gelu"
    norm_eps: float = 1e-6
    dropout: float = 0.0
    pool: str = "cls"  # "cls": classify the class token; "mean": mean of the patch tokens
    moe: MoEConfig | dict | None = None
    moe_interval: int = 2  # V-MoE "every 2": blocks 1, 3, 5, ... are MoE
    init_std: float = 0.02
    preset: str | None = None

    def __post_init__(self):
        own = type(self).__name__
        for name in ("image_size", "patch_size", "in_channels", "num_classes", "d_model", "n_layers", "n_heads",
                     "d_ff", "moe_interval"):
            common.check_int(own, name, getattr(self, name), 1)
        if self.image_size % self.patch_size:
            raise ValueError(f"{own}.patch_size ({self.patch_size}) must divide image_size ({self.image_size})")
        if self.d_model % self.n_heads:
            raise ValueError(f"{own}.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        common.check_choice(own, "activation", self.activation, ACTIVATIONS)
        common.check_choice(own, "pool", self.pool, POOLS)
        common.check_float(own, "norm_eps", self.norm_eps)
        common.check_float(own, "dropout", self.dropout, strict=False)
        common.check_float(own, "init_std", self.init_std)
        if isinstance(self.moe, dict):
            self.moe = {"activation": "gelu", "expert_bias": True, **self.moe}
        self.moe = common.nested_moe(own, self.moe, self.d_model, causal=False)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and (i + 1) % self.moe_interval == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]


# ---------------------------------------------------------------------------------------------
# Patch embedding and block


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.proj = nn.Conv2d(cfg.in_channels, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.position = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.d_model))
        nn.init.normal_(self.position, std=cfg.init_std)
        self.image_size, self.channels = cfg.image_size, cfg.in_channels

    def forward(self, images_BCHW: Tensor) -> Tensor:
        if images_BCHW.dim() != 4 or tuple(images_BCHW.shape[1:]) != (self.channels, self.image_size, self.image_size):
            raise ValueError(
                f"images must be (batch, {self.channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(images_BCHW.shape)}"
            )
        x_BDhw = self.proj(images_BCHW)
        x_BPD = x_BDhw.flatten(2).transpose(1, 2)  # (B, P, D), patches in row-major order
        cls_B1D = self.cls_token.expand(x_BPD.shape[0], -1, -1)
        return torch.cat((cls_B1D, x_BPD), dim=1) + self.position  # (B, N, D)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, std: float):
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        for lin in (self.qkv, self.proj):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)

    def forward(self, x_BND: Tensor) -> Tensor:
        B, N, D = x_BND.shape
        qkv = self.qkv(x_BND).view(B, N, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)  # (3, B, H, N, Dh)
        out_BHNd = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out_BHNd.transpose(1, 2).reshape(B, N, D))


class Block(nn.Module):
    """Pre-LN ViT block: x + attn(LN(x)), then x + mlp(LN(x)); the MLP is dense or a MoE."""

    def __init__(self, cfg: VisionConfig, layer_idx: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.init_std)
        self.norm2 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.ffn: nn.Module = MoE(cfg.moe)
        else:
            self.ffn = common.DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, bias=True, init_std=cfg.init_std)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BND: Tensor):
        x_BND = x_BND + self.drop(self.attn(self.norm1(x_BND)))
        h_BND = self.norm2(x_BND)
        if isinstance(self.ffn, MoE):
            out = self.ffn(h_BND)
            return x_BND + self.drop(out.output), out
        return x_BND + self.drop(self.ffn(h_BND)), None


# ---------------------------------------------------------------------------------------------
# Model


@dataclass
class VisionOutput:
    logits: Tensor  # (B, C)
    aux_loss: Tensor
    layer_metrics: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)
    loss: Tensor | None = None  # task_loss + aux_loss when labels are given
    task_loss: Tensor | None = None


class VisionClassifier(nn.Module):
    """ViT / V-MoE image classifier: `model(images, labels=None)`."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        if not isinstance(cfg, VisionConfig):
            raise TypeError(f"VisionClassifier expects a VisionConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.patch = PatchEmbedding(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        nn.init.zeros_(self.head.weight)  # ViT zero-initialises the head
        nn.init.zeros_(self.head.bias)

    def set_inference_capacity(self, eval_capacity_factor: float | None, overflow_policy: str = "score") -> None:
        """Choose every MoE layer's capacity at inference (V-MoE section 4.1: BPR with capacity
        below 1 processes only the highest-scoring share of the tokens). None restores the
        training capacity; training-time capacity is unchanged either way."""
        for module in self.modules():
            if isinstance(module, MoE):
                module.cfg = replace(
                    module.cfg, eval_capacity_factor=eval_capacity_factor, overflow_policy=overflow_policy
                )
                module.router.cfg = module.cfg  # expert choice reads its capacity from the router's copy

    def run_blocks(self, x_BND: Tensor) -> tuple[Tensor, Tensor, list]:
        aux_loss = x_BND.new_zeros((), dtype=torch.float32)
        layer_metrics = []
        for i, block in enumerate(self.blocks):
            x_BND, moe_out = block(x_BND)
            if moe_out is not None:
                aux_loss = aux_loss + moe_out.aux_loss
                layer_metrics.append((i, moe_out.metrics))
        return x_BND, aux_loss, layer_metrics

    def forward(self, images: Tensor, labels: Tensor | None = None) -> VisionOutput:
        x_BND, aux_loss, layer_metrics = self.run_blocks(self.patch(images))
        x_BND = self.norm(x_BND)
        pooled_BD = x_BND[:, 0] if self.cfg.pool == "cls" else x_BND[:, 1:].mean(dim=1)
        out = VisionOutput(self.head(pooled_BD), aux_loss, layer_metrics)
        if labels is not None:
            out.task_loss = F.cross_entropy(out.logits.float(), labels)
            out.loss = out.task_loss + aux_loss
        return out


# ---------------------------------------------------------------------------------------------
# Parameter counts and dense twin


def block_fixed_params(cfg: VisionConfig) -> int:
    d = cfg.d_model
    return (3 * d * d + 3 * d) + (d * d + d) + 2 * 2 * d  # qkv, proj, two LayerNorms


def ffn_params(cfg: VisionConfig, i: int) -> tuple[int, int]:
    if cfg.is_moe_layer(i):
        return common.moe_params(cfg.moe)
    n = common.dense_ffn_params(cfg.d_model, cfg.d_ff, cfg.activation, True)
    return n, n


def stem_and_head_params(cfg: VisionConfig) -> int:
    d = cfg.d_model
    patch = cfg.in_channels * cfg.patch_size**2 * d + d
    return patch + d + (cfg.num_patches + 1) * d + 2 * d + d * cfg.num_classes + cfg.num_classes


def count_vision(cfg: VisionConfig) -> tuple[int, int]:
    total = active = stem_and_head_params(cfg)
    for i in range(cfg.n_layers):
        t, a = ffn_params(cfg, i)
        total, active = total + block_fixed_params(cfg) + t, active + block_fixed_params(cfg) + a
    return total, active


def describe_vision(cfg: VisionConfig) -> list[tuple[str, str]]:
    rows = [("input", f"{cfg.in_channels}x{cfg.image_size}x{cfg.image_size}, patch {cfg.patch_size} -> "
                      f"{cfg.num_patches} patches + class token"),
            ("blocks", f"{cfg.n_layers} pre-LN, d_model {cfg.d_model}, {cfg.n_heads} heads, MoE in {cfg.moe_layers}")]
    if cfg.moe is not None:
        m = cfg.moe
        if m.capacity_factor is None:
            cap = "dropless"
        else:
            cap = f"capacity {m.capacity_factor} (eval {m.eval_capacity_factor})"
        rows.append(("moe ffn", f"{m.num_experts} experts x d_ff {m.d_ff}, {m.router} top_k {m.top_k}, {cap}, "
                                f"overflow by {m.overflow_policy}"))
    rows.append(("dense ffn", f"d_ff {cfg.d_ff} ({cfg.activation})"))
    return rows


def vision_dense_twin(cfg: VisionConfig, match: str) -> VisionConfig:
    """Every block dense with one width F*, rounded; see `encoder_dense_twin` for the rule."""
    budget = sum(ffn_params(cfg, i)[0 if match == "total" else 1] for i in range(cfg.n_layers))
    fixed = common.dense_ffn_params(cfg.d_model, 0, cfg.activation, True)
    per_unit = common.dense_ffn_params(cfg.d_model, 1, cfg.activation, True) - fixed
    d_ff = max(1, round((budget - cfg.n_layers * fixed) / (cfg.n_layers * per_unit)))
    return replace(cfg, moe=None, d_ff=d_ff, preset=None)
