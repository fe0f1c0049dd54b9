"""The run folder: one writer at a time (an OS lock a crash releases), never a folder that is not a
moekit run, and one-line errors for an --out that cannot be used."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_train_cli import SMALL
from trainkit import permissions_enforced, small_run

from moekit.cli import main
from moekit.train import checkpoint as ck
from moekit.train.loop import train
from moekit.train.metrics import read_jsonl
from moekit.train.runfolder import LOCK_NAME, RunFolderBusy, RunFolderError, RunLock

HOLD = Path(__file__).with_name("hold_run.py")
SETS = SMALL + ["schedule.steps=4", "schedule.warmup_steps=1", "eval.every=0", "logging.every=1"]


def _holder(tmp_path: Path, name: str, out: Path, *sets: str, pause_at: int = 1) -> tuple[subprocess.Popen, Path, Path]:
    """`moekit train --out out` in its own process, paused before optimizer step `pause_at`."""
    ready, go = tmp_path / f"{name}.ready", tmp_path / f"{name}.go"
    cmd = [sys.executable, str(HOLD), "--ready", str(ready), "--go", str(go), "--pause-at", str(pause_at), "--",
           "train", "--preset", "tiny", "--out", str(out), "--set", *SETS, *sets]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return proc, ready, go


def _wait_for(path: Path, procs: list[subprocess.Popen], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if all(p.poll() is not None for p in procs):
            outs = [p.communicate() for p in procs]
            raise AssertionError(f"no process reached {path.name}: {outs}")
        assert time.monotonic() < deadline, f"timed out waiting for {path}"
        time.sleep(0.1)


def _moekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_two_trains_racing_on_one_folder_the_second_names_the_holder(tmp_path):
    """Two `moekit train` processes started together on one --out: one trains, the other exits 2 at
    once with the holder's pid, host and command, and the folder holds one run's files only."""
    out = tmp_path / "run"
    a, ready_a, go_a = _holder(tmp_path, "a", out)
    b, ready_b, go_b = _holder(tmp_path, "b", out)
    procs = {a.pid: a, b.pid: b}
    # The loser fails at the lock, before reading any data; the winner pauses before step 2.
    deadline = time.monotonic() + 240
    while a.poll() is None and b.poll() is None:
        assert time.monotonic() < deadline, "neither process stopped"
        time.sleep(0.1)
    loser = a if a.poll() is not None else b
    winner = b if loser is a else a
    _, err = loser.communicate()
    assert loser.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"{out} is in use by another process (pid {winner.pid} on {socket.gethostname()}" in err
    assert "train --preset tiny" in err and "choose another --out" in err
    _wait_for(ready_a if winner is a else ready_b, [winner])
    (go_a if winner is a else go_b).write_text("go\n")
    _, werr = winner.communicate(timeout=240)
    assert winner.returncode == 0, werr
    assert procs[winner.pid] is winner
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # one run's records, each once
    assert [s for s, _ in ck.list_checkpoints(out / "checkpoints")] == [4]
    assert (out / LOCK_NAME).read_text() == ""  # released: no holder recorded


def test_resume_of_a_live_run_is_refused_and_a_killed_holder_releases_the_lock(tmp_path):
    """`--resume` while the run still trains: exit 2 naming it, and its in-flight temporary
    checkpoint folder is left alone (it used to be deleted, killing the live run). After SIGKILL
    of the holder the lock is free: the resume runs and cleans up what the killed run left."""
    out = tmp_path / "run"
    holder, ready, _go = _holder(tmp_path, "h", out, "checkpoint.every=1", pause_at=2)
    try:
        _wait_for(ready, [holder])
        assert [s for s, _ in ck.list_checkpoints(out / "checkpoints")] == [1, 2]
        # What the live run's next save has in flight (its temporary folder, named with its pid).
        in_flight = out / "checkpoints" / f"{ck.TMP_PREFIX}00000003-{holder.pid}"
        in_flight.mkdir()
        (in_flight / "model.safetensors").write_bytes(b"half written")
        proc = _moekit("train", "--preset", "tiny", "--out", str(out), "--resume", "--set", *SETS)
        assert proc.returncode == 2, proc.stderr
        assert f"is in use by another process (pid {holder.pid}" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert in_flight.is_dir() and holder.poll() is None  # untouched, still training
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    # The killed holder's record is still in the lock file, but the OS released its lock.
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    assert main(["train", "--preset", "tiny", "--out", str(out), "--resume", "--set", *SETS]) == 0
    assert not in_flight.exists()  # a leftover of a dead run, removed under the lock
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]


def test_a_locked_folder_refuses_train_and_compare_in_process(tmp_path, small_data):
    """The lock is per open file, so it also holds against another call in the same process."""
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out, "test holder"):
        with pytest.raises(RunFolderBusy, match=rf"in use by another process \(pid {os.getpid()} on "):
            train(small_run("schedule.steps=1", "schedule.warmup_steps=1"), out, data=small_data)
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # nothing else touched
        assert main(["compare", "--preset", "tiny", "--out", str(out), "--set", *SETS]) == 2
    # Released: the folder is usable again.
    cfg = small_run("schedule.steps=1", "schedule.warmup_steps=1", "checkpoint.every=0")
    assert train(cfg, out, data=small_data).steps == 1


def test_only_rank_0_touches_the_folder(tmp_path, small_data, monkeypatch):
    """Under torchrun every rank runs train(); only rank 0 takes the lock and writes. A rank > 0 must
    not delete temporary checkpoint folders (it used to, on every --resume) or write logs."""
    cfg = small_run("schedule.steps=2", "checkpoint.every=1")
    train(cfg, tmp_path, data=small_data)
    partial = tmp_path / "checkpoints" / f"{ck.TMP_PREFIX}00000003-1"
    partial.mkdir()
    before = (tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "run.json").read_bytes()
    monkeypatch.setenv("RANK", "1")  # WORLD_SIZE stays 1: no process group, the loop runs alone
    with RunLock(tmp_path, "rank 0"):  # rank 0 holds the folder; rank 1 must not need the lock
        train(small_run("schedule.steps=3", "checkpoint.every=1"), tmp_path, data=small_data, resume=True)
    assert partial.is_dir()
    assert ((tmp_path / "metrics.jsonl").read_bytes(), (tmp_path / "run.json").read_bytes()) == before
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "checkpoints")] == [1, 2]


def test_train_refuses_a_folder_that_is_not_a_moekit_run(tmp_path, small_data, capsys):
    """A non-empty folder without run.json, metrics.jsonl, checkpoints/ or the lock: refused, and
    its files (a Hugging Face folder's tokenizer.json here) are not overwritten."""
    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "tokenizer.json").write_text('{"mine": true}')
    (hf / "config.json").write_text("{}")
    assert main(["train", "--preset", "tiny", "--out", str(hf), "--set", *SETS]) == 2
    err = capsys.readouterr().err
    assert f"--out {hf} is not empty and is not a moekit run folder" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "tokenizer.json"]
    assert (hf / "tokenizer.json").read_text() == '{"mine": true}'
    # An empty folder is fine, and so is a moekit run folder (a fresh run there with checkpoints is
    # refused as before: see test_loop.py).
    empty = tmp_path / "empty"
    empty.mkdir()
    cfg = small_run("schedule.steps=1", "schedule.warmup_steps=1", "checkpoint.every=0", "checkpoint.at_end=false")
    train(cfg, empty, data=small_data)
    train(cfg, empty, data=small_data)  # no checkpoints: a fresh run may start over
    assert (empty / "run.json").exists()


