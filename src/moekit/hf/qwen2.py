"""Qwen2 / Qwen2.5 (dense): grouped-query attention with q/k/v biases (no output bias), SwiGLU
MLP; a source for upcycling.
"""

from __future__ import annotations

from moekit.hf.common import (
    COMMON_IGNORE,
    DECODER_BASE,
    DENSE_MLP,
    GQA_ATTENTION,
    Family,
    Fields,
    check_gqa,
    decoder_fields,
    decoder_to_hf,
    require,
    sliding_window,
)
from moekit.hf.keymap import KeyMap
from moekit.models.decoder import DecoderConfig

MODEL_TYPE, ARCHITECTURE = "qwen2", "Qwen2ForCausalLM"

# transformers 5.24 Qwen2Config defaults for the fields read here.
DEFAULTS = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096, rope_theta=10000.0,
    initializer_range=0.02,
)

KEY_MAP = KeyMap(DECODER_BASE + GQA_ATTENTION + DENSE_MLP, COMMON_IGNORE)


def config_from_hf(hf: dict) -> DecoderConfig:
    f = Fields(hf, DEFAULTS, MODEL_TYPE)
    return DecoderConfig(**decoder_fields(f, window=sliding_window(f)), attention_bias=True)


def config_to_hf(cfg: DecoderConfig) -> dict:
    t = MODEL_TYPE
    require(t, cfg.moe is None, "is dense (moe must be None)")
    check_gqa(t, cfg, "none")
    require(t, cfg.attention_bias and not cfg.attention_out_bias, "has q/k/v biases and no output bias")
    out = decoder_to_hf(t, ARCHITECTURE, cfg)
    out.update(use_sliding_window=False)
    return out


FAMILY = Family(MODEL_TYPE, ARCHITECTURE, "dense: GQA + qkv bias, SwiGLU (upcycling source)",
                KEY_MAP, config_from_hf, config_to_hf)
