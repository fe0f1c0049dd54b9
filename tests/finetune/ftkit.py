"""Small fine-tuning inputs for the tests: JSONL files and a tiny run config (a 2-layer
d_model-32 MoE LM with byte tokens)."""

from __future__ import annotations

import json
from pathlib import Path

from moekit.train.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
    apply_overrides,
)


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


def small_model():
    from moekit.models import DecoderConfig

    moe = dict(d_ff=32, num_experts=4, top_k=2, router="softmax_topk")
    return DecoderConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64, moe=moe)


def small_run(data_path: Path, *sets: str) -> RunConfig:
    cfg = RunConfig(
        name="ft-test",
        model=small_model(),
        threads=1,
        data=DataConfig(path=str(data_path), val_fraction=0.1, test_fraction=0.1, test_min_bytes=0, seq_len=32,
                        batch_size=2),
        optim=OptimConfig(lr=3e-3),
        schedule=ScheduleConfig(steps=6, warmup_steps=2),
        eval=EvalConfig(every=3, batches=2),
        checkpoint=CheckpointConfig(every=3, keep_last=3),
        logging=LoggingConfig(every=1, progress=False, tensorboard="off"),
    )
    return apply_overrides(cfg, list(sets))
