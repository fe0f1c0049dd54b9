"""Atomic checkpoints: round trip, integrity checks that name the file, partial folders ignored."""

from __future__ import annotations

import json

import pytest
import torch
from trainkit import small_model

from moekit.train import checkpoint as ck
from moekit.train.data import ByteTokenizer


def _model_and_opt(seed=0):
    from moekit.models import build_model

    torch.manual_seed(seed)
    model = build_model(small_model())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (2, 16))
    model(x).logits.float().mean().backward()
    opt.step()
    return model, opt


def _save(root, step, model, opt, keep_last=None):
    return ck.save_checkpoint(root, step, model, opt, model_config={"arch": "x"}, run_config={"seed": 0},
                              tokenizer=ByteTokenizer(), extra={"train_time": 1.5}, keep_last=keep_last)


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = _model_and_opt()
    torch.manual_seed(123)
    path = _save(tmp_path, 7, model, opt)
    expected_draw = torch.rand(3)
    assert path.name == "step-00000007" and (tmp_path / "LATEST").read_text().strip() == path.name
    assert {"model.safetensors", "config.json", "optimizer.safetensors", "trainer.safetensors",
            "manifest.json", "tokenizer.json", "run_config.json"} <= {p.name for p in path.iterdir()}
    model2, opt2 = _model_and_opt(seed=1)
    got = ck.latest(tmp_path)
    assert got.step == 7 and got.manifest["train_time"] == 1.5
    ck.load_training_state(got, model2, opt2)
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    assert torch.equal(torch.rand(3), expected_draw)  # RNG continues where the save left it


def test_checkpoint_loads_with_models_loader(tmp_path):
    from moekit.models import config_to_dict, load_checkpoint

    model, opt = _model_and_opt()
    path = ck.save_checkpoint(tmp_path, 1, model, opt, model_config=config_to_dict(model.cfg), run_config={},
                              tokenizer=ByteTokenizer())
    loaded = load_checkpoint(path)
    x = torch.randint(0, 256, (1, 8))
    model.eval()
    assert torch.equal(loaded(x).logits, model(x).logits)


def test_corrupt_file_is_named(tmp_path):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 1, model, opt)
    good = (path / "model.safetensors").read_bytes()
    blob = bytearray(good)
    blob[-5] ^= 0xFF
    (path / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ck.CheckpointError, match=r"model\.safetensors does not match its sha256"):
        ck.latest(tmp_path)
    (path / "model.safetensors").write_bytes(good)
    (path / "optimizer.safetensors").write_bytes(b"short")
    with pytest.raises(ck.CheckpointError, match=r"optimizer\.safetensors has 5 bytes"):
        ck.verify(path)


def test_missing_manifest_or_bad_json_is_named(tmp_path):
    model, opt = _model_and_opt()
    path = _save(tmp_path, 2, model, opt)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(ck.CheckpointError, match=r"manifest\.json is not valid JSON"):
        ck.latest(tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(ck.CheckpointError, match=r"manifest\.json is missing"):
        ck.latest(tmp_path)


def test_partial_save_is_ignored_and_cleaned(tmp_path):
    """A kill during a save leaves only a temporary folder: the previous checkpoint stays newest."""
    model, opt = _model_and_opt()
    _save(tmp_path, 3, model, opt)
    partial = tmp_path / f"{ck.TMP_PREFIX}00000006-999"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half a file")
    assert ck.latest(tmp_path).step == 3
    assert ck.remove_partial(tmp_path) == [partial] and not partial.exists()


def test_keep_last_prunes_old_checkpoints_and_resave_replaces(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        _save(tmp_path, step, model, opt, keep_last=2)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3]
    _save(tmp_path, 3, model, opt, keep_last=2)  # same step again (a resumed run)
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [2, 3]
    assert ck.verify(tmp_path / "step-00000003").step == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resolve_accepts_run_or_checkpoint_folder(tmp_path):
    model, opt = _model_and_opt()
    root = tmp_path / "run" / "checkpoints"
    _save(root, 4, model, opt)
    _save(root, 8, model, opt)
    assert ck.resolve(tmp_path / "run").name == "step-00000008"
    assert ck.resolve(root / "step-00000004").name == "step-00000004"
    with pytest.raises(ck.CheckpointError, match="no checkpoint found"):
        ck.resolve(tmp_path)
    json.loads((root / "step-00000008" / "config.json").read_text())


def test_one_checkpoint_error_type_under_every_import_path():
    from moekit import checkfiles, hf
    from moekit.hf import shards
    from moekit.models import io

    assert ck.CheckpointError is hf.CheckpointError is shards.CheckpointError is io.CheckpointError
    assert ck.CheckpointError is checkfiles.CheckpointError and issubclass(ck.CheckpointError, ValueError)


def test_training_and_model_checkpoints_share_the_manifest_check(tmp_path):
    from moekit.checkfiles import verify_manifest
    from moekit.models import save_model_checkpoint

    model, opt = _model_and_opt()
    path = _save(tmp_path / "run", 5, model, opt)
    assert verify_manifest(path)["step"] == 5
    plain = save_model_checkpoint(model, tmp_path / "plain")
    assert verify_manifest(plain)["kind"] == "model"
    with pytest.raises(ck.CheckpointError, match="a model checkpoint, not a training checkpoint"):
        ck.verify(plain)


def test_resolve_orders_steps_by_number_and_skips_other_names(tmp_path):
    model, opt = _model_and_opt()
    root = tmp_path / "run" / "checkpoints"
    _save(root, 99, model, opt)
    _save(root, 100, model, opt)
    (root / "step-999").mkdir()  # sorts after step-00000100 as text; not a checkpoint name
    (root / f"{ck.TMP_PREFIX}00000200-1").mkdir()
    assert ck.resolve(tmp_path / "run").name == "step-00000100"
    assert [s for s, _ in ck.list_checkpoints(root)] == [99, 100]


def test_a_full_disk_during_a_checkpoint_keeps_the_earlier_ones(tmp_path):
    """The second checkpoint's weights run into a full disk (a file-size limit makes writes past a
    size fail as a full disk would): one error naming the checkpoint, no partial folder, and the
    first checkpoint still verifies."""
    import subprocess
    import sys
    import textwrap

    root = tmp_path / "checkpoints"
    script = textwrap.dedent(f"""
        import resource, signal
        from pathlib import Path
        import torch
        from moekit.models import build_model, get_preset, config_to_dict
        from moekit.tokenizer import ByteTokenizer
        from moekit.train import checkpoint as ck
        model = build_model(get_preset("tiny"))
        kw = dict(model_config=config_to_dict(model.cfg), run_config={{}}, tokenizer=ByteTokenizer())
        ck.save_training_checkpoint(Path({str(root)!r}), 1, model, None, **kw)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
        try:
            ck.save_training_checkpoint(Path({str(root)!r}), 2, model, None, **kw)
        except ck.CheckpointError as err:
            print("ERROR", err)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("ERROR could not write checkpoint") and "step-00000002" in line and "intact" in line
    assert sorted(p.name for p in root.iterdir()) == ["LATEST", "step-00000001"]  # no partial folder
    ck.verify(root / "step-00000001")
