"""WideNet: one MoE transformer block shared across all layers, LayerNorms per layer."""

from moekit.models.registry import register_arch
from moekit.models.widenet.model import (
    WideNet,
    WideNetConfig,
    count_widenet,
    describe_widenet,
    unshared_twin,
    widenet_dense_twin,
)

register_arch("widenet", WideNetConfig, WideNet, count_widenet, describe_widenet, widenet_dense_twin)

from moekit.models.widenet import presets  # noqa: E402,F401  (registers the presets)

__all__ = ["WideNet", "WideNetConfig", "unshared_twin"]
