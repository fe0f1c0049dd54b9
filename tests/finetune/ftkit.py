"""Small fine-tuning inputs for the tests: JSONL files and a tiny run config (a 2-layer
d_model-32 MoE LM with byte tokens)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from trainkit import small_model  # noqa: F401  (the finetune tests' model too)
from trainkit import small_run as lm_small_run

from moekit.train.config import DataConfig, RunConfig, apply_overrides


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def pairs(n: int = 120) -> list[dict]:
    """Prompt/response examples with a learnable rule, plus some plain texts."""
    rows = []
    for i in range(n):
        if i % 4 == 3:
            rows.append({"text": f"# note {i}: multiply by {i % 7}\n"})
        else:
            rows.append({"prompt": f"def times_{i}(x):\n", "response": f"    return x * {i % 7}\n"})
    return rows


def small_run(data_path: Path, *sets: str) -> RunConfig:
    """trainkit's small run (a 2-layer d_model-32 MoE LM, 6 steps) on a JSONL file's splits."""
    cfg = dataclasses.replace(
        lm_small_run(), name="ft-test",
        data=DataConfig(path=str(data_path), val_fraction=0.1, test_fraction=0.1, test_min_bytes=0, seq_len=32,
                        batch_size=2))
    return apply_overrides(cfg, list(sets))
