"""`moekit convert --from-hf / --to-hf`: round trip bit for bit, tokenizer files and token ids
carried, errors reported as a one-line message with exit status 2."""

from __future__ import annotations

import json

import pytest
import torch
from _hf_cases import deepseek_like
from safetensors.torch import load_file

from moekit.cli import main
from moekit.hf import to_hf
from moekit.models import build_model


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def hf_folder(tmp_path):
    torch.manual_seed(0)
    model = build_model(deepseek_like())
    with torch.no_grad():
        model.blocks[1].ffn.router.expert_bias.normal_()
    model.hf_source = {"bos_token_id": 0, "eos_token_id": 1}
    folder = to_hf(model, tmp_path / "src", dtype="bfloat16", max_shard_size="3KB")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def test_round_trip_is_bit_exact(hf_folder, tmp_path, capsys):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["convert", "--from-hf", str(hf_folder), "--out", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "loaded deepseek_v3" in text and "bfloat16" in text and "tokenizer.json" in text
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["hf_source"] == {"model_type": "deepseek_v3", "dtype": "bfloat16", "bos_token_id": 0,
                                 "eos_token_id": 1}
    assert (ckpt / "tokenizer.json").is_file()

    assert main(["convert", "--to-hf", str(ckpt), "--out", str(back), "--max-shard-size", "3KB"]) == 0
    assert "wrote deepseek_v3 (DeepseekV3ForCausalLM, bfloat16)" in capsys.readouterr().out
    assert json.loads((back / "config.json").read_text()) == json.loads((hf_folder / "config.json").read_text())
    a, b = _tensors(hf_folder), _tensors(back)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert (back / "tokenizer.json").is_file() and (back / "model.safetensors.index.json").is_file()


def test_errors_are_one_line(hf_folder, tmp_path, capsys):
    victim = sorted(hf_folder.glob("model-*.safetensors"))[0]
    victim.unlink()
    assert main(["convert", "--from-hf", str(hf_folder), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moekit convert: error:") and victim.name in err
    assert main(["convert", "--to-hf", str(tmp_path / "nothing"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert f"no checkpoint at {tmp_path / 'nothing'}: it does not exist" in err and err.count("\n") == 1


def test_verify_against_transformers(hf_folder, tmp_path, capsys):
    pytest.importorskip("transformers")
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    assert main(["convert", "--from-hf", str(hf_folder), "--out", str(ckpt), "--verify"]) == 0
    assert "verify: max |logit diff| vs transformers DeepseekV3ForCausalLM" in capsys.readouterr().out
    assert main(["convert", "--to-hf", str(ckpt), "--out", str(back), "--dtype", "float32", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "float32" in out and "verify: max |logit diff|" in out
