"""`moekit info` and `moekit generate`."""

from __future__ import annotations

import json

import torch

from moekit.cli import main
from moekit.models import build_model, count_parameters, get_preset, save_checkpoint


def test_info_big_preset_is_analytic(capsys):
    assert main(["info", "--preset", "deepseek-v3", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    total, active = count_parameters(get_preset("deepseek-v3"))
    assert info["total_params"] == total and info["active_params_per_token"] == active
    assert info["layout"]["layers"] == "61: 0-2 dense, 3-60 MoE"
    assert abs(info["dense_twin_active"]["params"] - active) / active < 1e-3


def test_info_table_and_list(capsys):
    assert main(["info", "--preset", "tiny"]) == 0
    out = capsys.readouterr().out
    total, active = count_parameters(build_model(get_preset("tiny")))
    assert f"{total:,}" in out and f"{active:,}" in out
    assert main(["info", "--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {"tiny", "mixtral-8x7b", "olmoe-1b-7b"} <= {r["preset"] for r in rows}
    assert main(["info", "--preset", "no-such"]) == 2


def test_generate_preset_and_checkpoint(tmp_path, capsys):
    args = ["--prompt", "def f(", "--prompt", "ab", "--max-new-tokens", "6", "--json"]
    assert main(["generate", "--preset", "tiny", "--seed", "3", *args]) == 0
    from_preset = json.loads(capsys.readouterr().out)
    assert [r["prompt_ids"] for r in from_preset] == [list(b"def f("), list(b"ab")]
    assert all(len(r["new_ids"]) == 6 for r in from_preset)

    torch.manual_seed(3)
    model = build_model(get_preset("tiny"))
    step = tmp_path / "run" / "checkpoints" / "step-00000007"
    save_checkpoint(model, step)
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), *args]) == 0
    from_ckpt = json.loads(capsys.readouterr().out)
    expect = model.generate([list(b"def f("), list(b"ab")], max_new_tokens=6)
    assert [r["new_ids"] for r in from_ckpt] == expect[:, 6:].tolist()
    # the seeded preset builds the same weights, so the same tokens
    assert from_preset == from_ckpt
    assert main(["info", "--checkpoint", str(step), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total_params"] == count_parameters(model)[0]


def test_generate_errors(tmp_path, capsys):
    assert main(["generate", "--preset", "tiny", "--prompt-ids", "1,2,300"]) == 2
    assert "vocab" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path)]) == 2
    assert main(["generate", "--preset", "deepseek-v3", "--prompt", "x"]) == 2
    assert "GiB" in capsys.readouterr().err
