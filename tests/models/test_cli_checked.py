"""The commands that read a model (generate, info, inspect) verify the checkpoint the same way,
say which checkpoint of a run they use, and report a broken one in one line with exit status 2."""

from __future__ import annotations

import json

import pytest
from ckpt_helpers import flip_tensor_byte, model_checkpoint, run_folder
from cli_errors import last_error_line as _error

from moekit.cli import main

GEN = ["--prompt", "ab", "--max-new-tokens", "2", "--json"]
TEXT = "def f(x):\n    return x + 1\n" * 4


def _write_manifest(folder, fields):
    from moekit.checkfiles import write_manifest

    write_manifest(folder, fields)


def _cmd(name, path, tmp_path):
    return {
        "generate": ["generate", "--checkpoint", str(path), *GEN],
        "info": ["info", "--checkpoint", str(path), "--json"],
        "inspect": ["inspect", "--checkpoint", str(path), "--text", TEXT, "--seq-len", "16",
                    "--out", str(tmp_path / "insp")],
    }[name]


COMMANDS = ["generate", "info", "inspect"]


@pytest.mark.parametrize("command", COMMANDS)
def test_flipped_bits_in_lm_head_are_refused(command, tmp_path, capsys):
    ck = model_checkpoint(tmp_path / "ck")
    flip_tensor_byte(ck / "model.safetensors", "lm_head.weight")
    assert main(_cmd(command, ck, tmp_path)) == 2
    assert f"{ck / 'model.safetensors'} does not match its sha256" in _error(capsys)
    assert not (tmp_path / "insp").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_missing_manifest_is_refused(command, tmp_path, capsys):
    ck = model_checkpoint(tmp_path / "ck")
    (ck / "manifest.json").unlink()
    assert main(_cmd(command, ck, tmp_path)) == 2
    assert f"incomplete checkpoint {ck}" in _error(capsys)


@pytest.mark.parametrize("command", COMMANDS)
def test_damaged_newest_checkpoint_is_refused_then_fallback_says_what_it_skipped(command, tmp_path, capsys):
    run = run_folder(tmp_path / "run", steps=(4, 8))
    newest, older = run / "checkpoints" / "step-00000008", run / "checkpoints" / "step-00000004"
    (newest / "config.json").unlink()
    assert main(_cmd(command, run, tmp_path)) == 2
    line = _error(capsys)
    assert str(newest / "config.json") in line and "--fallback" in line
    assert main([*_cmd(command, run, tmp_path), "--fallback"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {newest}: incomplete checkpoint: {newest / 'config.json'}" in err
    assert f"using {older}: the newest intact checkpoint" in err


@pytest.mark.parametrize("command", ["generate", "info"])
def test_run_folder_says_which_checkpoint_is_used(command, tmp_path, capsys):
    run = run_folder(tmp_path / "run", steps=(4, 8))
    assert main(_cmd(command, run, tmp_path)) == 0
    assert f"using {run / 'checkpoints' / 'step-00000008'}: the newest of 2" in capsys.readouterr().err


def test_generate_without_weights_is_an_error(tmp_path, capsys):
    ck = model_checkpoint(tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    _write_manifest(ck, {"kind": "model"})  # a consistent manifest that lacks the weights
    assert main(_cmd("generate", ck, tmp_path)) == 2
    assert f"{ck / 'model.safetensors'} is not in" in _error(capsys)
    assert main(["generate", "--preset", "tiny", *GEN]) == 0  # random weights: only from a preset


def test_generate_truncated_weights_one_line(tmp_path, capsys):
    ck = model_checkpoint(tmp_path / "ck")
    raw = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(raw[:1000])
    assert main(_cmd("generate", ck, tmp_path)) == 2
    assert f"{ck / 'model.safetensors'} has 1000 bytes" in _error(capsys)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("content", ["[1, 2, 3]", "{garbage"])
def test_bad_config_json_names_the_file(command, content, tmp_path, capsys):
    ck = model_checkpoint(tmp_path / "ck")
    (ck / "config.json").write_text(content)
    _write_manifest(ck, {"kind": "model"})
    assert main(_cmd(command, ck, tmp_path)) == 2
    assert str(ck / "config.json") in _error(capsys)


@pytest.mark.parametrize("command", ["generate", "inspect"])
@pytest.mark.parametrize("content", ["[1]", "{garbage", '{"version": "1.0"}'])
def test_bad_tokenizer_json_names_the_file(command, content, tmp_path, capsys):
    ck = model_checkpoint(tmp_path / "ck")
    (ck / "tokenizer.json").write_text(content)
    _write_manifest(ck, {"kind": "model"})
    assert main(_cmd(command, ck, tmp_path)) == 2
    assert str(ck / "tokenizer.json") in _error(capsys)


@pytest.mark.parametrize("content", ["[1]", "{garbage", '{"data": [1]}'])
def test_inspect_bad_run_config_names_the_file(content, tmp_path, capsys):
    run = run_folder(tmp_path / "run", steps=(4,))
    ck = run / "checkpoints" / "step-00000004"
    (ck / "run_config.json").write_text(content)
    manifest = json.loads((ck / "manifest.json").read_text())
    _write_manifest(ck, {k: v for k, v in manifest.items() if k not in ("files", "format_version")})
    assert main(_cmd("inspect", ck, tmp_path)) == 2
    assert str(ck / "run_config.json") in _error(capsys)


def test_info_and_generate_read_a_hugging_face_folder(tmp_path, capsys):
    from moekit.hf import to_hf
    from moekit.models import build_model, get_preset

    hf = to_hf(build_model(get_preset("tiny")), tmp_path / "hf")
    assert main(["info", "--checkpoint", str(hf), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "decoder"
    # No tokenizer files: text cannot be encoded (its ids are not bytes), ids can.
    assert main(["generate", "--checkpoint", str(hf), *GEN]) == 2
    assert "has no tokenizer" in _error(capsys)
    assert main(["generate", "--checkpoint", str(hf), "--prompt-ids", "97,98", *GEN[2:]]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    assert len(result["new_ids"]) == 2 and result["text"] is None and "no tokenizer" in result["note"]


def test_generate_cuda_without_cuda_is_one_line(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["generate", "--preset", "tiny", "--device", "cuda", *GEN]) == 2
    assert "no CUDA device is available" in _error(capsys)


def test_inspect_without_out_writes_nothing(tmp_path, capsys):
    """Plots go only where --out says: never into the checkpoint (whose manifest would no longer
    cover its folder) or any other folder the user did not name."""
    ck = model_checkpoint(tmp_path / "ck")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert main(["inspect", "--checkpoint", str(ck), "--text", TEXT, "--seq-len", "16"]) == 0
    assert "pass --out DIR" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
