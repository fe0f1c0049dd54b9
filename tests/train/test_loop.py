"""The training loop: schedule, bit-identical resume, non-finite stops, logs."""

from __future__ import annotations

import json

import pytest
import torch
from faults import Killed, kill_at
from trainkit import small_run

from moekit.train import checkpoint as ck
from moekit.train.config import apply_override
from moekit.train.loop import NonFiniteError, lr_at, train
from moekit.train.metrics import read_jsonl
from moekit.train.nonfinite import describe_module


def test_lr_schedule_warmup_then_cosine():
    cfg = apply_override(small_run("schedule.steps=10", "schedule.warmup_steps=2", "schedule.min_lr_ratio=0.1"),
                         "optim.lr=1.0")
    lrs = [lr_at(s, cfg) for s in range(10)]
    assert lrs[0] == pytest.approx(0.5) and lrs[1] == pytest.approx(1.0)
    assert lrs[2] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))


@pytest.mark.parametrize("router", ["noisy_topk", "sigmoid_bias"])
def test_resume_at_half_is_bit_identical(tmp_path, small_data, router):
    """Kill after the step-3 checkpoint, resume: steps 4-6 give exactly the uninterrupted losses.

    noisy_topk draws from the torch RNG every forward (so the RNG state must be restored);
    sigmoid_bias with manual updates carries its balancing bias in a buffer; accumulation is on.
    """
    sets = ["optim.grad_accum=2", f"model.moe.router={router}"]
    if router == "sigmoid_bias":
        sets += ["model.moe.router_options.bias_update=manual", "model.moe.router_options.bias_update_rate=0.01"]
    cfg = small_run(*sets)
    full = train(cfg, tmp_path / "full", data=small_data)
    assert len(full.losses) == 6
    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", data=small_data, before_step=kill_at(4))  # dies during step 5
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "cut" / "checkpoints")] == [3]
    resumed = train(cfg, tmp_path / "cut", data=small_data, resume=True)
    assert resumed.losses == full.losses[3:]  # bit-identical, not approximately equal
    assert resumed.final_val_bpb == full.final_val_bpb
    a = ck.load_file_state(tmp_path / "full" / "checkpoints" / "step-00000006")
    b = ck.load_file_state(tmp_path / "cut" / "checkpoints" / "step-00000006")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # The log of the resumed run has one record per step, with the same losses as the full run.
    full_log = [r["loss"] for r in read_jsonl(tmp_path / "full" / "metrics.jsonl") if r["kind"] == "train"]
    cut_log = [r["loss"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl") if r["kind"] == "train"]
    assert cut_log == full_log


CLOCK = ("time", "cpu_time", "elapsed", "tokens_per_s")  # wall-clock and CPU time: differ run to run


def _without_clock(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in CLOCK} for r in records]


def test_resume_between_two_logs_reproduces_the_log_exactly(tmp_path, small_data):
    """Checkpoint at step 3, a train record every 2 steps: the record at step 4 after the resume
    averages steps 3 and 4 like the uninterrupted run's (the interval's sums and routing stats come
    back from the checkpoint), and the log gets no resume record: metrics.jsonl equals the
    uninterrupted run's, record for record, clock fields aside. A second --resume of the finished
    run adds nothing at all (it used to append a second final evaluation)."""
    cfg = small_run("schedule.steps=8", "logging.every=2", "checkpoint.every=3", "eval.every=4",
                    "optim.grad_accum=2")
    full = train(cfg, tmp_path / "full", data=small_data)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", data=small_data, before_step=kill_at(4))  # dies during step 5
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "cut" / "checkpoints")] == [3]
    resumed = train(cfg, tmp_path / "cut", data=small_data, resume=True)
    full_log = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    cut_log = read_jsonl(tmp_path / "cut" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in full_log] == [
        ("eval", 0), ("train", 2), ("train", 4), ("eval", 4), ("train", 6), ("train", 8), ("eval", 8), ("test", 8)]
    assert _without_clock(cut_log) == _without_clock(full_log)
    assert resumed.final_val_bpb == full.final_val_bpb
    assert resumed.test_bpb == full.test_bpb is not None  # the resumed run evaluates the test split at its end
    meta = json.loads((tmp_path / "cut" / "run.json").read_text())
    assert meta["test"]["test_bpb"] == full.test_bpb
    assert [r["step"] for r in meta["resumes"]] == [3]

    files = sorted(p for p in (tmp_path / "cut").rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    again = train(cfg, tmp_path / "cut", data=small_data, resume=True)
    assert again.already_finished and again.steps == 8 and not again.losses
    assert again.test_bpb == full.test_bpb
    assert again.final_val_bpb == full.final_val_bpb and again.evals == [r for r in cut_log if r["kind"] == "eval"]
    assert sorted(p for p in (tmp_path / "cut").rglob("*") if p.is_file()) == files
    assert all(p.read_bytes() == data for p, data in before.items())


def test_fresh_run_refuses_to_mix_with_old_checkpoints(tmp_path, small_data):
    cfg = small_run("schedule.steps=3", "checkpoint.every=0")
    train(cfg, tmp_path, data=small_data)
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(cfg, tmp_path, data=small_data)
    with pytest.raises(ValueError, match="different model"):
        train(apply_override(cfg, "model.moe.top_k=1"), tmp_path, data=small_data, resume=True)


def test_resume_without_checkpoint_or_with_a_corrupt_one_is_an_error(tmp_path, small_data):
    cfg = small_run("schedule.steps=3", "checkpoint.every=0")
    with pytest.raises(ck.CheckpointError, match="no checkpoint"):
        train(cfg, tmp_path, data=small_data, resume=True)
    train(cfg, tmp_path, data=small_data)
    target = tmp_path / "checkpoints" / "step-00000003" / "trainer.safetensors"
    target.write_bytes(target.read_bytes()[:-1])
    with pytest.raises(ck.CheckpointError, match="trainer.safetensors"):
        train(cfg, tmp_path, data=small_data, resume=True)


def test_nonfinite_router_stops_with_step_and_layer(tmp_path, small_data):
    def poison(step, model):
        if step == 2:
            with torch.no_grad():
                model.blocks[1].ffn.router.weight.fill_(float("nan"))

    cfg = small_run("checkpoint.every=1")
    with pytest.raises(NonFiniteError, match=r"non-finite loss at step 3") as info:
        train(cfg, tmp_path, data=small_data, before_step=poison)
    msg = str(info.value)
    assert "blocks.1.ffn.router (layer 1 router)" in msg and "last good checkpoint is kept" in msg
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "checkpoints")] == [1, 2]
    ck.verify(tmp_path / "checkpoints" / "step-00000002")
    events = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if r["kind"] == "event"]
    assert "non-finite loss at step 3" in events[-1]["message"]


