"""The checkpoint directory format every moekit command reads and writes.

    DIR/config.json        the model config: `config_to_dict(cfg)` (fields + "arch"), or
                           {"preset": NAME, ...overrides}; a trainer may nest it as {"model": {...}}
    DIR/model.safetensors  the model's state dict (tied weights stored once)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_model
from torch import nn

from moekit.models.registry import build_model, config_from_dict, config_to_dict

# Wrappers that prefix state-dict keys: torch.compile and DistributedDataParallel.
_PREFIXES = ("_orig_mod.", "module.")


def save_model_checkpoint(model: nn.Module, directory: str | Path, extra: dict | None = None) -> Path:
    """Write a model checkpoint: config.json (model config, plus `extra` keys beside it) and
    model.safetensors. (A resumable training checkpoint is `train.checkpoint.save_training_checkpoint`.)"""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = config_to_dict(model.cfg)
    if extra:
        data = {"model": data, **extra}
    (directory / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    save_model(model, str(directory / "model.safetensors"))
    return directory


def read_config(directory: str | Path):
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in checkpoint directory {directory}")
    data = json.loads(path.read_text())
    if isinstance(data.get("model"), dict):
        data = data["model"]
    return config_from_dict(data)


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Build the model config.json describes and load model.safetensors into it (if present;
    without it the model keeps its random initialisation and a warning is the caller's job)."""
    directory = Path(directory)
    model = build_model(read_config(directory))
    weights = directory / "model.safetensors"
    if weights.is_file():
        load_state(model, load_file(str(weights), device=str(map_location)))
    return model.to(map_location)


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load that tolerates wrapper prefixes and a tied weight stored once."""
    clean = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        clean[key] = value
    result = model.load_state_dict(clean, strict=False)
    # A parameter shared by two names (tied embeddings) is satisfied by either name.
    by_tensor: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), []).append(name)
    missing = [
        k for k in result.missing_keys
        if not any(alias in clean for names in by_tensor.values() if k in names for alias in names)
    ]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected {result.unexpected_keys[:8]}{'...' if len(result.unexpected_keys) > 8 else ''}"
        )


# The name before the two checkpoint writers got names saying what each saves.
save_checkpoint = save_model_checkpoint
