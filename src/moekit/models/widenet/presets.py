"""WideNet presets."""

from __future__ import annotations

from moekit.models.registry import register_preset
from moekit.models.widenet.model import WideNetConfig


@register_preset("widenet-digits", "widenet")
def widenet_digits() -> WideNetConfig:
    """WideNet for the 8x8 digits: one shared attention + MoE block (4 experts top-2) applied 4 times."""
    return WideNetConfig(image_size=8, patch_size=4, in_channels=1, num_classes=10, d_model=48, n_layers=4,
                         n_heads=4, d_ff=96, moe=dict(d_ff=96, num_experts=4, top_k=2))


@register_preset("widenet-b16", "widenet")
def widenet_b16() -> WideNetConfig:
    """WideNet-B (Xue et al. 2022): ViT-B/16 shapes, one block with 4 experts top-2 shared by 12 layers."""
    return WideNetConfig(image_size=224, patch_size=16, in_channels=3, num_classes=1000, d_model=768, n_layers=12,
                         n_heads=12, d_ff=3072, moe=dict(d_ff=3072, num_experts=4, top_k=2, capacity_factor=1.2))
