"""The final test evaluation: the whole test split, once, at the end of a run.

Shape legend: B windows per batch, L tokens per window.

The test split (data.py: files chosen by a second hash of their path, at least
data.test_min_bytes where the corpus allows) is read here and nowhere else: no early stopping,
learning-rate or preset choice may look at it, so the number it gives is a fair estimate of the
model on unseen files. Every token of the split after its first is scored exactly once: the
stream is cut into non-overlapping windows of data.seq_len targets (the last one shorter), each
window predicting its tokens from the ones before it inside the window.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from moekit.train.data import LMData, all_windows, bits_per_byte  # noqa: F401  (all_windows: re-exported)
from moekit.train.steps import lm_loss_sum, scored

# Windows per test batch, in training batches: a no-grad forward keeps no activations for a
# backward, so a few training batches at once fit where one training step does, in fewer calls.
EVAL_BATCH_FACTOR = 4


@torch.no_grad()
def evaluate_test(model: nn.Module, data: LMData, device: torch.device, ctx) -> dict | None:
    """Scores of the whole test split ({test_loss, test_bpb, test_tokens, test_bytes, seconds}),
    or None when the corpus has no test split (data.test_fraction=0 and data.test_min_bytes=0).
    Only trained targets count: a target of -100 (a fine-tuning prompt) is neither scored nor
    counted in tokens or bytes."""
    batches = data.test_batches(EVAL_BATCH_FACTOR * data.cfg.batch_size)
    if batches is None:
        return None
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    nats, count, nbytes = 0.0, 0, 0
    try:
        with torch.random.fork_rng(devices=[]):  # like validation: the training RNG must not move
            for x_BL, y_BL in batches:
                x_BL, y_BL = x_BL.to(device), y_BL.to(device)
                with ctx:
                    out = model(x_BL)
                nats += float(lm_loss_sum(out.logits, y_BL))
                n, b = scored(y_BL, data.token_bytes)
                count, nbytes = count + n, nbytes + b
    finally:
        model.train(was_training)
    if count == 0:
        return None
    return {"test_loss": nats / count, "test_bpb": bits_per_byte(nats, nbytes), "test_tokens": count,
            "test_bytes": nbytes, **data.test_info(),
            "seconds": time.perf_counter() - t0, "torch_threads": torch.get_num_threads()}


def logged_test(records: list[dict], steps: int) -> dict | None:
    """The test record of the run that ended at `steps`, if the log holds it."""
    tests = [r for r in records if r.get("kind") == "test" and r.get("step") == steps]
    return tests[-1] if tests else None


def make_test_record(scores: dict, step: int, tokens: int, clock: dict) -> dict:
    """The metrics.jsonl record of a test evaluation: the eval records' clock fields (`clock`:
    time, cpu_time, elapsed) and the scores, without the evaluation's own duration, which only
    run.json's "test" holds (so the log stays record for record the same across a resume)."""
    return {"kind": "test", "step": step, "tokens": tokens, **clock,
            **{k: v for k, v in scores.items() if k != "seconds"}}
