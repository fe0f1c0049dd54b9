"""Decoder-only MoE language model (Mixtral / Qwen-MoE / OLMoE / DeepSeek-V3 family)."""

from moekit.models.decoder.model import DecoderConfig, DecoderLM, DecoderOutput, KVCache, MLAConfig
from moekit.models.decoder.params import count_decoder, decoder_dense_twin, describe_decoder
from moekit.models.registry import register_arch

register_arch("decoder", DecoderConfig, DecoderLM, count_decoder, describe_decoder, decoder_dense_twin)

from moekit.models.decoder import presets  # noqa: E402,F401  (registers the presets)

__all__ = ["DecoderConfig", "DecoderLM", "DecoderOutput", "KVCache", "MLAConfig"]
