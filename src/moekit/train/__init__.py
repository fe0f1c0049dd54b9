"""moekit.train: run configs and presets, data, the training loop, checkpoints, compare and report.

    from moekit.train import get_run_preset, apply_overrides, train
    cfg = apply_overrides(get_run_preset("tiny"), ["optim.lr=1e-3"])
    result = train(cfg, "runs/tiny")       # result.losses, result.evals, result.final_val_bpb
"""

from moekit.train.config import RunConfig
from moekit.train.loop import TrainResult, train
from moekit.train.overrides import apply_overrides
from moekit.train.presets import get_run_preset

__all__ = ["RunConfig", "TrainResult", "apply_overrides", "get_run_preset", "train"]
