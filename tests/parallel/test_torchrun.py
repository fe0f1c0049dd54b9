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


def _torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
            str(SCRIPT), *args]


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
