"""Decoder LM: API contract, config validation, parameter counts, dense twin, training, cache."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit.layers.moe import MoE
from moekit.models import (
    DecoderConfig,
    MLAConfig,
    build_model,
    config_from_dict,
    config_to_dict,
    count_parameters,
    dense_twin,
    get_preset,
    list_presets,
    load_checkpoint,
    save_checkpoint,
)

TINY = ["tiny", "tiny-dense", "tiny-qwen2-moe", "tiny-qwen3-moe", "tiny-olmoe", "tiny-deepseek"]


def _ids(b=2, l=16, v=256, seed=0):
    return torch.randint(0, v, (b, l), generator=torch.Generator().manual_seed(seed))


def test_presets_listed():
    names = list_presets()
    for required in ["tiny", "mixtral-8x7b", "qwen2-moe-a2.7b", "olmoe-1b-7b", "deepseek-v3", "tiny-dense"]:
        assert required in names
    assert get_preset("tiny").preset == "tiny"
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("nope")


@pytest.mark.parametrize("name", TINY)
def test_forward_contract(name):
    torch.manual_seed(0)
    cfg = get_preset(name)
    model = build_model(cfg)
    ids = _ids()
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 16, cfg.vocab_size)
    assert out.aux_loss.dim() == 0
    assert [i for i, _ in out.layer_metrics] == cfg.moe_layers
    for _, metrics in out.layer_metrics:
        assert "tokens_per_expert" in metrics and not metrics["tokens_per_expert"].requires_grad
    assert torch.allclose(out.loss, out.lm_loss + out.aux_loss)
    # lm_loss is the shifted next-token cross-entropy
    ref = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.lm_loss, ref, atol=1e-6)
    if cfg.moe is not None:
        assert out.aux_loss.item() > 0 and out.aux_loss.requires_grad
    out.loss.backward()
    assert model.embed.weight.grad is not None
    assert model(ids).loss is None


def test_aux_loss_sums_layers():
    model = build_model(get_preset("tiny")).eval()
    per_layer = []
    for block in model.blocks:
        block.ffn.register_forward_hook(lambda m, i, o: per_layer.append(o.aux_loss))
    out = model(_ids())
    assert len(per_layer) == 2 and torch.allclose(out.aux_loss, sum(per_layer))


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(d_model=65, n_heads=4), "d_model"),
        (dict(n_heads=4, n_kv_heads=3), "n_kv_heads"),
        (dict(moe_interval=0, moe=dict(d_ff=8, num_experts=4)), "moe_interval"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(vocab_size=-3), "vocab_size"),
        (dict(n_layers=0), "n_layers"),
        (dict(qk_norm="layer"), "qk_norm"),
        (dict(attention="mqa"), "attention"),
        (dict(first_k_dense=5, n_layers=2), "first_k_dense"),
        (dict(dense_layers=(7,)), "dense_layers"),
        (dict(max_seq_len=0), "max_seq_len"),
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(moe=dict(d_model=32, d_ff=8, num_experts=4)), "moe.d_model"),
        (dict(moe=dict(d_ff=8, num_experts=4, router="expert_choice")), "causal"),
        (dict(head_dim=7), "head dim"),
        (dict(attention="mla", mla=dict(qk_rope_head_dim=7)), "qk_rope_head_dim"),
        (dict(tie_embeddings="yes"), "tie_embeddings"),
    ],
)
def test_bad_configs_name_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        DecoderConfig(**kwargs)


def test_sequence_longer_than_max_seq_len():
    model = build_model(dataclasses.replace(get_preset("tiny"), max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_ids(l=9))
    cache = model.new_cache()
    model(_ids(l=8), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_ids(l=1), cache=cache)


def _variants():
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, d_ff=48, max_seq_len=32)
    moe = dict(d_ff=16, num_experts=4, top_k=2)
    return {
        "dense": DecoderConfig(**base),
        "gqa-bias-tied": DecoderConfig(**base, n_kv_heads=2, attention_bias=True, attention_out_bias=True,
                                       tie_embeddings=True, moe=moe),
        "head-norm-headdim": DecoderConfig(**base, head_dim=12, qk_norm="head", moe=moe, moe_interval=2),
        "full-norm": DecoderConfig(**base, qk_norm="full", n_kv_heads=1, moe=moe, first_k_dense=1),
        "mla-no-qlora": DecoderConfig(**base, attention="mla", attention_bias=True,
                                      mla=MLAConfig(kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=8,
                                                    qk_rope_head_dim=4, v_head_dim=6), moe=moe),
        "shared-gated-bias": DecoderConfig(**base, moe=dict(moe, num_shared_experts=2, shared_expert_gate=True,
                                                            expert_bias=True), dense_layers=(1,)),
        "noisy": DecoderConfig(**base, moe=dict(moe, router="noisy_topk")),
        "dense-gate": DecoderConfig(**base, moe=dict(moe, router="dense")),
        "switch-gelu": DecoderConfig(**base, moe=dict(d_ff=16, num_experts=4, top_k=1, router="switch",
                                                      activation="gelu", capacity_factor=1.25)),
        "gshard": DecoderConfig(**base, moe=dict(moe, router="gshard")),
        "sigmoid": DecoderConfig(**base, moe=dict(moe, router="sigmoid_bias", num_shared_experts=1)),
    }


@pytest.mark.parametrize("name", list(_variants()))
def test_analytic_count_equals_real_count(name):
    cfg = _variants()[name]
    model = build_model(cfg)
    assert count_parameters(cfg) == count_parameters(model)
    total, active = count_parameters(model)
    assert total == sum(p.numel() for p in model.parameters())
    if cfg.moe is None:
        assert active == total
    else:
        assert active < total or cfg.moe.router == "dense"


@pytest.mark.parametrize("name", TINY)
def test_tiny_presets_count(name):
    cfg = get_preset(name)
    assert count_parameters(cfg) == count_parameters(build_model(cfg))


def test_published_counts_match_papers():
    # Reported in each model's paper / card: total and active parameters (billions).
    expected = {
        "mixtral-8x7b": (46.7, 12.9),
        "qwen2-moe-a2.7b": (14.3, 2.7),
        "olmoe-1b-7b": (6.9, 1.3),
        "deepseek-v3": (671, 37),
        "qwen3-moe-30b-a3b": (30.5, 3.3),
    }
    for name, (total, active) in expected.items():
        t, a = count_parameters(get_preset(name))
        assert abs(t / 1e9 - total) / total < 0.01, (name, t)
        assert abs(a / 1e9 - active) / active < 0.03, (name, a)


@pytest.mark.parametrize("name", ["tiny", "tiny-qwen2-moe", "tiny-deepseek", "small", "mixtral-8x7b", "deepseek-v3"])
@pytest.mark.parametrize("match", ["active", "total"])
def test_dense_twin_matches(name, match):
    cfg = get_preset(name)
    twin = dense_twin(cfg, match)
    assert twin.moe is None
    total, active = count_parameters(cfg)
    target = active if match == "active" else total
    t_twin, a_twin = count_parameters(twin)
    assert t_twin == a_twin
    # documented bound: within half a unit of FFN width per layer (3 * d_model / 2 for SwiGLU)
    assert abs(t_twin - target) <= cfg.n_layers * 3 * cfg.d_model / 2
    if name.startswith("tiny") or name == "small":
        assert count_parameters(build_model(twin)) == (t_twin, a_twin)


def test_config_dict_roundtrip_and_checkpoint(tmp_path):
    for name in list_presets():  # every architecture's presets, the published ones included
        cfg = get_preset(name)
        data = config_to_dict(cfg)
        assert data["arch"] in ("decoder", "encoder", "vision", "widenet", "local_experts")
        import json

        again = config_from_dict(json.loads(json.dumps(data)))
        assert again == cfg
    cfg = dataclasses.replace(get_preset("tiny"), tie_embeddings=True)
    model = build_model(cfg).eval()
    save_checkpoint(model, tmp_path / "ck", extra={"step": 3})
    loaded = load_checkpoint(tmp_path / "ck").eval()
    assert loaded.lm_head.weight is loaded.embed.weight
    ids = _ids()
    assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert config_from_dict({"preset": "tiny", "n_layers": 3}).n_layers == 3


def _train_until_half(model, ids, steps=300, lr=1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = out.lm_loss.item() if first is None else first
        if out.lm_loss.item() < first / 2:
            return first, out.lm_loss.item()
    return first, out.lm_loss.item()


@pytest.mark.parametrize("name", TINY)
def test_tiny_trains_on_repeated_batch(name):
    torch.manual_seed(0)
    model = build_model(get_preset(name))
    first, last = _train_until_half(model, _ids(b=4, l=32, seed=1))
    assert last < first / 2, (first, last)


@pytest.mark.parametrize("name", ["tiny", "tiny-deepseek", "tiny-olmoe"])
def test_cached_forward_equals_full_forward(name):
    torch.manual_seed(0)
    model = build_model(get_preset(name)).eval()
    ids = _ids(l=12)
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        parts = [model(ids[:, :5], cache=cache).logits]
        for t in range(5, 12):
            parts.append(model(ids[:, t : t + 1], cache=cache).logits)
        assert cache.length == 12
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5


def test_moe_layers_placement():
    base = dict(d_model=32, n_layers=6, n_heads=4, moe=dict(d_ff=8, num_experts=4))
    assert DecoderConfig(**base).moe_layers == [0, 1, 2, 3, 4, 5]
    assert DecoderConfig(**base, moe_interval=2).moe_layers == [1, 3, 5]
    assert DecoderConfig(**base, first_k_dense=3).moe_layers == [3, 4, 5]
    assert DecoderConfig(**base, dense_layers=(0, 4)).moe_layers == [1, 2, 3, 5]
    model = build_model(DecoderConfig(**base, moe_interval=3))
    assert [isinstance(b.ffn, MoE) for b in model.blocks] == [False, False, True, False, False, True]
