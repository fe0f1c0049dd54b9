"""Qwen3-MoE: grouped-query attention with QK-norm (one RMSNorm over each head's dims, shared by
the heads, before rotary), head_dim free of hidden_size / heads, softmax top-k router
(`norm_topk_prob`), no shared expert, `decoder_sparse_step` and `mlp_only_layers`.
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
    check_moe,
    decoder_fields,
    decoder_to_hf,
    require,
    routed_experts,
    router_to_hf,
    sliding_window,
    softmax_router,
)
from moekit.hf.keymap import KeyMap
from moekit.models.decoder import DecoderConfig

MODEL_TYPE, ARCHITECTURE = "qwen3_moe", "Qwen3MoeForCausalLM"

# transformers 5.24 Qwen3MoeConfig defaults for the fields read here.
DEFAULTS = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=32,
    num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, use_sliding_window=False, sliding_window=4096,
    decoder_sparse_step=1, moe_intermediate_size=768, num_experts_per_tok=8, num_experts=128,
    norm_topk_prob=False, router_aux_loss_coef=0.001, mlp_only_layers=[], rope_theta=10000.0,
    initializer_range=0.02,
)

KEY_MAP = KeyMap(DECODER_BASE + GQA_ATTENTION + DENSE_MLP + routed_experts(), COMMON_IGNORE)


def config_from_hf(hf: dict) -> DecoderConfig:
    f = Fields(hf, DEFAULTS, MODEL_TYPE)
    fields = decoder_fields(f, window=sliding_window(f))
    # The Hub writes num_experts; transformers 5's save_pretrained writes num_local_experts.
    experts = f.hf.get("num_experts", f.hf.get("num_local_experts", DEFAULTS["num_experts"]))
    moe = dict(d_ff=f["moe_intermediate_size"], num_experts=experts,
               **softmax_router(f, norm_topk_prob=f["norm_topk_prob"]))
    bias = bool(f["attention_bias"])
    return DecoderConfig(**fields, qk_norm="head", attention_bias=bias, attention_out_bias=bias, moe=moe,
                         moe_interval=f["decoder_sparse_step"], dense_layers=tuple(f.get("mlp_only_layers") or ()))


def config_to_hf(cfg: DecoderConfig) -> dict:
    t = MODEL_TYPE
    check_gqa(t, cfg, "head")
    check_moe(t, cfg, ("softmax_topk",))
    m = cfg.moe
    require(t, m.num_shared_experts == 0, "has no shared experts")
    require(t, cfg.first_k_dense == 0, "places dense layers with mlp_only_layers, not first_k_dense")
    require(t, cfg.attention_bias == cfg.attention_out_bias, "one attention_bias flag covers q/k/v and output")
    out = decoder_to_hf(t, ARCHITECTURE, cfg)
    out.update(
        attention_bias=cfg.attention_bias, moe_intermediate_size=m.d_ff, num_experts=m.num_experts,
        norm_topk_prob=m.router_options.norm_topk_prob, decoder_sparse_step=cfg.moe_interval,
        mlp_only_layers=list(cfg.dense_layers), use_sliding_window=False, **router_to_hf(cfg),
    )
    return out


FAMILY = Family(MODEL_TYPE, ARCHITECTURE, "GQA + per-head QK-norm, softmax top-k, sparse step, mlp_only_layers",
                KEY_MAP, config_from_hf, config_to_hf)
