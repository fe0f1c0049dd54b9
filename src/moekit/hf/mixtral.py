"""Mixtral (Jiang et al. 2024, arXiv 2401.04088): grouped-query attention, every layer a sparse
MoE of SwiGLU experts, softmax router with the top-k weights renormalised.

On disk (the Hub and transformers' save_pretrained): per-expert `block_sparse_moe.experts.{E}.w1`
(gate), `w3` (up), `w2` (down) and the router `block_sparse_moe.gate`; transformers 5 fuses them
in memory as `mlp.experts.gate_up_proj` / `down_proj`, which is read too.
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
    router_to_hf,
    softmax_router,
)
from moekit.hf.keymap import GATE, UP, KeyMap, Rule
from moekit.models.decoder import DecoderConfig

MODEL_TYPE, ARCHITECTURE = "mixtral", "MixtralForCausalLM"

# transformers 5.24 MixtralConfig defaults for the fields read here.
DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, hidden_act="silu", max_position_embeddings=4096 * 32, rms_norm_eps=1e-5,
    tie_word_embeddings=False, sliding_window=None, num_experts_per_tok=2, num_local_experts=8,
    router_aux_loss_coef=0.001, rope_theta=1e6, initializer_range=0.02,
)

_MOE = "model.layers.{L}.block_sparse_moe"
KEY_MAP = KeyMap(
    DECODER_BASE + GQA_ATTENTION + [
        Rule(f"{_MOE}.gate.weight", "blocks.{L}.ffn.router.weight"),
        Rule(f"{_MOE}.experts.{{E}}.w1.weight", "blocks.{L}.ffn.experts.w_in", index="E", part=GATE),
        Rule(f"{_MOE}.experts.{{E}}.w3.weight", "blocks.{L}.ffn.experts.w_in", index="E", part=UP),
        Rule(f"{_MOE}.experts.{{E}}.w2.weight", "blocks.{L}.ffn.experts.w_out", index="E"),
        # transformers 5's in-memory names (renamed block and fused experts)
        Rule("model.layers.{L}.mlp.gate.weight", "blocks.{L}.ffn.router.weight", read_only=True),
        Rule("model.layers.{L}.mlp.experts.gate_up_proj", "blocks.{L}.ffn.experts.w_in", read_only=True),
        Rule("model.layers.{L}.mlp.experts.down_proj", "blocks.{L}.ffn.experts.w_out", read_only=True),
    ],
    COMMON_IGNORE,
)


def config_from_hf(hf: dict) -> DecoderConfig:
    f = Fields(hf, DEFAULTS, MODEL_TYPE)
    fields = decoder_fields(f, window=f.get("sliding_window"))
    experts = f.get("num_local_experts", f.hf.get("num_experts"))
    moe = dict(d_ff=f["intermediate_size"], num_experts=experts, **softmax_router(f, norm_topk_prob=True))
    return DecoderConfig(**fields, moe=moe)


def config_to_hf(cfg: DecoderConfig) -> dict:
    t = MODEL_TYPE
    check_gqa(t, cfg, "none")
    check_moe(t, cfg, ("softmax_topk",))
    m = cfg.moe
    require(t, m.router_options.norm_topk_prob, "renormalises the top-k weights (norm_topk_prob must be True)")
    require(t, m.num_shared_experts == 0, "has no shared experts")
    require(t, cfg.moe_layers == list(range(cfg.n_layers)), "every layer is MoE (no dense layers)")
    require(t, not cfg.attention_bias and not cfg.attention_out_bias, "has no attention biases")
    out = decoder_to_hf(t, ARCHITECTURE, cfg)
    out.update(intermediate_size=m.d_ff, num_local_experts=m.num_experts, sliding_window=None, **router_to_hf(cfg))
    return out


FAMILY = Family(MODEL_TYPE, ARCHITECTURE, "GQA, every layer MoE, softmax top-k renormalised", KEY_MAP,
                config_from_hf, config_to_hf)
