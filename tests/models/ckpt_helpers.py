"""Checkpoints to break: a tiny decoder saved as a model checkpoint or as a run's training
checkpoints, and a way to flip bytes inside one named tensor."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from moekit.models import build_model, config_to_dict, get_preset, save_model_checkpoint


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_preset("tiny")).eval()


def model_checkpoint(folder: Path, seed: int = 0) -> Path:
    return save_model_checkpoint(tiny(seed), folder)


def run_folder(run: Path, steps=(4, 8), seed: int = 0) -> Path:
    """A run folder with training checkpoints at `steps` (each from a different seed's weights)."""
    from moekit.tokenizer import ByteTokenizer
    from moekit.train.checkpoint import save_training_checkpoint

    for i, step in enumerate(steps):
        model = tiny(seed + i)
        save_training_checkpoint(run / "checkpoints", step, model, None, model_config=config_to_dict(model.cfg),
                                 run_config={"data": {"seq_len": 16}}, tokenizer=ByteTokenizer())
    return run


def flip_tensor_byte(path: Path, name: str) -> None:
    """Flip the bits of one byte in the middle of tensor `name`'s data (size unchanged)."""
    raw = bytearray(path.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    begin, end = json.loads(raw[8:8 + n])[name]["data_offsets"]
    raw[8 + n + (begin + end) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
