"""OLMoE (Muennighoff et al. 2024, arXiv 2409.02060): QK-norm over the whole q and k projections
(before the head split), optional clip_qkv, softmax top-k router (`norm_topk_prob`, off in the
released model), every layer MoE, no shared expert.
"""

from __future__ import annotations

from moekit.hf.common import (
    COMMON_IGNORE,
    DECODER_BASE,
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
    softmax_router,
)
from moekit.hf.keymap import KeyMap
from moekit.models.decoder import DecoderConfig

MODEL_TYPE, ARCHITECTURE = "olmoe", "OlmoeForCausalLM"

# transformers 5.24 OlmoeConfig defaults for the fields read here.
DEFAULTS = dict(
    vocab_size=50304, hidden_size=2048, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
    num_key_value_heads=None, hidden_act="silu", max_position_embeddings=4096, rms_norm_eps=1e-5,
    tie_word_embeddings=False, attention_bias=False, clip_qkv=None, num_experts_per_tok=8, num_experts=64,
    router_aux_loss_coef=0.01, norm_topk_prob=False, rope_theta=10000.0, initializer_range=0.02,
)

KEY_MAP = KeyMap(DECODER_BASE + GQA_ATTENTION + routed_experts(), COMMON_IGNORE)


def config_from_hf(hf: dict) -> DecoderConfig:
    f = Fields(hf, DEFAULTS, MODEL_TYPE)
    fields = decoder_fields(f)
    experts = f.hf.get("num_experts", f.hf.get("num_local_experts", DEFAULTS["num_experts"]))
    moe = dict(d_ff=f["intermediate_size"], num_experts=experts,
               **softmax_router(f, norm_topk_prob=f["norm_topk_prob"]))
    bias = bool(f["attention_bias"])
    clip = f.get("clip_qkv")
    return DecoderConfig(**fields, qk_norm="full", attention_bias=bias, attention_out_bias=bias,
                         clip_qkv=None if clip is None else float(clip), moe=moe)


def config_to_hf(cfg: DecoderConfig) -> dict:
    t = MODEL_TYPE
    check_gqa(t, cfg, "full", clip=True)
    check_moe(t, cfg, ("softmax_topk",))
    m = cfg.moe
    require(t, m.num_shared_experts == 0, "has no shared experts")
    require(t, cfg.moe_layers == list(range(cfg.n_layers)), "every layer is MoE (no dense layers)")
    require(t, cfg.attention_bias == cfg.attention_out_bias, "one attention_bias flag covers q/k/v and output")
    out = decoder_to_hf(t, ARCHITECTURE, cfg)
    out.update(
        intermediate_size=m.d_ff, attention_bias=cfg.attention_bias, clip_qkv=cfg.clip_qkv,
        num_experts=m.num_experts, norm_topk_prob=m.router_options.norm_topk_prob, **router_to_hf(cfg),
    )
    return out


FAMILY = Family(MODEL_TYPE, ARCHITECTURE, "GQA + QK-norm over full projections, clip_qkv, softmax top-k",
                KEY_MAP, config_from_hf, config_to_hf)
