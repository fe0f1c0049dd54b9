"""DeepSeek-V3 (arXiv 2412.19437): multi-head latent attention (low-rank q and kv projections,
a decoupled rotary part shared by the heads, interleaved rotary pairs), a sigmoid router with the
aux-loss-free bias `e_score_correction_bias`, group-limited top-k (`n_group`, `topk_group`),
`routed_scaling_factor`, the first `first_k_dense_replace` layers dense, shared experts.

transformers keeps the router weight and bias in float32 whatever the model dtype; so do we.
The multi-token-prediction layers (`num_nextn_predict_layers`, stored as layers past
num_hidden_layers) are skipped, as transformers skips them.
"""

from __future__ import annotations

from moekit.hf.common import (
    COMMON_IGNORE,
    DECODER_BASE,
    DENSE_MLP,
    Family,
    Fields,
    check_moe,
    decoder_fields,
    decoder_to_hf,
    require,
    routed_experts,
    router_to_hf,
    shared_expert,
)
from moekit.hf.keymap import Ignore, KeyMap, Rule
from moekit.models.decoder import DecoderConfig, MLAConfig

MODEL_TYPE, ARCHITECTURE = "deepseek_v3", "DeepseekV3ForCausalLM"

# transformers 5.24 DeepseekV3Config defaults for the fields read here.
DEFAULTS = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, n_shared_experts=1, n_routed_experts=256, routed_scaling_factor=2.5,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
    topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True, hidden_act="silu",
    max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_interleave=True,
    attention_bias=False, rope_theta=10000.0, initializer_range=0.02,
)

_ATTN = "model.layers.{L}.self_attn"
KEY_MAP = KeyMap(
    DECODER_BASE + DENSE_MLP + routed_experts() + shared_expert("shared_experts") + [
        Rule(f"{_ATTN}.q_proj.weight", "blocks.{L}.attn.q_proj.weight"),  # when q_lora_rank is null
        Rule(f"{_ATTN}.q_a_proj.weight", "blocks.{L}.attn.q_a_proj.weight"),
        Rule(f"{_ATTN}.q_a_proj.bias", "blocks.{L}.attn.q_a_proj.bias"),
        Rule(f"{_ATTN}.q_a_layernorm.weight", "blocks.{L}.attn.q_a_norm.weight"),
        Rule(f"{_ATTN}.q_b_proj.weight", "blocks.{L}.attn.q_b_proj.weight"),
        Rule(f"{_ATTN}.kv_a_proj_with_mqa.weight", "blocks.{L}.attn.kv_a_proj.weight"),
        Rule(f"{_ATTN}.kv_a_proj_with_mqa.bias", "blocks.{L}.attn.kv_a_proj.bias"),
        Rule(f"{_ATTN}.kv_a_layernorm.weight", "blocks.{L}.attn.kv_a_norm.weight"),
        Rule(f"{_ATTN}.kv_b_proj.weight", "blocks.{L}.attn.kv_b_proj.weight"),
        Rule(f"{_ATTN}.o_proj.weight", "blocks.{L}.attn.o_proj.weight"),
        Rule(f"{_ATTN}.o_proj.bias", "blocks.{L}.attn.o_proj.bias"),
        Rule("model.layers.{L}.mlp.gate.e_score_correction_bias", "blocks.{L}.ffn.router.expert_bias"),
    ],
    COMMON_IGNORE + [
        Ignore("model.layers.{L}.{*}",
               "multi-token-prediction layer (num_nextn_predict_layers); transformers skips it too",
               when=lambda g, hf: int(g["L"]) >= hf.get("num_hidden_layers", DEFAULTS["num_hidden_layers"])),
    ],
)


