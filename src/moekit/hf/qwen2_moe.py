"""Qwen1.5-MoE / Qwen2-MoE: grouped-query attention with q/k/v biases, softmax top-k router
(renormalised only if `norm_topk_prob`), one shared expert scaled by sigmoid(x w_g)
(`shared_expert_gate`), MoE on every `decoder_sparse_step`-th layer except `mlp_only_layers`.
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
    shared_expert,
    sliding_window,
    softmax_router,
)
from moekit.hf.keymap import KeyMap, Rule
from moekit.models.decoder import DecoderConfig

MODEL_TYPE, ARCHITECTURE = "qwen2_moe", "Qwen2MoeForCausalLM"

# transformers 5.24 Qwen2MoeConfig defaults for the fields read here.
DEFAULTS = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=16,
    num_key_value_heads=16, hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
    tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096, decoder_sparse_step=1,
    moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts_per_tok=4, num_experts=60,
    norm_topk_prob=False, router_aux_loss_coef=0.001, mlp_only_layers=[], qkv_bias=True, rope_theta=10000.0,
    initializer_range=0.02,
)

KEY_MAP = KeyMap(
    DECODER_BASE + GQA_ATTENTION + DENSE_MLP + routed_experts() + shared_expert("shared_expert") + [
        Rule("model.layers.{L}.mlp.shared_expert_gate.weight", "blocks.{L}.ffn.shared_expert.gate.weight"),
    ],
    COMMON_IGNORE,
)


def config_from_hf(hf: dict) -> DecoderConfig:
    f = Fields(hf, DEFAULTS, MODEL_TYPE)
    fields = decoder_fields(f, window=sliding_window(f))
    experts = f["num_experts"]
    moe = None
    if experts > 0:  # transformers: num_experts 0 means a dense model
        moe = dict(d_ff=f["moe_intermediate_size"], num_experts=experts,
                   num_shared_experts=1, shared_d_ff=f["shared_expert_intermediate_size"], shared_expert_gate=True,
                   **softmax_router(f, norm_topk_prob=f["norm_topk_prob"]))
    bias = bool(f["qkv_bias"])
    return DecoderConfig(**fields, attention_bias=bias, moe=moe, moe_interval=f["decoder_sparse_step"],
                         dense_layers=tuple(f.get("mlp_only_layers") or ()))


def config_to_hf(cfg: DecoderConfig) -> dict:
    t = MODEL_TYPE
    check_gqa(t, cfg, "none")
    check_moe(t, cfg, ("softmax_topk",))
    m = cfg.moe
    require(t, m.num_shared_experts == 1 and m.shared_expert_gate, "has exactly one shared expert with a sigmoid gate")
    require(t, cfg.first_k_dense == 0, "places dense layers with mlp_only_layers, not first_k_dense")
    require(t, not cfg.attention_out_bias, "has no output-projection bias")
    out = decoder_to_hf(t, ARCHITECTURE, cfg)
    out.update(
        qkv_bias=cfg.attention_bias, moe_intermediate_size=m.d_ff, shared_expert_intermediate_size=m.shared_width,
        num_experts=m.num_experts, norm_topk_prob=m.router_options.norm_topk_prob,
        decoder_sparse_step=cfg.moe_interval, mlp_only_layers=list(cfg.dense_layers), use_sliding_window=False,
        **router_to_hf(cfg),
    )
    return out


FAMILY = Family(MODEL_TYPE, ARCHITECTURE,
                "GQA + qkv bias, softmax top-k, 1 shared expert with sigmoid gate, sparse step, mlp_only_layers",
                KEY_MAP, config_from_hf, config_to_hf)
