"""One checked loader: model checkpoints are written atomically with a manifest, and every load
(`load_checkpoint`, `resolve_checkpoint`) verifies it; one resolver for checkpoint, run and
Hugging Face folders; one CheckpointError."""

from __future__ import annotations

import json
import os

import pytest
import torch
from ckpt_helpers import flip_tensor_byte, model_checkpoint, run_folder, snapshot, tiny

from moekit import checkfiles
from moekit.models import load_checkpoint, save_model_checkpoint
from moekit.models.io import CheckpointRef, add_manifest, read_config, resolve_checkpoint


def test_save_writes_a_manifest_that_load_verifies(tmp_path):
    model = tiny()
    ck = save_model_checkpoint(model, tmp_path / "ck", files={"tokenizer.json": _byte_tokenizer(tmp_path)})
    manifest = json.loads((ck / "manifest.json").read_text())
    assert set(manifest["files"]) == {"config.json", "model.safetensors", "tokenizer.json"}
    assert manifest["files"]["model.safetensors"]["bytes"] == (ck / "model.safetensors").stat().st_size
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(load_checkpoint(ck)(x).logits, model(x).logits)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_flipped_weight_bits_are_refused_naming_the_file(tmp_path):
    ck = model_checkpoint(tmp_path / "ck")
    flip_tensor_byte(ck / "model.safetensors", "lm_head.weight")
    with pytest.raises(checkfiles.CheckpointError, match=r"model\.safetensors does not match its sha256"):
        load_checkpoint(ck)


def test_missing_manifest_is_an_incomplete_checkpoint(tmp_path):
    ck = model_checkpoint(tmp_path / "ck")
    (ck / "manifest.json").unlink()
    with pytest.raises(checkfiles.CheckpointError, match=rf"incomplete checkpoint {ck}: .*manifest\.json is missing"):
        load_checkpoint(ck)


def test_old_checkpoint_without_manifest_escape_hatches(tmp_path):
    """What an older moekit wrote (config.json + model.safetensors, no manifest): refused by default;
    verify=False loads it, add_manifest records its files after checking they load."""
    model = tiny()
    ck = model_checkpoint(tmp_path / "ck")
    (ck / "manifest.json").unlink()
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(load_checkpoint(ck, verify=False)(x).logits, model(x).logits)
    add_manifest(ck)
    assert torch.equal(load_checkpoint(ck)(x).logits, model(x).logits)
    with pytest.raises(checkfiles.CheckpointError, match="exists already"):
        add_manifest(ck)


def test_checkpoint_without_weights_is_an_error_not_random_weights(tmp_path):
    ck = model_checkpoint(tmp_path / "ck")
    (ck / "model.safetensors").unlink()
    with pytest.raises(checkfiles.CheckpointError, match=r"model\.safetensors is listed in the manifest but missing"):
        load_checkpoint(ck)
    with pytest.raises(checkfiles.CheckpointError, match=r"model\.safetensors is missing \(the checkpoint holds no"):
        load_checkpoint(ck, verify=False)


def test_truncated_weights_name_the_file_even_unverified(tmp_path):
    ck = model_checkpoint(tmp_path / "ck")
    raw = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(checkfiles.CheckpointError, match=r"model\.safetensors has \d+ bytes, the manifest says"):
        load_checkpoint(ck)
    with pytest.raises(checkfiles.CheckpointError, match=r"model\.safetensors: truncated safetensors file"):
        load_checkpoint(ck, verify=False)


