"""--set overrides: typed parsing, validation through every dataclass on the path, clear errors."""

from __future__ import annotations

import json

import pytest
from trainkit import small_run

from moekit.train.config import apply_override, apply_overrides, diff_dicts, to_dict, valid_keys


def test_override_types_and_nesting():
    cfg = apply_overrides(small_run(), [
        "optim.lr=3e-4", "schedule.steps=1e3", "logging.progress=yes", "data.max_bytes=none",
        "model.moe.top_k=1", "model.dense_layers=0", "seed=7", "name=abc",
    ])
    assert cfg.optim.lr == 3e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.schedule.steps == 1000 and isinstance(cfg.schedule.steps, int)
    assert cfg.logging.progress is True
    assert cfg.data.max_bytes is None
    assert cfg.model.moe.top_k == 1
    assert cfg.model.dense_layers == (0,)
    assert (cfg.seed, cfg.name) == (7, "abc")


def test_override_does_not_mutate_the_original():
    base = small_run()
    new = apply_override(base, "optim.lr=0.5")
    assert base.optim.lr == 3e-3 and new.optim.lr == 0.5


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ValueError, match=r"unknown key 'lrr' in optim; valid keys: lr, weight_decay"):
        apply_override(small_run(), "optim.lrr=1")
    with pytest.raises(ValueError, match=r"unknown key 'bogus' in the run config; valid keys: model, name"):
        apply_override(small_run(), "bogus=1")
    with pytest.raises(ValueError, match=r"unknown key 'nope' in model.moe"):
        apply_override(small_run(), "model.moe.nope=1")


def test_bad_values_name_the_field():
    with pytest.raises(ValueError, match="expected an integer"):
        apply_override(small_run(), "schedule.steps=1.5")
    with pytest.raises(ValueError, match=r"optim.lr must be in"):
        apply_override(small_run(), "optim.lr=-1")
    with pytest.raises(ValueError, match=r"data.tokenizer must be one of \['byte', 'bpe'\]"):
        apply_override(small_run(), "data.tokenizer=wordpiece")
    with pytest.raises(ValueError, match="schedule.warmup_steps"):
        apply_override(small_run(), "schedule.warmup_steps=100")
    with pytest.raises(ValueError, match="is a section"):
        apply_override(small_run(), "optim=1")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_override(small_run(), "optim.lr")
    # The model's own validation runs again on the rebuilt config.
    with pytest.raises(ValueError, match="MoEConfig.top_k"):
        apply_override(small_run(), "model.moe.top_k=9")


def test_changing_router_resets_its_options():
    cfg = apply_overrides(small_run(), ["model.moe.router=sigmoid_bias", "model.moe.router_options.bias_update=manual"])
    assert cfg.model.moe.router == "sigmoid_bias"
    assert cfg.model.moe.router_options.bias_update == "manual"


def test_model_can_be_made_dense():
    cfg = apply_override(small_run(), "model.moe=none")
    assert cfg.model.moe is None


def test_serialisation_and_keys():
    cfg = small_run()
    d = to_dict(cfg)
    json.dumps(d)  # plain JSON
    assert d["optim"]["lr"] == 3e-3 and d["model"]["moe"]["num_experts"] == 4
    keys = valid_keys(cfg)
    assert "optim.lr" in keys and "model.moe.top_k" in keys and "parallel.ep" in keys
    assert diff_dicts(d, to_dict(apply_override(cfg, "optim.lr=1e-3"))) == ["optim.lr"]


def test_compare_variants_share_everything_but_the_ffn_and_dense_lr():
    from moekit.models import count_parameters
    from moekit.train.compare import plan_workers, variant_configs

    cfg = apply_overrides(small_run(), ["compare.dense_lr=5e-3"])
    variants = dict(variant_configs(cfg))
    assert variants["moe"].optim.lr == 3e-3
    assert variants["dense-active"].optim.lr == variants["dense-total"].optim.lr == 5e-3
    for name in ("dense-active", "dense-total"):
        v = variants[name]
        assert v.model.moe is None and v.data == cfg.data and v.schedule == cfg.schedule and v.seed == cfg.seed
    total, active = count_parameters(cfg.model)
    assert count_parameters(variants["dense-active"].model)[0] == pytest.approx(active, rel=0.02)
    assert count_parameters(variants["dense-total"].model)[0] == pytest.approx(total, rel=0.02)
    # Two workers: the costliest run (dense-total) alone, the MoE and dense-active together.
    groups = plan_workers(list(variants.items()), 2)
    assert sorted([n for n, _ in g] for g in groups) == [["dense-total"], ["moe", "dense-active"]]
    with pytest.raises(ValueError, match=r"compare.dense_lr must be in"):
        apply_override(small_run(), "compare.dense_lr=0")
