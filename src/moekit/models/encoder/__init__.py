"""BERT-style encoder with MoE feed-forward layers and a sequence-classification head."""

from moekit.models.encoder.model import (
    EncoderBackbone,
    EncoderBackboneConfig,
    EncoderClassifier,
    EncoderConfig,
    EncoderOutput,
    count_backbone,
    count_encoder,
    describe_encoder,
    encoder_dense_twin,
)
from moekit.models.registry import register_arch

register_arch("encoder", EncoderConfig, EncoderClassifier, count_encoder, describe_encoder, encoder_dense_twin)
# BertModel checkpoints (moekit.hf) load as the headless encoder; it has no dense twin.
register_arch("encoder-backbone", EncoderBackboneConfig, EncoderBackbone, count_backbone, describe_encoder)

from moekit.models.encoder import presets  # noqa: E402,F401  (registers the presets)

__all__ = ["EncoderBackbone", "EncoderBackboneConfig", "EncoderClassifier", "EncoderConfig", "EncoderOutput"]