@pytest.mark.parametrize("content", ["[1, 2]", "{not json", "\xff\xfe"])
def test_bad_config_json_names_the_file(tmp_path, content):
    ck = model_checkpoint(tmp_path / "ck")
    (ck / "config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(checkfiles.CheckpointError, match=r"config\.json"):
        read_config(ck)
    checkfiles.write_manifest(ck, {"kind": "model"})  # even when the manifest vouches for it
    with pytest.raises(checkfiles.CheckpointError, match=rf"{ck / 'config.json'} (holds a JSON list|is not valid)"):
        load_checkpoint(ck)


def test_config_with_a_bad_field_names_the_file(tmp_path):
    ck = model_checkpoint(tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["d_model"] = -1
    (ck / "config.json").write_text(json.dumps(cfg))
    checkfiles.write_manifest(ck, {"kind": "model"})
    with pytest.raises(checkfiles.CheckpointError, match=rf"{ck / 'config.json'}: .*d_model"):
        load_checkpoint(ck)


def test_manifest_names_outside_the_folder_are_refused(tmp_path):
    ck = model_checkpoint(tmp_path / "ck")
    manifest = json.loads((ck / "manifest.json").read_text())
    manifest["files"]["../secret"] = {"bytes": 1, "sha256": "0" * 64}
    (ck / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(checkfiles.CheckpointError, match="'../secret', which is not a file name"):
        load_checkpoint(ck)


# ---------------------------------------------------------------------------------------------
# Writing: atomic, never into a folder that holds something else


def test_save_refuses_a_non_empty_folder_and_overwrite_only_replaces_a_checkpoint(tmp_path):
    model = tiny()
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("keep me")
    with pytest.raises(checkfiles.OutputFolderError, match="is not empty"):
        save_model_checkpoint(model, other)
    with pytest.raises(checkfiles.OutputFolderError, match="holds no checkpoint"):
        save_model_checkpoint(model, other, overwrite=True)
    assert (other / "todo.txt").read_text() == "keep me" and len(list(other.iterdir())) == 1

    ck = model_checkpoint(tmp_path / "ck", seed=1)
    with pytest.raises(checkfiles.OutputFolderError, match="is not empty"):
        save_model_checkpoint(model, ck)
    save_model_checkpoint(model, ck, overwrite=True)
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(load_checkpoint(ck)(x).logits, model(x).logits)
    empty = tmp_path / "empty"
    empty.mkdir()
    save_model_checkpoint(model, empty)  # an empty folder is fine
    assert (empty / "manifest.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_failed_save_leaves_no_trace_and_the_old_checkpoint_intact(tmp_path, monkeypatch):
    ck = model_checkpoint(tmp_path / "ck", seed=1)
    before = snapshot(ck)

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("moekit.models.io.save_model", boom)
    with pytest.raises(OSError, match="No space left"):
        save_model_checkpoint(tiny(), ck, overwrite=True)
    with pytest.raises(OSError, match="No space left"):
        save_model_checkpoint(tiny(), tmp_path / "new")
    assert snapshot(ck) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_new_checkpoint_folder_gets_ordinary_permissions(tmp_path):
    ck = model_checkpoint(tmp_path / "ck")
    umask = os.umask(0)
    os.umask(umask)
    assert ck.stat().st_mode & 0o777 == 0o777 & ~umask


# ---------------------------------------------------------------------------------------------
# One resolver


def test_run_folder_resolves_to_the_newest_by_step_number_and_says_so(tmp_path):
    run = run_folder(tmp_path / "run", steps=(9, 10))
    (run / "checkpoints" / "step-7").mkdir()  # not a checkpoint name: ignored
    ref = resolve_checkpoint(run)
    assert isinstance(ref, CheckpointRef) and ref.path.name == "step-00000010" and ref.kind == "moekit"
    assert ref.manifest["step"] == 10
    assert "the newest of 2 checkpoint(s)" in ref.note and str(ref.path) in ref.note
    assert resolve_checkpoint(run / "checkpoints").path == ref.path
    direct = resolve_checkpoint(run / "checkpoints" / "step-00000009")
    assert direct.path.name == "step-00000009" and direct.note == ""
    # the Python loader takes the run folder too
    x = torch.randint(0, 256, (1, 8))
    assert torch.equal(load_checkpoint(run)(x).logits, tiny(1)(x).logits)


def test_damaged_newest_is_refused_unless_fallback(tmp_path):
    run = run_folder(tmp_path / "run", steps=(4, 8))
    newest = run / "checkpoints" / "step-00000008"
    (newest / "config.json").unlink()
    with pytest.raises(checkfiles.CheckpointError) as err:
        resolve_checkpoint(run)
    msg = str(err.value)
    assert "newest checkpoint" in msg and "config.json is listed in the manifest but missing" in msg
    assert "--fallback" in msg and "\n" not in msg
    with pytest.raises(checkfiles.CheckpointError, match="config.json is listed in the manifest but missing"):
        load_checkpoint(run)
    ref = resolve_checkpoint(run, fallback=True)
    assert ref.path.name == "step-00000004"
    assert ref.skipped == ((newest, ref.skipped[0][1]),) and "config.json" in ref.skipped[0][1]
    assert "skipped 1 damaged newer" in ref.note
    (run / "checkpoints" / "step-00000004" / "manifest.json").unlink()
    with pytest.raises(checkfiles.CheckpointError, match="no intact checkpoint .* all 2 are damaged"):
        resolve_checkpoint(run, fallback=True)


def test_nothing_to_resolve(tmp_path):
    with pytest.raises(checkfiles.CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")
    (tmp_path / "file").write_text("x")
    with pytest.raises(checkfiles.CheckpointError, match="it is a file"):
        resolve_checkpoint(tmp_path / "file")
    (tmp_path / "checkpoints" / "step-12").mkdir(parents=True)
    with pytest.raises(checkfiles.CheckpointError, match=r"no checkpoint found in .*step-12 do not match"):
        resolve_checkpoint(tmp_path)


def test_hugging_face_folder_is_recognised_not_called_incomplete(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ref = resolve_checkpoint(tmp_path)
    assert ref.kind == "hf" and ref.manifest is None
    with pytest.raises(checkfiles.CheckpointError, match="Hugging Face folder: load it with moekit.hf.from_hf"):
        load_checkpoint(tmp_path)


def _byte_tokenizer(tmp_path):
    path = tmp_path / "tok.json"
    path.write_text(json.dumps({"kind": "byte", "vocab_size": 256}))
    return path
