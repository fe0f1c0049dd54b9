"""Vision MoE (V-MoE): a ViT with MoE MLPs in every other block and batch prioritized routing."""

from moekit.models.registry import register_arch
from moekit.models.vision.model import (
    VisionClassifier,
    VisionConfig,
    VisionOutput,
    count_vision,
    describe_vision,
    vision_dense_twin,
)

register_arch("vision", VisionConfig, VisionClassifier, count_vision, describe_vision, vision_dense_twin)

from moekit.models.vision import presets  # noqa: E402,F401  (registers the presets)

__all__ = ["VisionClassifier", "VisionConfig", "VisionOutput"]
