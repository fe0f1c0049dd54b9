"""config.json translation: the published configs of the released models give their published
sizes, and config -> config.json -> config is the identity for every family. No weights, no
transformers: parameter counts are analytic."""

from __future__ import annotations

import pytest

from moekit.hf import FAMILIES, config_from_hf, config_to_hf
from moekit.models import count_parameters

# config.json of the released checkpoints (fields that matter; the Hub files carry more), and
# the sizes their model cards / papers state, in billions: (total, active per token).
HUB = {
    "Mixtral-8x7B-v0.1": ((46.7, 12.9), {
        "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2,
        "sliding_window": None, "tie_word_embeddings": False, "router_aux_loss_coef": 0.02}),
    "Qwen1.5-MoE-A2.7B": ((14.3, 2.7), {
        "model_type": "qwen2_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
        "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632, "num_experts": 60,
        "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "decoder_sparse_step": 1, "norm_topk_prob": False, "max_position_embeddings": 8192, "rope_theta": 1e6,
        "tie_word_embeddings": False, "use_sliding_window": False, "sliding_window": 32768}),
    "Qwen3-30B-A3B": ((30.5, 3.3), {
        "model_type": "qwen3_moe", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "norm_topk_prob": True,
        "max_position_embeddings": 40960, "rope_theta": 1e6, "tie_word_embeddings": False,
        "use_sliding_window": False, "sliding_window": None, "mlp_only_layers": [], "decoder_sparse_step": 1}),
    "OLMoE-1B-7B-0924": ((6.9, 1.3), {
        "model_type": "olmoe", "vocab_size": 50304, "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
        "num_experts_per_tok": 8, "max_position_embeddings": 4096, "rope_theta": 10000.0, "clip_qkv": None,
        "norm_topk_prob": False, "tie_word_embeddings": False, "rms_norm_eps": 1e-5}),
    "DeepSeek-V3 (bf16, without its MTP layer)": ((671, 37), {
        "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
        "num_attention_heads": 128, "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "topk_method": "noaux_tc", "n_group": 8, "topk_group": 4,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "norm_topk_prob": True, "scoring_func": "sigmoid",
        "aux_loss_alpha": 0.001, "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 4096, "type": "yarn"},
        "tie_word_embeddings": False, "attention_bias": False}),
    "Llama-3.1-8B": ((8.03, 8.03), {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}),
}


@pytest.mark.parametrize("name", list(HUB))
def test_published_configs_give_published_sizes(name):
    (total_b, active_b), hf = HUB[name]
    cfg = config_from_hf(hf)
    total, active = count_parameters(cfg)
    assert total / 1e9 == pytest.approx(total_b, rel=0.01)
    assert active / 1e9 == pytest.approx(active_b, rel=0.02)
    # config.json -> config -> config.json -> config is stable, in the same family
    again = config_to_hf(cfg)
    assert again["model_type"] == hf["model_type"]
    assert config_from_hf(again) == cfg


def test_deepseek_v3_config_reads_everything():
    cfg = config_from_hf(HUB["DeepSeek-V3 (bf16, without its MTP layer)"][1])
    m, o = cfg.moe, cfg.moe.router_options
    assert (cfg.attention, cfg.first_k_dense, cfg.max_seq_len) == ("mla", 3, 163840)
    assert (m.router, m.num_experts, m.top_k, m.num_shared_experts, m.d_ff) == ("sigmoid_bias", 256, 8, 1, 2048)
    assert (o.n_group, o.topk_group, o.routed_scaling_factor, o.norm_topk_prob) == (8, 4, 2.5, True)
    assert cfg.rope_scaling["type"] == "yarn" and cfg.rope_scaling["factor"] == 40.0
    assert m.aux_loss_coef == 0.001


@pytest.mark.parametrize("model_type", sorted(t for t in FAMILIES if FAMILIES[t].architecture.endswith("CausalLM")))
def test_defaults_fill_a_minimal_config(model_type):
    """A config.json that leaves fields out means transformers' defaults for them."""
    cfg = config_from_hf({"model_type": model_type, "num_hidden_layers": 2})
    assert cfg.n_layers == 2 and cfg.vocab_size > 1000


@pytest.mark.parametrize("model_type, change, message", [
    ("llama", {"mlp_bias": True}, "mlp_bias=True is not supported"),
    ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ("deepseek_v3", {"scoring_func": "softmax"}, "scoring_func='softmax' is not supported"),
    ("deepseek_v3", {"topk_method": "greedy"}, "topk_method='greedy' is not supported"),
    ("deepseek_v3", {"n_shared_experts": 0}, "n_shared_experts=0 is not supported"),
    ("mixtral", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ("qwen3_moe", {"rope_scaling": {"type": "longrope", "factor": 2.0}}, "type 'longrope' is not supported"),
])
def test_unsupported_config_fields_are_named(model_type, change, message):
    with pytest.raises(ValueError, match=message):
        config_from_hf({"model_type": model_type, "num_hidden_layers": 2, **change})
