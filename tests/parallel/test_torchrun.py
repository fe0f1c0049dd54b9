"""torchrun end to end: the tiny decoder LM trained a few steps with EP=2 (2 gloo processes)
matches the one-process run step for step, and its full-layout checkpoint matches too."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(180)]

SCRIPT = Path(__file__).with_name("torchrun_train.py")


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _torchrun(n, *args, script=SCRIPT):
    target = ["-m", "moekit"] if script is None else [str(script)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *target, *args]


# Capacity under EP is covered in seconds by test_ep_parity; the torchrun variant is slow.
# (GShard's random routing would differ: each rank draws its own uniforms.)
CASES = [pytest.param([], id="dropless"),
         pytest.param(["--capacity-factor", "1.0"], id="capacity", marks=pytest.mark.slow)]


@pytest.mark.parametrize("extra", CASES)
def test_ep2_training_matches_one_process(tmp_path, extra):
    _run([sys.executable, str(SCRIPT), "--out", "one.json", "--ckpt", "one.pt", *extra], tmp_path)
    _run(_torchrun(2, "--ep", "2", "--out", "ep2.json", "--ckpt", "ep2.pt", *extra), tmp_path)
    one = json.loads((tmp_path / "one.json").read_text())
    ep2 = json.loads((tmp_path / "ep2.json").read_text())
    assert (one["world"], ep2["world"], ep2["ep"]) == (1, 2, 2)
    torch.testing.assert_close(torch.tensor(ep2["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=0)
    a, b = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "ep2.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape, key  # full expert stacks, not one rank's shard
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


TRAIN_ARGS = ["--preset", "tiny", "--set", "schedule.steps=3", "schedule.warmup_steps=1", "eval.every=0",
              "eval.batches=1", "checkpoint.every=2", "logging.every=1", "logging.progress=false",
              "data.max_bytes=200000", "data.test_min_bytes=16000", "data.seq_len=32", "parallel.timeout_s=60"]


def _train_losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"]


def test_moekit_train_under_torchrun_ep2(tmp_path):
    """`torchrun -m moekit train --set parallel.ep=2` (1 sequence per rank) == one process with the same
    global batch (2 sequences); its checkpoint is the full model, and resumes under dp=2 x ep=1."""
    one = tmp_path / "one"
    ep2 = tmp_path / "ep2"
    _run([sys.executable, "-m", "moekit", "train", "--out", str(one), *TRAIN_ARGS, "data.batch_size=2"], tmp_path)
    _run(_torchrun(2, "train", "--out", str(ep2), *TRAIN_ARGS, "data.batch_size=1",
                   "parallel.ep=2", script=None), tmp_path)
    torch.testing.assert_close(torch.tensor(_train_losses(ep2)), torch.tensor(_train_losses(one)), rtol=1e-5, atol=0)
    from safetensors.torch import load_file

    full = load_file(str(one / "checkpoints" / "step-00000002" / "model.safetensors"))
    sharded_run = load_file(str(ep2 / "checkpoints" / "step-00000002" / "model.safetensors"))
    assert full.keys() == sharded_run.keys()
    for key in full:
        assert full[key].shape == sharded_run[key].shape, key
    # Resume the EP=2 run's step-2 checkpoint with the same world but ep=1 (dp=2).
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(ep2 / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    (resumed / "checkpoints" / "LATEST").write_text("step-00000002\n")
    _run(_torchrun(2, "train", "--out", str(resumed), *TRAIN_ARGS, "data.batch_size=1",
                   "parallel.ep=1", "--resume", script=None), tmp_path)
    torch.testing.assert_close(torch.tensor(_train_losses(resumed)[-1:]), torch.tensor(_train_losses(ep2)[-1:]),
                               rtol=1e-5, atol=0)
