"""Small run configs for the trainer tests: a 2-layer d_model-32 MoE LM on ~200 KB of text."""

from __future__ import annotations

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


def small_model(**moe):
    from moekit.models import DecoderConfig

    moe_cfg = dict(d_ff=32, num_experts=4, top_k=2, router="softmax_topk")
    moe_cfg.update(moe)
    return DecoderConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=64, moe=moe_cfg)


def small_run(*sets: str, **moe) -> RunConfig:
    cfg = RunConfig(
        name="test",
        model=small_model(**moe),
        threads=1,
        data=DataConfig(max_bytes=200_000, seq_len=32, batch_size=2, test_min_bytes=16_000),  # a quick test evaluation
        optim=OptimConfig(lr=3e-3),
        schedule=ScheduleConfig(steps=6, warmup_steps=2),
        eval=EvalConfig(every=3, batches=2),
        checkpoint=CheckpointConfig(every=3, keep_last=3),
        logging=LoggingConfig(every=1, progress=False, tensorboard="off"),
    )
    return apply_overrides(cfg, list(sets))




def permissions_enforced(folder) -> bool:
    """Whether file modes bind this process: not for root with its usual capabilities (a test of a
    chmod-ed file skips then; run under `setpriv --bounding-set -dac_override,-dac_read_search`
    to exercise it as root)."""
    from pathlib import Path

    probe = Path(folder) / ".mode-probe"
    probe.write_text("x")
    probe.chmod(0)
    try:
        probe.read_text()
        return False
    except PermissionError:
        return True
    finally:
        probe.chmod(0o600)
        probe.unlink()
