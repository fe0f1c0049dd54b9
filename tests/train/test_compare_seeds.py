"""`moekit compare --seeds`: the headline on the test split over seeds, and fixed thread counts."""

from __future__ import annotations

import json

import pytest
import torch
from test_train_cli import SMALL

from moekit.cli import main
from moekit.train.metrics import read_jsonl

STEPS = ["schedule.steps=3", "schedule.warmup_steps=1", "eval.every=0", "checkpoint.every=0", "logging.every=1"]


def test_two_seeds_give_the_test_headline_with_its_spread(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--preset", "tiny", "--out", str(out), "--workers", "1", "--seeds", "0,1",
                 "--set", *SMALL, *STEPS]) == 0
    printed = capsys.readouterr()
    assert "test split, seeds [0, 1]" in printed.err
    runs = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name not in ("plots", "cache"))
    assert runs == ["dense-active-seed0", "dense-active-seed1", "dense-total-seed0", "moe-seed0", "moe-seed1"]
    test = {n: json.loads((out / n / "run.json").read_text())["test"]["test_bpb"] for n in runs}
    seeds = {n: json.loads((out / n / "run.json").read_text())["config"]["seed"] for n in runs}
    assert seeds == {"dense-active-seed0": 0, "dense-active-seed1": 1, "dense-total-seed0": 0, "moe-seed0": 0,
                     "moe-seed1": 1}
    assert test["moe-seed0"] != test["moe-seed1"]
    # moe-seed1 is the run `moekit train` makes with run.seed=1: the seed reaches the model and the batches
    alone = tmp_path / "alone"
    assert main(["train", "--preset", "tiny", "--out", str(alone), "--set", *SMALL, *STEPS, "seed=1"]) == 0
    losses = [[r["loss"] for r in read_jsonl(d / "metrics.jsonl") if r["kind"] == "train"]
              for d in (alone, out / "moe-seed1")]
    assert losses[0] == losses[1]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["split"] == "test" and summary["seeds"] == [0, 1]
    gaps = [100 * (test[f"dense-active-seed{s}"] - test[f"moe-seed{s}"]) / test[f"dense-active-seed{s}"]
            for s in (0, 1)]
    assert summary["gap_pct_equal_tokens"] == pytest.approx(sum(gaps) / 2, rel=1e-12)
    assert summary["gap_pct_equal_tokens_min"] == min(gaps) and summary["gap_pct_equal_tokens_max"] == max(gaps)
    moe = summary["variants"]["moe"]["test_bpb"]
    assert moe["values"] == [test["moe-seed0"], test["moe-seed1"]]
    assert moe["min"] <= moe["mean"] <= moe["max"]
    assert summary["variants"]["dense-total"]["seeds"] == [0]
    assert summary["models"]["moe-seed1"]["test_bpb"] == test["moe-seed1"]

    report = (out / "report.md").read_text()
    assert "## Headline: test split, 2 seed(s) (0, 1)" in report
    assert f"| moe | 0, 1 | {moe['mean']:.4f} | {moe['min']:.4f} | {moe['max']:.4f} |" in report
    assert "| dense-total | 0 |" in report
    # --report-only rebuilds the same headline from the folders, and refreshes summary.json's
    # headline keys (here: a key removed by hand comes back) while keeping the training-only ones
    trimmed = {k: v for k, v in summary.items() if k != "gap_pct_equal_tokens_per_seed"}
    (out / "summary.json").write_text(json.dumps(trimmed))
    assert main(["compare", "--preset", "tiny", "--out", str(out), "--report-only", "--seeds", "0,1",
                 "--set", *SMALL, *STEPS]) == 0
    assert "## Headline: test split, 2 seed(s) (0, 1)" in (out / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.parametrize("bad", ["0,x", "0,0", "-1", ","])
def test_bad_seeds_are_one_line_errors(tmp_path, capsys, bad):
    assert main(["compare", "--preset", "tiny", "--out", str(tmp_path / "c"), f"--seeds={bad}"]) == 2
    err = capsys.readouterr().err
    assert "--seeds must be" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_the_thread_count_changes_the_arithmetic_so_compare_keeps_it_fixed():
    """Why compare no longer raises a process's threads when another finishes: torch's CPU
    reductions split the work by thread count and add the partial sums in another order, so the
    same sum differs in its last bits between 1 and 2 threads, and a run's numbers would depend on
    when the other process finished."""
    before = torch.get_num_threads()
    x = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0))
    try:
        sums = {}
        for threads in (1, 2):
            torch.set_num_threads(threads)
            sums[threads] = x.sum().item()
    finally:
        torch.set_num_threads(before)
    assert sums[1] != sums[2]
    import moekit.train.compare as compare

    assert not hasattr(compare, "_TakeOverCores")


def test_speedup_to_equal_quality_interpolates_and_says_never():
    from moekit.train.headline import reach, speedup

    dense = {"eval": [{"step": 0, "time": 0.0, "val_bpb": 8.0}, {"step": 100, "time": 50.0, "val_bpb": 2.0}]}
    moe = {"eval": [{"step": 0, "time": 0.0, "val_bpb": 8.0}, {"step": 50, "time": 30.0, "val_bpb": 2.2},
                    {"step": 60, "time": 36.0, "val_bpb": 1.9}, {"step": 100, "time": 60.0, "val_bpb": 1.8}]}
    # 2.0 lies 2/3 of the way from 2.2 (step 50) to 1.9 (step 60)
    assert reach(moe["eval"], 2.0, "step") == pytest.approx(50 + 10 * 2 / 3, abs=1e-12)
    got = speedup(moe, dense)
    assert got["steps_fraction"] == pytest.approx((50 + 10 * 2 / 3) / 100, abs=1e-12)
    assert got["time_fraction"] == pytest.approx((30 + 6 * 2 / 3) / 50, abs=1e-12)
    assert reach(moe["eval"], 1.5, "step") is None
    slow = {"eval": [{"step": 0, "time": 0.0, "val_bpb": 8.0}, {"step": 100, "time": 50.0, "val_bpb": 2.5}]}
    assert speedup(slow, dense) == {"steps_fraction": None, "time_fraction": None}
