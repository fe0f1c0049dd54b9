"""The commands end to end on a tiny model: train (and --resume), compare + report, inspect."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main
from moekit.train.metrics import read_jsonl

SMALL = ["threads=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1", "model.moe.d_ff=32",
         "model.d_ff=64", "data.max_bytes=200000", "data.test_min_bytes=16000", "data.seq_len=32",
         "data.batch_size=2", "eval.batches=2",
         "logging.progress=false", "logging.tensorboard=off"]


def test_train_then_resume_extends_the_log(tmp_path, capsys):
    out = tmp_path / "run[/b]"  # printed as it is (not read as console markup)
    sets = SMALL + ["schedule.steps=4", "schedule.warmup_steps=1", "checkpoint.every=2", "eval.every=2",
                    "logging.every=1"]
    assert main(["train", "--preset", "tiny", "--out", str(out), "--set", *sets]) == 0
    assert "done: 4 steps, 256 tokens" in (err := capsys.readouterr().err) and f"run folder {out}" in err
    # Same command again without --resume: refused, nothing overwritten.
    assert main(["train", "--preset", "tiny", "--out", str(out), "--set", *sets]) == 2
    assert "--resume" in capsys.readouterr().err
    # Continue to 6 steps (schedule.steps differs: allowed, recorded in run.json, not in the log).
    assert main(["train", "--preset", "tiny", "--out", str(out), "--resume", "--set", *sets,
                 "schedule.steps=6"]) == 0
    assert f"resumed from {out / 'checkpoints' / 'step-00000004'} at step 4" in capsys.readouterr().err
    steps = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert not [r for r in read_jsonl(out / "metrics.jsonl") if r["kind"] == "event"]
    resumes = json.loads((out / "run.json").read_text())["resumes"]
    assert [r["step"] for r in resumes] == [4] and resumes[0]["changed"] == ["schedule.steps"]
    assert resumes[0]["checkpoint"].endswith("step-00000004") and resumes[0]["time"]
    # Resuming the finished run: "already finished", exit 0, and the log is left as it is.
    log = (out / "metrics.jsonl").read_bytes()
    assert main(["train", "--preset", "tiny", "--out", str(out), "--resume", "--set", *sets,
                 "schedule.steps=6"]) == 0
    assert "already finished" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == log


def test_train_reports_config_errors(capsys):
    assert main(["train", "--preset", "tiny", "--set", "optim.nope=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'nope' in optim" in err and "valid keys: lr" in err
    assert main(["train", "--preset", "tiny", "--show-config", "--set", "optim.lr=0.01"]) == 0
    assert json.loads(capsys.readouterr().out)["optim"]["lr"] == 0.01


def test_compare_writes_report_and_inspect_reads_checkpoint(tmp_path, capsys):
    out = tmp_path / "cmp"
    sets = SMALL + ["schedule.steps=4", "schedule.warmup_steps=1", "eval.every=2", "logging.every=1"]
    assert main(["compare", "--preset", "tiny", "--out", str(out), "--workers", "2", "--set", *sets]) == 0
    assert f"report: {out / 'report.md'}" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    for needle in ("| moe |", "| dense-active |", "| dense-total |", "At equal training tokens",
                   "At equal wall-clock", "expert_specialisation.png", "expert_load.png"):
        assert needle in report
    for png in ("val_bpb_vs_steps", "val_bpb_vs_time", "expert_load", "router_entropy", "drop_fraction",
                "expert_specialisation", "val_bpb_vs_cpu_time"):
        assert (out / "plots" / f"{png}.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["split"] == "test" and summary["seeds"] == [0]
    # Thread counts are fixed per run (no raise when the other process finishes): the same at the
    # start (run.json) and at the end (the test record) of every run.
    assert "threads_raised" not in summary
    for name in ("moe", "dense-active", "dense-total"):
        start = json.loads((out / name / "run.json").read_text())["machine"]["torch_threads"]
        end = [r for r in read_jsonl(out / name / "metrics.jsonl") if r["kind"] == "test"][0]["torch_threads"]
        assert start == end == summary["threads_per_process"] == 1
    summary = summary["models"]
    assert summary["moe"]["tokens"] == summary["dense-active"]["tokens"] == summary["dense-total"]["tokens"]
    assert summary["dense-active"]["params_total"] < summary["moe"]["params_total"]
    # Matched parameter counts, up to the twin's rounding of the FFN width.
    assert summary["dense-active"]["params_total"] == pytest.approx(summary["moe"]["params_active"], rel=0.02)
    assert summary["dense-total"]["params_total"] == pytest.approx(summary["moe"]["params_total"], rel=0.02)
    gaps = json.loads((out / "gaps.json").read_text())
    assert gaps["equal_tokens"]["moe_bpb"] == summary["moe"]["final_val_bpb"]

    insp = tmp_path / "insp"
    text = "def f(x):\n    # add one\n    return x + 1  # done\n" * 20
    assert main(["inspect", "--checkpoint", str(out / "moe"), "--text", text, "--out", str(insp)]) == 0
    printed = capsys.readouterr().out
    assert "routing per MoE layer" in printed and "token classes" in printed
    for png in ("expert_specialisation", "expert_load_on_text", "expert_load", "router_entropy"):
        assert (insp / f"{png}.png").exists()
    assert main(["inspect", "--checkpoint", str(tmp_path / "nothing")]) == 2  # a user error, one line