def config_from_hf(hf: dict) -> DecoderConfig:
    f = Fields(hf, DEFAULTS, MODEL_TYPE)
    f.refuse("scoring_func", ("sigmoid", None), "DeepSeek-V3 routes with sigmoid scores (softmax is DeepSeek-V2)")
    f.refuse("topk_method", ("noaux_tc", None), "DeepSeek-V3 selects with the bias-corrected group-limited top-k")
    fields = decoder_fields(f)
    fields.update(head_dim=None, n_kv_heads=None)  # MLA: head widths come from MLAConfig
    if fields["d_model"] % fields["n_heads"]:
        # DecoderConfig asks for a head_dim when heads do not divide d_model, though MLA ignores
        # it; the q/k head width is the honest value to give.
        fields["head_dim"] = f["qk_nope_head_dim"] + f["qk_rope_head_dim"]
    mla = MLAConfig(
        kv_lora_rank=f["kv_lora_rank"], q_lora_rank=f.get("q_lora_rank"), qk_nope_head_dim=f["qk_nope_head_dim"],
        qk_rope_head_dim=f["qk_rope_head_dim"], v_head_dim=f["v_head_dim"],
        rope_interleave=bool(f.get("rope_interleave", True)),
    )
    shared = f["n_shared_experts"] or 0
    if shared < 1:
        raise ValueError(f"config.json ({MODEL_TYPE}): n_shared_experts={shared} is not supported (needs >= 1)")
    options = dict(n_group=f["n_group"] or 1, topk_group=f["topk_group"] or 1,
                   norm_topk_prob=bool(f["norm_topk_prob"]), routed_scaling_factor=float(f["routed_scaling_factor"]))
    # aux_loss_alpha is the sequence-wise balance weight of DeepSeek's own configs; absent from
    # transformers' config, where 1e-4 (the V3 report, section 4.2) stands in.
    moe = dict(d_ff=f["moe_intermediate_size"], num_experts=f["n_routed_experts"], top_k=f["num_experts_per_tok"],
               router="sigmoid_bias", router_options=options, num_shared_experts=shared,
               aux_loss_coef=float(f.get("aux_loss_alpha", 1e-4)))
    bias = bool(f["attention_bias"])
    return DecoderConfig(**fields, attention="mla", mla=mla, attention_bias=bias, attention_out_bias=bias, moe=moe,
                         first_k_dense=min(f["first_k_dense_replace"] or 0, fields["n_layers"]))


def config_to_hf(cfg: DecoderConfig) -> dict:
    t = MODEL_TYPE
    require(t, cfg.attention == "mla", f"uses multi-head latent attention, got attention={cfg.attention!r}")
    require(t, cfg.activation == "swiglu", f"dense FFNs must use swiglu, got {cfg.activation!r}")
    require(t, cfg.clip_qkv is None, "has no clip_qkv")
    check_moe(t, cfg, ("sigmoid_bias",))
    m, o = cfg.moe, cfg.moe.router_options
    require(t, m.num_shared_experts >= 1 and not m.shared_expert_gate,
            "has ungated shared experts (n_shared_experts >= 1)")
    require(t, m.shared_width == m.d_ff * m.num_shared_experts, "shared experts are moe_intermediate_size wide each")
    require(t, cfg.moe_layers == list(range(cfg.first_k_dense, cfg.n_layers)),
            "dense layers are the first first_k_dense_replace only (no moe_interval, no dense_layers)")
    require(t, cfg.attention_bias == cfg.attention_out_bias, "one attention_bias flag covers all projections")
    a = cfg.mla
    out = decoder_to_hf(t, ARCHITECTURE, cfg)
    out.update(
        num_key_value_heads=cfg.n_heads, kv_lora_rank=a.kv_lora_rank, q_lora_rank=a.q_lora_rank,
        qk_nope_head_dim=a.qk_nope_head_dim, qk_rope_head_dim=a.qk_rope_head_dim, v_head_dim=a.v_head_dim,
        rope_interleave=a.rope_interleave, attention_bias=cfg.attention_bias, moe_intermediate_size=m.d_ff,
        n_routed_experts=m.num_experts, n_shared_experts=m.num_shared_experts, first_k_dense_replace=cfg.first_k_dense,
        n_group=o.n_group, topk_group=o.topk_group, norm_topk_prob=o.norm_topk_prob,
        routed_scaling_factor=o.routed_scaling_factor, scoring_func="sigmoid", topk_method="noaux_tc",
        aux_loss_alpha=m.aux_loss_coef, num_nextn_predict_layers=0, **router_to_hf(cfg),
    )
    out.pop("router_aux_loss_coef")
    return out


FAMILY = Family(MODEL_TYPE, ARCHITECTURE,
                "MLA, sigmoid router + e_score_correction_bias, n_group/topk_group, routed scaling, "
                "first dense layers, shared experts, YaRN",
                KEY_MAP, config_from_hf, config_to_hf,
                float32_modules=(r"blocks\.\d+\.ffn\.router",))
