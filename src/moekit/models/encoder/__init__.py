"""BERT-style encoder with MoE feed-forward layers and a sequence-classification head."""

from moekit.models.encoder.model import (
    EncoderClassifier,
    EncoderConfig,
    EncoderOutput,
    count_encoder,
    describe_encoder,
    encoder_dense_twin,
)
from moekit.models.registry import register_arch

register_arch("encoder", EncoderConfig, EncoderClassifier, count_encoder, describe_encoder, encoder_dense_twin)

from moekit.models.encoder import presets  # noqa: E402,F401  (registers the presets)

__all__ = ["EncoderClassifier", "EncoderConfig", "EncoderOutput"]