def test_nonfinite_gradient_names_the_experts(tmp_path, small_data):
    handles = []

    def poison(step, model):
        if step == 1:
            w = model.blocks[1].ffn.experts.w_in
            handles.append(w.register_hook(lambda g: g * float("inf")))

    with pytest.raises(NonFiniteError, match=r"non-finite gradient at step 2.*layer 1 experts"):
        train(small_run(), tmp_path, data=small_data, before_step=poison)


def test_describe_module():
    assert describe_module("blocks.3.ffn.router.weight") == "layer 3 router"
    assert describe_module("blocks.0.ffn.experts.w_in") == "layer 0 experts"
    assert describe_module("blocks.2.attn.q_proj.weight") == "layer 2 attention"
    assert describe_module("lm_head.weight") == "lm_head"


def test_logs_metadata_and_tensorboard(tmp_path, small_data):
    pytest.importorskip("tensorboard")
    cfg = small_run("schedule.steps=4", "logging.every=2", "logging.tensorboard=on", "eval.every=2")
    result = train(cfg, tmp_path, data=small_data)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    trains = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in trains] == [2, 4] and [r["step"] for r in evals] == [0, 2, 4]
    layers = trains[-1]["layers"]
    assert set(layers) == {"0", "1"}
    # 2 steps x 1 micro-batch x 2 sequences x 32 tokens x top-2 assignments, dropless
    assert sum(layers["1"]["tokens_per_expert"]) == 2 * 2 * 32 * 2
    for key in ("drop_fraction", "router_entropy", "load_imbalance"):
        assert key in layers["0"]
    assert trains[-1]["tokens"] == 4 * 2 * 32 == result.tokens
    assert evals[-1]["val_bpb"] == result.final_val_bpb < evals[0]["val_bpb"]
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["data"]["sha256"] and meta["data"]["bytes"] >= 200_000
    assert meta["params"]["total"] > meta["params"]["active"]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
