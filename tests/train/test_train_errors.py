"""User errors of `moekit train` / `compare`: one line naming the file or field and what to do, exit
code 2, no traceback, and nothing written; a failed run (non-finite loss) exits 1; a bug keeps
its traceback."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from test_train_cli import SMALL
from trainkit import permissions_enforced

import moekit.cli.train as cli_train
from moekit.cli import describe_os_error, main

SETS = SMALL + ["schedule.steps=2", "schedule.warmup_steps=1", "eval.every=0"]


def _train(out: Path, *sets: str) -> int:
    return main(["train", "--preset", "tiny", "--out", str(out), "--set", *SETS, *sets])


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("sets, expect", [
    (["optim.beta1=1"], "optim.beta1 must be in [0, 1), got 1"),
    (["optim.beta2=1.0"], "optim.beta2 must be in [0, 1), got 1.0"),
    (["parallel.ep=2"], "parallel.ep=2 needs 2 processes, but this is a single process (not under torchrun); "
                        "launch it with `torchrun --nproc-per-node 2 -m moekit train ...`"),
    (["parallel.dp=2", "parallel.ep=2"], "needs 4 processes"),
    (["device=cuda"], "run.device=cuda but no CUDA device is available"),
], ids=["beta1", "beta2", "ep-without-torchrun", "dp-ep-without-torchrun", "cuda-without-cuda"])
def test_settings_the_machine_or_torch_cannot_honour_are_refused_up_front(tmp_path, capsys, sets, expect):
    """beta=1 used to pass validation and fail inside torch without the field's name; parallel.ep=2
    without torchrun was silently ignored (one process trained alone); neither touches --out."""
    if "device=cuda" in sets and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    out = tmp_path / "run"
    assert _train(out, *sets) == 2
    assert expect in _one_line(capsys)
    assert not out.exists()


def test_compare_refuses_parallel_ep_too(tmp_path, capsys):
    assert main(["compare", "--preset", "tiny", "--out", str(tmp_path / "c"), "--set", *SETS, "parallel.ep=2"]) == 2
    assert "parallel.ep=2 needs 2 processes" in _one_line(capsys) and not (tmp_path / "c").exists()


def test_unreadable_data_file_names_it(tmp_path, capsys):
    """A data file that cannot be read: root reads any file whatever its mode, so /proc/self/mem (an
    I/O error for everyone) stands in for it; a mode-000 file too where permissions apply."""
    targets = []
    if Path("/proc/self/mem").exists():
        targets.append(("/proc/self/mem", "Input/output error"))
    if permissions_enforced(tmp_path):
        secret = tmp_path / "secret.py"
        secret.write_text("x = 1\n")
        secret.chmod(0)
        targets.append((str(secret), "Permission denied"))
    if not targets:
        pytest.skip("no unreadable file available here")
    for path, reason in targets:
        assert _train(tmp_path / "run", f"data.path={path}") == 2
        err = _one_line(capsys)
        assert f"data.path: cannot read {path} ({reason})" in err


def test_os_errors_name_the_file_and_reason(tmp_path, capsys):
    """An OSError anywhere (a folder where metrics.jsonl must go, here) is one line with the file, the
    OS reason and a hint, exit 2."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text("{}")
    (out / "metrics.jsonl").mkdir()
    assert _train(out) == 2
    err = _one_line(capsys)
    assert f"{out / 'metrics.jsonl'}: Is a directory; a folder stands where a file must be" in err
    assert describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/x/y")) == (
        "/x/y: No space left on device; the disk is full: free some space and run again")
    assert describe_os_error(FileNotFoundError("data.path: /nope does not exist")) == "data.path: /nope does not exist"


def test_a_failed_run_exits_1_a_bad_checkpoint_2_a_bug_keeps_its_traceback(tmp_path, capsys, monkeypatch):
    import moekit.train.loop as loop
    from moekit.train.checkpoint import CheckpointError
    from moekit.train.nonfinite import NonFiniteError

    def fails(err):
        def train(*_a, **_k):
            raise err
        return train

    monkeypatch.setattr(loop, "train", fails(NonFiniteError("non-finite loss at step 3; training stopped")))
    assert _train(tmp_path / "a") == 1
    assert "non-finite loss at step 3" in _one_line(capsys)
    monkeypatch.setattr(loop, "train", fails(CheckpointError("corrupt checkpoint: x/model.safetensors")))
    assert _train(tmp_path / "a") == 2
    assert "corrupt checkpoint: x/model.safetensors" in _one_line(capsys)
    monkeypatch.setattr(cli_train, "run", fails(AttributeError("'NoneType' object has no attribute 'x'")))
    with pytest.raises(AttributeError):
        _train(tmp_path / "a")


def test_device_flag_the_machine_cannot_honour_is_one_line(capsys):
    """`--device cuda` (generate) without CUDA used to end in torch's AssertionError traceback;
    cli.main checks any command's --device up front."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    assert main(["generate", "--preset", "tiny", "--device", "cuda", "--prompt", "hi"]) == 2
    assert "--device cuda: no CUDA device is available here; use --device cpu" in _one_line(capsys)
    assert main(["generate", "--preset", "tiny", "--device", "gpu", "--prompt", "hi"]) == 2
    assert "--device gpu: not a device" in _one_line(capsys)
