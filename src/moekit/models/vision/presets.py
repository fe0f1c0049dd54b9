"""Vision presets: digits-sized models for tests, and the V-MoE-B/16 / ViT-B/16 shapes."""

from __future__ import annotations

from moekit.models.registry import register_preset
from moekit.models.vision.model import VisionConfig


@register_preset("vmoe-digits", "vision")
def vmoe_digits() -> VisionConfig:
    """V-MoE for scikit-learn's 8x8 digits: 4x4 patches, 4 blocks (MoE in 1 and 3), 8 experts top-2,
    BPR, capacity 1.25."""
    return VisionConfig(
        image_size=8, patch_size=4, in_channels=1, num_classes=10, d_model=48, n_layers=4, n_heads=4, d_ff=96,
        moe=dict(d_ff=48, num_experts=8, top_k=2, capacity_factor=1.25, overflow_policy="score"),
    )


@register_preset("vit-digits", "vision")
def vit_digits() -> VisionConfig:
    """Dense ViT twin of `vmoe-digits` (same shapes, MLP d_ff 96 everywhere)."""
    return VisionConfig(image_size=8, patch_size=4, in_channels=1, num_classes=10, d_model=48, n_layers=4,
                        n_heads=4, d_ff=96)


@register_preset("vmoe-b16", "vision")
def vmoe_b16() -> VisionConfig:
    """V-MoE-B/16 (Riquelme et al. 2021): ViT-B/16 with 32 experts top-2 in every other block, 1000 classes."""
    return VisionConfig(
        image_size=224, patch_size=16, in_channels=3, num_classes=1000, d_model=768, n_layers=12, n_heads=12,
        d_ff=3072, moe=dict(d_ff=3072, num_experts=32, top_k=2, capacity_factor=1.05, overflow_policy="score"),
    )


@register_preset("vit-b16", "vision")
def vit_b16() -> VisionConfig:
    """ViT-B/16 (Dosovitskiy et al. 2021), 1000 classes."""
    return VisionConfig(image_size=224, patch_size=16, in_channels=3, num_classes=1000, d_model=768, n_layers=12,
                        n_heads=12, d_ff=3072)
