"""Run presets: Python functions returning a RunConfig (model + data + optim + schedule + ...).

`moekit train --preset NAME` looks here first; any model preset name from `moekit.models`
(`moekit info` lists them) also works and gets the default training settings below.
"""

from __future__ import annotations

from collections.abc import Callable

from moekit.train.config import (
    CheckpointConfig,
    CompareConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
)

RUN_PRESETS: dict[str, Callable[[], RunConfig]] = {}


def run_preset(name: str):
    def wrap(fn):
        RUN_PRESETS[name] = fn
        return fn

    return wrap


def _model(name: str, **overrides):
    from moekit.models import get_preset

    return get_preset(name, **overrides)


@run_preset("tiny")
def tiny() -> RunConfig:
    """Seconds on a CPU: the `tiny` MoE LM on 2 MB of the standard library, for smoke tests."""
    return RunConfig(
        name="tiny",
        model=_model("tiny"),
        data=DataConfig(max_bytes=2_000_000, seq_len=128, batch_size=8),
        optim=OptimConfig(lr=3e-3),
        schedule=ScheduleConfig(steps=50, warmup_steps=5),
        eval=EvalConfig(every=25, batches=4),
        checkpoint=CheckpointConfig(every=25, keep_last=2),
        logging=LoggingConfig(every=5),
    )


def compare_model():
    """The MoE model of `moekit compare`: 8 experts, top-2, byte vocabulary, MoE in every layer.

    DeepSeek-V3 routing (sigmoid affinities, aux-loss-free bias balancing updated once per
    optimizer step, a small sequence-wise balance loss), with the routed output scaled by 2 = top_k
    so that at initialisation it has the size of the dense twins' FFN output. Sized so the three
    runs fit about 15 minutes on 2 CPU cores; measurements and the tuning history are in
    docs/results/compare.md.
    """
    from moekit.models import DecoderConfig

    return DecoderConfig(
        vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=512, max_seq_len=128,
        moe=dict(d_ff=256, num_experts=8, top_k=2, router="sigmoid_bias", aux_loss_coef=1e-4,
                 router_options=dict(bias_update="manual", routed_scaling_factor=2.0)),
    )


@run_preset("compare")
def compare() -> RunConfig:
    """What `moekit compare` (and `make demo`) trains: see compare_model()."""
    return RunConfig(
        name="compare",
        model=compare_model(),
        data=DataConfig(seq_len=128, batch_size=32),
        # Peak LRs: the best of a sweep over 2e-3..6e-3 with two seeds, per model family
        # (docs/results/compare.md): 3e-3 for the MoE, 5e-3 for the dense twins.
        optim=OptimConfig(lr=3e-3, weight_decay=0.1, grad_clip=1.0),
        compare=CompareConfig(dense_lr=5e-3),
        # 1250 steps (5.1M tokens) fill about 15 minutes on 2 cores with the three runs in two
        # processes; at 1000 steps the MoE's lead was 2.7% (docs/results/compare.md).
        schedule=ScheduleConfig(steps=1250, warmup_steps=30, min_lr_ratio=0.1),
        eval=EvalConfig(every=100, batches=16),
        checkpoint=CheckpointConfig(every=0, keep_last=1),
        logging=LoggingConfig(every=10),
    )


def get_run_preset(name: str) -> RunConfig:
    if name in RUN_PRESETS:
        return RUN_PRESETS[name]()
    from moekit.models import get_preset, list_presets

    if name in list_presets():
        return RunConfig(name=name, model=get_preset(name))
    raise ValueError(
        f"unknown preset {name!r}; run presets: {sorted(RUN_PRESETS)}; "
        f"model presets (default training settings): {list_presets()}"
    )


def describe_presets() -> list[tuple[str, str]]:
    return [(n, (fn.__doc__ or "").strip().splitlines()[0]) for n, fn in RUN_PRESETS.items()]
