"""What `--resume` needs to decide before training: the checkpoint to continue from, whether the
settings still describe the same run, and whether the run had already finished (its final
evaluation, and its test evaluation when eval.test is on, are in the log)."""

from __future__ import annotations

import shutil
from pathlib import Path

from moekit.train import checkpoint as ckpt
from moekit.train.config import diff_dicts
from moekit.train.metrics import read_jsonl
from moekit.train.testeval import logged_test

# Resuming with a different value of these would not continue the same run.
RESUME_MUST_MATCH = ("model", "data", "seed", "optim.grad_accum")


def resume_point(ck_root: Path, resume: bool, overwrite: bool, main: bool) -> ckpt.Checkpoint | None:
    """The checkpoint to continue from (`resume`). A fresh run refuses to mix its checkpoints with
    an older run's, unless `overwrite` deletes them. Only the main rank (which holds the folder's
    lock) deletes anything: leftover temporary folders of a killed save, overwritten checkpoints."""
    existing = ckpt.list_checkpoints(ck_root)
    if existing and not resume and not overwrite:
        raise ValueError(
            f"{ck_root} already holds checkpoints (newest step {existing[-1][0]}); pass --resume to "
            f"continue that run, or choose another --out"
        )
    if resume:
        if main:
            ckpt.remove_partial(ck_root)
        resume_from = ckpt.latest(ck_root)  # raises CheckpointError naming the bad file
        if resume_from is None:
            raise ckpt.CheckpointError(f"--resume: no checkpoint in {ck_root}; run without --resume to start fresh")
        return resume_from
    if overwrite and main:
        for _, p in existing:
            shutil.rmtree(p)
    return None


def check_resume_config(saved: dict, current: dict) -> list[str]:
    diffs = diff_dicts(saved, current)
    fatal = [d for d in diffs if any(d == k or d.startswith(k + ".") for k in RESUME_MUST_MATCH)]
    if fatal:
        raise ValueError(
            f"--resume: the checkpoint was trained with different {', '.join(fatal[:8])}; "
            f"resuming would not continue the same run (use the same preset and --set values)"
        )
    return diffs


def final_eval_logged(log_path: Path, steps: int) -> tuple[list[dict] | None, dict | None]:
    """(the eval records up to `steps` when the log holds the final one (at `steps`), else None;
    the test record at `steps` or None)."""
    records = read_jsonl(log_path)
    evals = [r for r in records if r.get("kind") == "eval" and r.get("step", 0) <= steps]
    return (evals if evals and evals[-1]["step"] == steps else None), logged_test(records, steps)