def test_compare_refuses_a_folder_that_is_not_a_compare_folder(tmp_path, capsys):
    (tmp_path / "notes.md").write_text("mine")
    assert main(["compare", "--preset", "tiny", "--out", str(tmp_path), "--set", *SETS]) == 2
    assert "is not a moekit compare folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.md"]


@pytest.mark.parametrize("case", ["out_is_a_file", "out_below_a_file", "checkpoints_is_a_file", "not_writable"])
def test_unusable_out_is_one_line_exit_2(tmp_path, capsys, case):
    """--out a file, below a file, checkpoints/ a file, or not writable (permissions; root ignores
    them, hence the file-where-a-folder-goes cases, which hold for root too)."""
    out = tmp_path / "run"
    if case == "out_is_a_file":
        out.write_text("x")
        expect = f"--out {out} is a file"
    elif case == "out_below_a_file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "run"
        expect = f"cannot create the folder {out}"
    elif case == "checkpoints_is_a_file":
        out.mkdir()
        (out / "run.json").write_text("{}")
        (out / "checkpoints").write_text("x")
        expect = f"{out / 'checkpoints'} is a file"
    else:
        if not permissions_enforced(tmp_path):
            pytest.skip("root ignores permissions (the file-where-a-folder-goes cases cover root)")
        out.mkdir()
        (out / "run.json").write_text("{}")
        (out / "checkpoints").mkdir()
        (out / "checkpoints").chmod(0o500)
        expect = f"{out / 'checkpoints'} is not writable"
    try:
        assert main(["train", "--preset", "tiny", "--out", str(out), "--set", *SETS]) == 2
    finally:
        if (out / "checkpoints").is_dir():
            (out / "checkpoints").chmod(0o755)
    err = capsys.readouterr().err
    assert expect in err and len(err.strip().splitlines()) == 1, err


def test_out_not_writable_names_the_folder(tmp_path):
    if not permissions_enforced(tmp_path):
        pytest.skip("root ignores permissions")
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RunFolderError, match=rf"cannot write in {tmp_path}"):
            RunLock(tmp_path).acquire()
    finally:
        tmp_path.chmod(0o755)


def test_small_files_are_replaced_atomically(tmp_path, small_data, monkeypatch):
    """write_atomic on a full disk (a file-size limit) leaves the old file whole and no temporary;
    run.json and tokenizer.json of a run go through a rename, never an in-place write."""
    import textwrap

    target = tmp_path / "summary.json"
    target.write_text("old\n")
    script = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))
        from moekit.train.runfolder import write_atomic
        write_atomic({str(target)!r}, "new" * 100)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"{target}" in proc.stderr and "previous version is unchanged" in proc.stderr
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["summary.json"]

    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (replaced.append(Path(dst).name), real_replace(src, dst)))
    out = tmp_path / "run"
    train(small_run("schedule.steps=1", "schedule.warmup_steps=1", "checkpoint.every=0", "checkpoint.at_end=false"),
          out, data=small_data)
    assert {"run.json", "tokenizer.json"} <= set(replaced)
