"""Llama (dense): grouped-query attention, SwiGLU MLP, optional attention biases; a source for
upcycling (moekit's upcycling turns its dense FFNs into experts). Llama 3.1's "llama3" rope
scaling and "linear" scaling are supported.
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
)
from moekit.hf.keymap import KeyMap
from moekit.models.decoder import DecoderConfig

MODEL_TYPE, ARCHITECTURE = "llama", "LlamaForCausalLM"

# transformers 5.24 LlamaConfig defaults for the fields read here.
DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, mlp_bias=False, rope_theta=10000.0, initializer_range=0.02,
)

KEY_MAP = KeyMap(DECODER_BASE + GQA_ATTENTION + DENSE_MLP, COMMON_IGNORE)


def config_from_hf(hf: dict) -> DecoderConfig:
    f = Fields(hf, DEFAULTS, MODEL_TYPE)
    f.refuse("mlp_bias", (False, None), "moekit's dense FFN has no biases")
    bias = bool(f["attention_bias"])
    return DecoderConfig(**decoder_fields(f), attention_bias=bias, attention_out_bias=bias)


def config_to_hf(cfg: DecoderConfig) -> dict:
    t = MODEL_TYPE
    require(t, cfg.moe is None, "is dense (moe must be None)")
    check_gqa(t, cfg, "none")
    require(t, cfg.attention_bias == cfg.attention_out_bias, "one attention_bias flag covers q/k/v and output")
    out = decoder_to_hf(t, ARCHITECTURE, cfg)
    out.update(attention_bias=cfg.attention_bias, mlp_bias=False)
    return out


FAMILY = Family(MODEL_TYPE, ARCHITECTURE, "dense: GQA, SwiGLU; rope linear / llama3 / yarn (upcycling source)",
                KEY_MAP, config_from_hf, config_to_hf)
