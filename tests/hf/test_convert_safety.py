"""`moekit convert` never destroys anything: not its source (nor a folder inside or around it),
not an existing checkpoint or a non-empty folder without --overwrite, and it writes atomically
(a failure leaves --out as it was and no temporary folder behind)."""

from __future__ import annotations

import os

import pytest
import torch
from _hf_cases import qwen2_moe_like

from moekit.cli import main
from moekit.hf import to_hf
from moekit.models import build_model, save_model_checkpoint


def _snapshot(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _model(seed=0):
    torch.manual_seed(seed)
    return build_model(qwen2_moe_like())


@pytest.fixture
def hf(tmp_path):
    folder = to_hf(_model(), tmp_path / "hf", max_shard_size="3KB")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


@pytest.fixture
def ckpt(tmp_path):
    return save_model_checkpoint(_model(1), tmp_path / "ck")


def _refused(capsys, *words):
    err = capsys.readouterr().err
    assert err.startswith("moekit convert: error:") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)


def test_from_hf_into_its_source_is_refused(hf, capsys):
    before = _snapshot(hf)
    for extra in ([], ["--overwrite"]):
        assert main(["convert", "--from-hf", str(hf), "--out", str(hf), *extra]) == 2
        _refused(capsys, f"--out {hf} is the source")
    assert _snapshot(hf) == before


def test_to_hf_into_its_source_is_refused(ckpt, capsys):
    before = _snapshot(ckpt)
    for extra in ([], ["--overwrite"]):
        assert main(["convert", "--to-hf", str(ckpt), "--out", str(ckpt), *extra]) == 2
        _refused(capsys, f"--out {ckpt} is the source")
    assert _snapshot(ckpt) == before


def test_folders_inside_or_around_the_source_are_refused(hf, tmp_path, capsys):
    before = _snapshot(tmp_path)
    assert main(["convert", "--from-hf", str(hf), "--out", str(hf / "moekit")]) == 2
    _refused(capsys, "is inside the source")
    assert main(["convert", "--from-hf", str(hf), "--out", str(tmp_path), "--overwrite"]) == 2
    _refused(capsys, "contains the source")
    os.symlink(hf, tmp_path / "link")  # the same folder under another name
    assert main(["convert", "--from-hf", str(hf), "--out", str(tmp_path / "link"), "--overwrite"]) == 2
    _refused(capsys, "is the source")
    (tmp_path / "link").unlink()
    assert _snapshot(tmp_path) == before


def test_run_checkpoint_is_not_overwritten_without_overwrite(hf, tmp_path, capsys):
    from moekit.models.io import resolve_checkpoint

    run = tmp_path / "run"
    step = save_model_checkpoint(_model(2), run / "checkpoints" / "step-00000004")
    before = _snapshot(run)
    assert main(["convert", "--from-hf", str(hf), "--out", str(step)]) == 2
    _refused(capsys, "already holds a checkpoint", "--overwrite")
    assert _snapshot(run) == before
    # and a run given as the source of --to-hf: nothing may be written inside it
    assert main(["convert", "--to-hf", str(run), "--out", str(run / "hf")]) == 2
    _refused(capsys, f"is inside the source {run}")
    assert _snapshot(run) == before
    # asked explicitly: replaced atomically, and the result verifies
    assert main(["convert", "--from-hf", str(hf), "--out", str(step), "--overwrite"]) == 0
    assert resolve_checkpoint(step).manifest["files"].keys() >= {"config.json", "model.safetensors", "tokenizer.json"}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000004"]


def test_non_empty_folder_is_refused_even_with_overwrite(hf, ckpt, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    for src in (["--from-hf", str(hf)], ["--to-hf", str(ckpt)]):
        assert main(["convert", *src, "--out", str(notes)]) == 2
        _refused(capsys, "already holds files")
        assert main(["convert", *src, "--out", str(notes), "--overwrite"]) == 2
        _refused(capsys, "holds no model")
    assert _snapshot(notes) == {"todo.txt": b"keep me"}
    (tmp_path / "file").write_text("x")
    assert main(["convert", "--to-hf", str(ckpt), "--out", str(tmp_path / "file")]) == 2
    _refused(capsys, "is not a folder")


def test_empty_folder_and_overwrite_of_a_model_folder_work(hf, ckpt, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["convert", "--to-hf", str(ckpt), "--out", str(empty)]) == 0
    first = _snapshot(empty)
    assert "config.json" in first and "manifest.json" not in first
    assert main(["convert", "--to-hf", str(ckpt), "--out", str(empty)]) == 2
    _refused(capsys, "--overwrite")
    assert main(["convert", "--to-hf", str(ckpt), "--out", str(empty), "--overwrite"]) == 0
    assert _snapshot(empty) == first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failure_midway_leaves_the_target_untouched(ckpt, hf, tmp_path, monkeypatch):
    import moekit.hf.api as api

    real = api.write_shards

    def one_shard_then_disk_full(folder, names, materialize, max_bytes):
        real(folder, names[:1], materialize, max_bytes)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(api, "write_shards", one_shard_then_disk_full)
    before = _snapshot(hf)
    for out, extra in ((tmp_path / "new", []), (hf, ["--overwrite"])):
        try:
            rc = main(["convert", "--to-hf", str(ckpt), "--out", str(out), *extra])
        except OSError:
            rc = None
        assert rc != 0
    assert not (tmp_path / "new").exists()
    assert _snapshot(hf) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_to_hf_verifies_its_source(ckpt, tmp_path, capsys):
    raw = bytearray((ckpt / "model.safetensors").read_bytes())
    raw[-3] ^= 0x01
    (ckpt / "model.safetensors").write_bytes(bytes(raw))
    assert main(["convert", "--to-hf", str(ckpt), "--out", str(tmp_path / "out")]) == 2
    _refused(capsys, f"{ckpt / 'model.safetensors'} does not match its sha256")
    assert not (tmp_path / "out").exists()
