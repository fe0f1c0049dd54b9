"""The final test evaluation: once per run, in full, and never twice across --resume."""

from __future__ import annotations

import json

import pytest
from trainkit import small_run

from moekit.train import testeval
from moekit.train.loop import train
from moekit.train.metrics import read_jsonl

CLOCK = ("time", "cpu_time", "elapsed", "tokens_per_s")


def _without_clock(records):
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in records]


def test_the_test_record_is_written_once_at_the_end(tmp_path, small_data):
    cfg = small_run("schedule.steps=4", "eval.every=2", "checkpoint.every=2")
    result = train(cfg, tmp_path, data=small_data)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    tests = [r for r in records if r["kind"] == "test"]
    assert len(tests) == 1 and records[-1] is not None and records[-1]["kind"] == "test"
    rec = tests[0]
    assert rec["step"] == 4 and rec["tokens"] == result.tokens
    # every token of the test split after its first, once (byte tokenizer: one byte per token)
    assert rec["test_tokens"] == rec["test_bytes"] == sum(len(c) for _, c in small_data.corpus.test_files) - 1
    assert rec["test_bpb"] == result.test_bpb and result.test == rec
    meta_test = json.loads((tmp_path / "run.json").read_text())["test"]
    assert meta_test.pop("seconds") > 0 and meta_test == rec  # the duration is in run.json only
    # a --resume of the finished run: nothing added
    log = (tmp_path / "metrics.jsonl").read_bytes()
    again = train(cfg, tmp_path, data=small_data, resume=True)
    assert again.already_finished and again.test_bpb == result.test_bpb
    assert (tmp_path / "metrics.jsonl").read_bytes() == log


def test_eval_test_off_writes_no_test_record(tmp_path, small_data):
    result = train(small_run("schedule.steps=2", "eval.test=false"), tmp_path, data=small_data)
    assert result.test_bpb is None
    assert not [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "test"]
    assert "test" not in json.loads((tmp_path / "run.json").read_text())
    again = train(small_run("schedule.steps=2", "eval.test=false"), tmp_path, data=small_data, resume=True)
    assert again.already_finished


def test_a_run_killed_during_its_test_evaluation_resumes_to_just_that(tmp_path, small_data, monkeypatch):
    """Killed after the final checkpoint, inside the test evaluation: the resume runs only the
    test evaluation (no second final validation record), and the log equals the uninterrupted one."""
    cfg = small_run("schedule.steps=4", "eval.every=2", "checkpoint.every=2")
    full = train(cfg, tmp_path / "full", data=small_data)
    real = testeval.evaluate_test

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("moekit.train.loop.evaluate_test", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", data=small_data)
    assert not [r for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if r["kind"] == "test"]
    monkeypatch.setattr("moekit.train.loop.evaluate_test", real)
    resumed = train(cfg, tmp_path / "cut", data=small_data, resume=True)
    assert not resumed.already_finished and resumed.test_bpb == full.test_bpb and not resumed.losses
    assert _without_clock(read_jsonl(tmp_path / "cut" / "metrics.jsonl")) == _without_clock(
        read_jsonl(tmp_path / "full" / "metrics.jsonl"))
    assert train(cfg, tmp_path / "cut", data=small_data, resume=True).already_finished
