"""Tiny Hugging Face models of every supported family, built locally with random weights.

Sizes are deliberately odd (hidden 40, vocab 97, 5-8 experts, head_dim 14, MLA ranks 20/24) so a
transposed or mis-split tensor cannot hide behind a square shape; attention is grouped-query
wherever the family allows it, and rope scaling is on where the family's checkpoints use it.
"""

from __future__ import annotations

import torch

from moekit.models import DecoderConfig, MLAConfig

V, D, L_MAX = 97, 40, 64


def _common(common: dict, **kw):
    out = dict(vocab_size=V, hidden_size=D, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=L_MAX,
               pad_token_id=0, bos_token_id=1, eos_token_id=2)
    out.update(kw)
    out.update(common)
    return out


def build(name: str, **common):
    """(transformers model in eval mode with perturbed random weights, its family's model_type).
    `common`: config fields to set in every family (vocab_size, eos_token_id, ...)."""
    import transformers as T

    if name == "mixtral":
        cfg = T.MixtralConfig(**_common(common, num_key_value_heads=2, intermediate_size=36, num_local_experts=5,
                                        num_experts_per_tok=2, rms_norm_eps=1e-5,
                                        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}))
        cls, model_type = T.MixtralForCausalLM, "mixtral"
    elif name in ("qwen2_moe", "qwen2_moe_step2"):
        step2 = name == "qwen2_moe_step2"
        cfg = T.Qwen2MoeConfig(**_common(common, num_hidden_layers=4 if step2 else 3, num_key_value_heads=2,
                                         intermediate_size=44, moe_intermediate_size=20,
                                         shared_expert_intermediate_size=28, num_experts=6, num_experts_per_tok=3,
                                         norm_topk_prob=step2, decoder_sparse_step=2 if step2 else 1,
                                         mlp_only_layers=[3] if step2 else [1], tie_word_embeddings=step2))
        cls, model_type = T.Qwen2MoeForCausalLM, "qwen2_moe"
    elif name == "qwen3_moe":
        cfg = T.Qwen3MoeConfig(**_common(common, num_key_value_heads=2, head_dim=14, intermediate_size=44,
                                         moe_intermediate_size=20, num_experts=6, num_experts_per_tok=2,
                                         norm_topk_prob=True, mlp_only_layers=[0], tie_word_embeddings=True))
        cls, model_type = T.Qwen3MoeForCausalLM, "qwen3_moe"
    elif name == "olmoe":
        cfg = T.OlmoeConfig(**_common(common, num_key_value_heads=2, intermediate_size=20, num_experts=6,
                                      num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=0.6))
        cls, model_type = T.OlmoeForCausalLM, "olmoe"
    elif name in ("deepseek_v3", "deepseek_v3_noqlora"):
        plain = name == "deepseek_v3_noqlora"
        rope = ({"rope_type": "default", "rope_theta": 10000.0} if plain else
                {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
                 "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0})
        cfg = T.DeepseekV3Config(**_common(common, num_attention_heads=3, num_key_value_heads=3, intermediate_size=44,
                                           moe_intermediate_size=18, n_shared_experts=1 if plain else 2,
                                           n_routed_experts=8, num_experts_per_tok=3, n_group=1 if plain else 4,
                                           topk_group=1 if plain else 2, first_k_dense_replace=1,
                                           q_lora_rank=None if plain else 20, kv_lora_rank=24, qk_nope_head_dim=12,
                                           qk_rope_head_dim=6, v_head_dim=10, routed_scaling_factor=2.5,
                                           rope_parameters=rope, num_nextn_predict_layers=0,
                                           attention_bias=plain))
        cls, model_type = T.DeepseekV3ForCausalLM, "deepseek_v3"
    elif name == "llama":
        cfg = T.LlamaConfig(**_common(common, num_key_value_heads=2, intermediate_size=44, attention_bias=True,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 4.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 16}))
        cls, model_type = T.LlamaForCausalLM, "llama"
    elif name == "qwen2":
        cfg = T.Qwen2Config(**_common(common, num_key_value_heads=2, intermediate_size=44, tie_word_embeddings=True,
                                      rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                                       "original_max_position_embeddings": 32}))
        cls, model_type = T.Qwen2ForCausalLM, "qwen2"
    else:
        raise KeyError(name)
    cfg._attn_implementation = "eager"
    # transformers 5 defaults to torch grouped_mm experts, which reject widths that are not a
    # multiple of 16 bytes (our odd sizes); its eager experts are the reference loop.
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    model = cls(cfg).eval()
    perturb(model, seed=1)
    return model, model_type


def perturb(model, seed: int) -> None:
    """transformers initialises norms to 1 and biases (and DeepSeek's routing bias) to 0; random
    values make every term of the math count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                scale = 0.2 if "norm" in name else 0.1
                p.copy_((1.0 if "norm" in name else 0.0) + scale * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


ARCHS = ["mixtral", "qwen2_moe", "qwen2_moe_step2", "qwen3_moe", "olmoe", "deepseek_v3", "deepseek_v3_noqlora",
         "llama", "qwen2"]


# Small moekit configs for tests that write their checkpoints with to_hf (no transformers needed).


def qwen2_moe_like() -> DecoderConfig:
    return DecoderConfig(vocab_size=61, d_model=24, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=20, attention_bias=True,
                         max_seq_len=32, dense_layers=(1,),
                         moe=dict(d_ff=10, num_experts=4, top_k=2, num_shared_experts=1, shared_d_ff=12,
                                  shared_expert_gate=True, router_options={"norm_topk_prob": False}))


def deepseek_like() -> DecoderConfig:
    return DecoderConfig(vocab_size=61, d_model=24, n_layers=2, n_heads=2, d_ff=20, max_seq_len=32, first_k_dense=1,
                         attention="mla", mla=MLAConfig(kv_lora_rank=8, q_lora_rank=12, qk_nope_head_dim=6,
                                                        qk_rope_head_dim=4, v_head_dim=6),
                         moe=dict(d_ff=10, num_experts=4, top_k=2, router="sigmoid_bias", num_shared_experts=1,
                                  router_options=dict(n_group=2, topk_group=1, routed_scaling_factor=2.5)))
