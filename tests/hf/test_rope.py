"""models/rope.py: rope scaling frequencies equal transformers' bit for bit, validation names
the field and the supported types, and the default path is the plain RoPE table."""

from __future__ import annotations

import pytest
import torch

from moekit.models import DecoderConfig, MLAConfig, build_model
from moekit.models.rope import (
    ROPE_SCALING_TYPES,
    attention_factor,
    check_rope_scaling,
    inv_freq,
    mla_softmax_multiplier,
    rope_cos_sin,
)

CASES = [
    {"rope_type": "linear", "factor": 3.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707,
     "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
     "mscale": 1.0, "mscale_all_dim": 1.0},  # DeepSeek-V3's released values
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 32, "truncate": False,
     "attention_factor": 1.3},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},  # Llama 3.1's released values
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c["rope_type"])
@pytest.mark.parametrize("dim", [16, 64])
def test_frequencies_match_transformers(case, dim):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=dim * 4, num_attention_heads=4, max_position_embeddings=65536,
                                   rope_parameters={**case, "rope_theta": 10000.0})
    ref, ref_factor = ROPE_INIT_FUNCTIONS[case["rope_type"]](cfg, "cpu")
    ours = check_rope_scaling("test", case)
    assert torch.equal(inv_freq(dim, 10000.0, ours), ref)
    assert attention_factor(ours) == ref_factor


def test_mla_softmax_multiplier_matches_transformers():
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import yarn_apply_mscale

    for case in CASES:
        want = yarn_apply_mscale({**case, "rope_theta": 10000.0}, 1.0)
        assert mla_softmax_multiplier(check_rope_scaling("t", case)) == want


def test_default_is_plain_rope():
    pos = torch.arange(7)[None].expand(2, 7)
    cos, sin = rope_cos_sin(pos, 8, 10000.0, torch.float32, None)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
    ang = pos.float()[..., None] * inv
    assert torch.equal(cos, torch.cat((ang, ang), -1).cos()) and torch.equal(sin, torch.cat((ang, ang), -1).sin())
    assert check_rope_scaling("x", None) is None and check_rope_scaling("x", {"type": "default"}) is None


def test_yarn_scales_cos_sin_by_the_attention_factor():
    s = check_rope_scaling("x", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16})
    pos = torch.arange(5)[None]
    cos, sin = rope_cos_sin(pos, 8, 10000.0, torch.float32, s)
    # position 0: cos = 1 * factor, sin = 0; YaRN section 3.4: 0.1 ln(4) + 1
    assert torch.allclose(cos[0, 0], torch.full((8,), 0.1 * torch.log(torch.tensor(4.0)).item() + 1.0))


@pytest.mark.parametrize("bad, message", [
    ({"type": "dynamic", "factor": 2.0}, r"type 'dynamic' is not supported \(sequence-length dependent"),
    ({"type": "longrope", "factor": 2.0}, "supported: \\['linear', 'yarn', 'llama3'\\]"),
    ({"type": "linear"}, r"DecoderConfig.rope_scaling\['factor'\] is required"),
    ({"type": "linear", "factor": 2.0, "beta_fast": 3}, r"unknown key\(s\) \['beta_fast'\] for type 'linear'"),
    ({"type": "yarn", "factor": 2.0}, "original_max_position_embeddings'\\] is required"),
    ({"type": "yarn", "factor": -2.0, "original_max_position_embeddings": 8}, r"\['factor'\] must be > 0"),
    ({"type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
      "original_max_position_embeddings": 8}, "high_freq_factor .* must be > low_freq_factor"),
    ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, "give one"),
    ({"factor": 2.0}, "needs a 'type'"),
    ("yarn", "must be None or a dict"),
])
def test_decoder_config_validates_rope_scaling(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        DecoderConfig(rope_scaling=bad)


def test_decoder_uses_scaling():
    base = dict(vocab_size=50, d_model=32, n_layers=1, n_heads=2, max_seq_len=64)
    torch.manual_seed(0)
    plain = build_model(DecoderConfig(**base))
    scaled = build_model(DecoderConfig(**base, rope_scaling={"type": "linear", "factor": 4.0}))
    scaled.load_state_dict(plain.state_dict())
    ids = torch.randint(0, 50, (1, 20))
    assert not torch.allclose(plain(ids).logits, scaled(ids).logits)
    # linear scaling by 4 at positions 4p equals plain RoPE at positions p
    pos = torch.arange(5)[None] * 4
    assert torch.allclose(scaled(ids[:, :5], position_ids=pos).logits, plain(ids[:, :5]).logits, atol=1e-5)
    assert ROPE_SCALING_TYPES == ("linear", "yarn", "llama3")


def test_mla_softmax_scale_under_yarn():
    mla = MLAConfig(kv_lora_rank=8, q_lora_rank=None, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=6)
    yarn = {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 16, "mscale": 1.0,
            "mscale_all_dim": 1.0}
    m = build_model(DecoderConfig(vocab_size=50, d_model=24, n_heads=2, n_layers=1, attention="mla", mla=mla,
                                  rope_scaling=yarn))
    mscale = 0.1 * torch.log(torch.tensor(40.0)).item() + 1.0
    assert m.blocks[0].attn.scale == pytest.approx(10**-0.5 * mscale**2)
