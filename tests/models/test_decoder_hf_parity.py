"""Logit parity of the decoder against `transformers` on tiny random models of each family.

The key map here is deliberately local and minimal: it proves the decoder's numerics (norm
order, rotary layout, QK-norm modes, MLA, shared-expert gate, routers); the production adapters
live in moekit.hf.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.models import DecoderConfig, MLAConfig, build_model  # noqa: E402

V, D, L = 128, 64, 2


def _perturb(model, seed):
    # HF initialises norms to 1 and biases to 0; random values make every term of the math count.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(1.0 + 0.2 * noise if "norm" in name else 0.1 * noise)
            else:
                p.copy_(0.08 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name:
                b.copy_(0.05 * torch.randn(b.shape, generator=g))


def _convert(hf_sd: dict, moe_layers: set[int]) -> dict:
    out = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in hf_sd.items():
        k = key.removeprefix("model.")
        k = k.replace("embed_tokens.", "embed.").replace("layers.", "blocks.")
        k = k.replace(".input_layernorm.", ".attn_norm.").replace(".post_attention_layernorm.", ".ffn_norm.")
        k = k.replace(".self_attn.", ".attn.")
        k = k.replace("q_a_layernorm", "q_a_norm").replace("kv_a_layernorm", "kv_a_norm")
        k = k.replace("kv_a_proj_with_mqa", "kv_a_proj")
        k = k.replace(".mlp.experts.gate_up_proj", ".ffn.experts.w_in")
        k = k.replace(".mlp.experts.down_proj", ".ffn.experts.w_out")
        k = k.replace(".mlp.gate.weight", ".ffn.router.weight")
        k = k.replace(".mlp.gate.e_score_correction_bias", ".ffn.router.expert_bias")
        k = k.replace(".mlp.shared_expert_gate.", ".ffn.shared_expert.gate.")
        for shared in (".mlp.shared_expert.", ".mlp.shared_experts."):
            if shared in k:
                prefix, proj = k.split(shared)
                pending.setdefault(prefix, {})[proj.split(".")[0]] = value
                k = None
                break
        if k is None:
            continue
        k = k.replace(".mlp.", ".ffn.")
        out[k] = value
    for prefix, parts in pending.items():
        out[f"{prefix}.ffn.shared_expert.ffn.w_in"] = torch.cat((parts["gate_proj"], parts["up_proj"]), 0)[None]
        out[f"{prefix}.ffn.shared_expert.ffn.w_out"] = parts["down_proj"][None]
    return out


def _cases():
    T = transformers
    common = dict(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4, max_position_embeddings=64)
    return {
        "mixtral": (
            T.MixtralConfig(**common, num_key_value_heads=2, intermediate_size=32, num_local_experts=8,
                            num_experts_per_tok=2, rope_theta=1e6, rms_norm_eps=1e-5),
            T.MixtralForCausalLM,
            DecoderConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=4, n_kv_heads=2, rope_theta=1e6, norm_eps=1e-5,
                          max_seq_len=64, moe=dict(d_ff=32, num_experts=8, top_k=2)),
        ),
        "qwen2_moe": (
            T.Qwen2MoeConfig(**common, num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=32,
                             shared_expert_intermediate_size=40, num_experts=8, num_experts_per_tok=3,
                             norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0], rms_norm_eps=1e-6),
            T.Qwen2MoeForCausalLM,
            DecoderConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=4, n_kv_heads=2, d_ff=48, attention_bias=True,
                          max_seq_len=64, dense_layers=(0,),
                          moe=dict(d_ff=32, num_experts=8, top_k=3, num_shared_experts=1, shared_d_ff=40,
                                   shared_expert_gate=True, router_options={"norm_topk_prob": False})),
        ),
        "qwen3_moe": (
            T.Qwen3MoeConfig(**common, num_key_value_heads=2, head_dim=24, intermediate_size=48,
                             moe_intermediate_size=32,
                             num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, rms_norm_eps=1e-6),
            T.Qwen3MoeForCausalLM,
            DecoderConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=4, n_kv_heads=2, head_dim=24, qk_norm="head",
                          max_seq_len=64, moe=dict(d_ff=32, num_experts=8, top_k=2)),
        ),
        "olmoe": (
            T.OlmoeConfig(**common, num_key_value_heads=4, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                          norm_topk_prob=False, rms_norm_eps=1e-5, clip_qkv=0.4),
            T.OlmoeForCausalLM,
            DecoderConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=4, qk_norm="full", norm_eps=1e-5, clip_qkv=0.4,
                          max_seq_len=64,
                          moe=dict(d_ff=32, num_experts=8, top_k=2, router_options={"norm_topk_prob": False})),
        ),
        "deepseek_v3": (
            T.DeepseekV3Config(**common, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=32,
                               n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                               first_k_dense_replace=1, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                               qk_rope_head_dim=8, v_head_dim=16, routed_scaling_factor=2.5, rms_norm_eps=1e-6),
            T.DeepseekV3ForCausalLM,
            DecoderConfig(vocab_size=V, d_model=D, n_layers=L, n_heads=4, d_ff=48, max_seq_len=64, first_k_dense=1,
                          attention="mla", mla=MLAConfig(kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16,
                                                         qk_rope_head_dim=8, v_head_dim=16),
                          moe=dict(d_ff=32, num_experts=8, top_k=2, num_shared_experts=1, router="sigmoid_bias",
                                   router_options={"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5})),
        ),
    }


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"])
def test_logits_match_transformers(family):
    hf_cfg, hf_cls, ours_cfg = _cases()[family]
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = hf_cls(hf_cfg).eval()
    _perturb(hf, seed=1)
    ours = build_model(ours_cfg).eval()
    ours.load_state_dict(_convert(hf.state_dict(), set(ours_cfg.moe_layers)), strict=True)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on the second row
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids).logits
        assert (got - ref).abs().max().item() < 1e-4, family
        # Left-padded row: same mask and positions as transformers' generate uses.
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        ref_pad = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got_pad = ours(ids, attention_mask=mask, position_ids=pos).logits
        real = mask.bool()
        assert (got_pad[real] - ref_pad[real]).abs().max().item() < 1e-4, family
