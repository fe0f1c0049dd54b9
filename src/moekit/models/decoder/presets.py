"""Decoder presets: tiny ones for tests and CPU training, and the published shapes.

The published ones are configs only; `moekit info --preset NAME` counts their parameters
without building them. Sources are each model's released `config.json`. Not reproduced:
sliding-window attention and DeepSeek-V3's multi-token-prediction module.
"""

from __future__ import annotations

from moekit.layers.config import MoEConfig
from moekit.models.decoder.model import DecoderConfig, MLAConfig
from moekit.models.registry import register_preset

# ---------------------------------------------------------------------------------------------
# Small: for tests, examples and CPU training (vocab 256 = bytes)


@register_preset("tiny", "decoder")
def tiny() -> DecoderConfig:
    """2-layer MoE LM, d_model 64, 8 experts top-2 (Mixtral-style), byte vocabulary."""
    return DecoderConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256,
        moe=dict(d_ff=64, num_experts=8, top_k=2, router="softmax_topk"),
    )


@register_preset("tiny-dense", "decoder")
def tiny_dense() -> DecoderConfig:
    """2-layer dense LM with the attention of `tiny`."""
    return DecoderConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=256)


@register_preset("tiny-qwen2-moe", "decoder")
def tiny_qwen2_moe() -> DecoderConfig:
    """Qwen2-MoE features: q/k/v bias, gated shared expert, no top-k renormalisation, MoE every 2nd layer."""
    return DecoderConfig(
        vocab_size=256, d_model=64, n_layers=4, n_heads=4, d_ff=128, max_seq_len=256, attention_bias=True,
        rope_theta=1e6, moe_interval=2,
        moe=dict(d_ff=32, num_experts=8, top_k=4, num_shared_experts=1, shared_d_ff=64, shared_expert_gate=True,
                 router_options={"norm_topk_prob": False}, aux_loss_coef=0.001),
    )


@register_preset("tiny-qwen3-moe", "decoder")
def tiny_qwen3_moe() -> DecoderConfig:
    """Qwen3-MoE features: per-head QK-norm, head_dim independent of d_model / n_heads, GQA."""
    return DecoderConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=128,
        max_seq_len=256, qk_norm="head", rope_theta=1e6,
        moe=dict(d_ff=32, num_experts=8, top_k=2, aux_loss_coef=0.001),
    )


@register_preset("tiny-olmoe", "decoder")
def tiny_olmoe() -> DecoderConfig:
    """OLMoE features: QK-norm over the full projections, z-loss, no top-k renormalisation."""
    return DecoderConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=256, qk_norm="full",
        norm_eps=1e-5,
        moe=dict(d_ff=32, num_experts=8, top_k=2, router_options={"norm_topk_prob": False}, z_loss_coef=1e-3),
    )


@register_preset("tiny-deepseek", "decoder")
def tiny_deepseek() -> DecoderConfig:
    """DeepSeek-V3 features: MLA, first layer dense, shared expert, sigmoid router with bias balancing."""
    return DecoderConfig(
        vocab_size=256, d_model=64, n_layers=3, n_heads=4, d_ff=128, max_seq_len=256, first_k_dense=1,
        attention="mla",
        mla=MLAConfig(kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
        moe=dict(d_ff=32, num_experts=8, top_k=2, num_shared_experts=1, router="sigmoid_bias",
                 router_options={"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}, aux_loss_coef=1e-4),
    )


@register_preset("small", "decoder")
def small() -> DecoderConfig:
    """~10M-parameter byte-level MoE LM for CPU training runs: 4 layers, d_model 256, 8 experts top-2."""
    return DecoderConfig(
        vocab_size=256, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=512,
        moe=dict(d_ff=352, num_experts=8, top_k=2),
    )


@register_preset("small-dense", "decoder")
def small_dense() -> DecoderConfig:
    """The dense twin of `small` matched on active parameters."""
    from moekit.models.decoder.params import decoder_dense_twin

    return decoder_dense_twin(small(), "active")


# ---------------------------------------------------------------------------------------------
# Published shapes


@register_preset("mixtral-8x7b", "decoder")
def mixtral_8x7b() -> DecoderConfig:
    """Mixtral 8x7B (Jiang et al. 2024): 32 layers, 8 experts top-2, GQA 32/8; 46.7B total, 12.9B active."""
    return DecoderConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, max_seq_len=32768,
        rope_theta=1e6, norm_eps=1e-5,
        moe=MoEConfig(d_model=4096, d_ff=14336, num_experts=8, top_k=2, aux_loss_coef=0.02, causal=True),
    )


@register_preset("mistral-7b", "decoder")
def mistral_7b() -> DecoderConfig:
    """Mistral 7B v0.1 shapes (dense): the model Mixtral's experts share their attention shape with."""
    return DecoderConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, max_seq_len=32768,
        rope_theta=1e4, norm_eps=1e-5,
    )


@register_preset("qwen2-moe-a2.7b", "decoder")
def qwen2_moe_a27b() -> DecoderConfig:
    """Qwen1.5-MoE-A2.7B: 60 experts top-4 + gated shared expert, q/k/v bias; 14.3B total, 2.7B active."""
    return DecoderConfig(
        vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, d_ff=5632, max_seq_len=8192, rope_theta=1e6,
        norm_eps=1e-6, attention_bias=True,
        moe=dict(d_ff=1408, num_experts=60, top_k=4, num_shared_experts=1, shared_d_ff=5632, shared_expert_gate=True,
                 router_options={"norm_topk_prob": False}, aux_loss_coef=0.001),
    )


@register_preset("qwen3-moe-30b-a3b", "decoder")
def qwen3_moe_30b_a3b() -> DecoderConfig:
    """Qwen3-30B-A3B: 48 layers, 128 experts top-8, GQA 32/4 with head_dim 128, per-head QK-norm."""
    return DecoderConfig(
        vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144,
        max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm="head",
        moe=dict(d_ff=768, num_experts=128, top_k=8, aux_loss_coef=0.001),
    )


@register_preset("olmoe-1b-7b", "decoder")
def olmoe_1b_7b() -> DecoderConfig:
    """OLMoE-1B-7B (Muennighoff et al. 2024): 64 experts top-8, full QK-norm; 6.9B total, 1.3B active."""
    return DecoderConfig(
        vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, d_ff=1024, max_seq_len=4096, rope_theta=1e4,
        norm_eps=1e-5, qk_norm="full",
        moe=dict(d_ff=1024, num_experts=64, top_k=8, router_options={"norm_topk_prob": False},
                 aux_loss_coef=0.01, z_loss_coef=0.001),
    )


@register_preset("deepseek-v3", "decoder")
def deepseek_v3() -> DecoderConfig:
    """DeepSeek-V3 (arXiv 2412.19437): MLA, 3 dense layers, 256 routed + 1 shared expert, top-8 in
    4 of 8 groups; 671B total, 37B active (without the MTP module)."""
    return DecoderConfig(
        vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, d_ff=18432, max_seq_len=163840, rope_theta=1e4,
        rope_scaling={"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
        norm_eps=1e-6, attention="mla",
        mla=MLAConfig(kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
        first_k_dense=3,
        moe=dict(d_ff=2048, num_experts=256, top_k=8, num_shared_experts=1, router="sigmoid_bias",
                 router_options={"n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5},
                 aux_loss_coef=1e-4),
    )
