"""Atomic checkpoints: safetensors files plus a JSON manifest, written to a temporary folder and
renamed into place, so a kill at any moment leaves every earlier checkpoint intact.

Layout of one checkpoint, `<out>/checkpoints/step-00000100/`:

    model.safetensors      model weights and persistent buffers (what `moekit generate` loads)
    config.json            the model config as a dict, plus "arch" (see `model_config_dict`)
    tokenizer.json         the tokenizer (byte-level: just its kind)
    optimizer.safetensors  AdamW moments and step counts, keyed "<param index>.<name>"
    trainer.safetensors    RNG states (torch CPU, CUDA) as uint8 tensors
    run_config.json        the whole run config
    manifest.json          written last: step, tokens, optimizer param groups, numpy/python RNG,
                           and the size and sha256 of every other file

A folder is complete when it is named `step-*` (the rename is the commit point) and its
manifest's hashes match; every loader (`--resume`, generate, info, inspect, convert, Python's
`load_checkpoint`) checks every hash the same way (`moekit.checkfiles.verify_manifest`) and names
the file that fails.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

# The manifest, its checks and the error type are shared with model checkpoints (checkfiles.py);
# the folder names and the resolver belong to the checkpoint format (models/io.py).
from moekit.checkfiles import (
    FORMAT_VERSION,
    MANIFEST,
    CheckpointError,
    file_entries,
    fsync_dir,
    verify_manifest,
    write_json,
)
from moekit.models.io import STEP_DIR, list_step_checkpoints, resolve_checkpoint

TMP_PREFIX = ".tmp-step-"

__all__ = [
    "FORMAT_VERSION", "STEP_DIR", "TMP_PREFIX", "Checkpoint", "CheckpointError", "latest", "list_checkpoints",
    "load_file_state", "load_model_weights", "load_training_state", "model_state", "prune", "remove_partial",
    "resolve", "save_checkpoint", "save_training_checkpoint", "verify",
]


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights and persistent buffers under their state_dict names.

    Tied weights (an LM head sharing the embedding) are stored under both names as separate
    copies: safetensors refuses shared storage, and a plain `load_state_dict(strict=True)` by any
    loader (`moekit generate`, user code) then just works; loading writes the same values twice.
    """
    state = {}
    seen: set[tuple] = set()
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        key = (t.data_ptr(), t.shape, t.stride(), t.dtype) if t.numel() else None
        t = t.contiguous().cpu()
        if key is not None and key in seen:
            t = t.clone()
        if key is not None:
            seen.add(key)
        state[name] = t
    return state


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    sd = optimizer.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                v = torch.tensor(v)
            tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
    return tensors, sd["param_groups"]


def _optimizer_state_dict(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": groups}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    py = random.getstate()
    np_state = np.random.get_state()
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npm = meta["numpy"]
    np.random.set_state((npm[0], np.asarray(npm[1], dtype=np.uint32), npm[2], npm[3], npm[4]))


@dataclass
class Checkpoint:
    path: Path
    manifest: dict

    @property
    def step(self) -> int:
        return int(self.manifest["step"])


def save_training_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    *,
    model_config: dict,
    run_config: dict,
    tokenizer,
    extra: dict | None = None,
    keep_last: int | None = None,
    write_extra: Callable[[Path], None] | None = None,
) -> Path:
    """Write the resumable training checkpoint `step` under `root` atomically (model, optimizer,
    RNG states, configs, tokenizer, manifest); returns its folder. (A model alone, for
    inference, is `models.io.save_model_checkpoint`.) `write_extra(folder)` adds files of the
    caller's to the temporary folder; the manifest hashes them with the rest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f"{TMP_PREFIX}{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_file(model_state(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2))
        tokenizer.save(tmp)
        groups: list[dict] = []
        if optimizer is not None:
            opt_tensors, groups = _optimizer_tensors(optimizer)
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, str(tmp / "trainer.safetensors"))
        (tmp / "run_config.json").write_text(json.dumps(run_config, indent=2))
        if write_extra is not None:
            write_extra(tmp)
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "files": file_entries(tmp),  # every file above, fsynced, with its size and sha256
            "optimizer_param_groups": groups,
            "rng": rng_meta,
            **(extra or {}),
        }
        write_json(tmp / MANIFEST, manifest)
        fsync_dir(tmp)
    except Exception as err:
        # A full disk or an unwritable folder: nothing was committed, the earlier checkpoints are
        # whole; drop the partial folder and say so in one line (safetensors' own errors name no file).
        shutil.rmtree(tmp, ignore_errors=True)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise CheckpointError(f"could not write checkpoint {final} ({reason}); the earlier checkpoints in {root} "
                              f"are intact: free space or fix the folder, then --resume") from err
    if final.exists():  # the same step saved again (a resumed run): swap, then drop the old one
        old = root / f".old-step-{step:08d}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)  # the commit point
    fsync_dir(root)
    (root / "LATEST.tmp").write_text(final.name + "\n")
    os.replace(root / "LATEST.tmp", root / "LATEST")
    if keep_last is not None:
        prune(root, keep_last)
    return final


# The name before the two checkpoint writers got names saying what each saves.
save_checkpoint = save_training_checkpoint


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every committed checkpoint folder, oldest first."""
    return list_step_checkpoints(root)


def prune(root: Path, keep_last: int) -> None:
    ckpts = list_checkpoints(root)
    for _, p in ckpts[: max(0, len(ckpts) - keep_last)]:
        shutil.rmtree(p, ignore_errors=True)


def remove_partial(root: Path) -> list[Path]:
    """Delete temporary folders a killed save left behind; returns what was removed."""
    removed = []
    root = Path(root)
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and (p.name.startswith(TMP_PREFIX) or p.name.startswith(".old-step-")):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def verify(path: Path) -> Checkpoint:
    """Check the manifest and every file's size and hash (the same check every loader makes);
    a training checkpoint's manifest also records its step. Raises CheckpointError naming the file."""
    path = Path(path)
    manifest = verify_manifest(path)
    if "step" not in manifest:
        raise CheckpointError(f"{path / MANIFEST} has no 'step': a model checkpoint, not a training checkpoint")
    return Checkpoint(path, manifest)


def resolve(path: Path) -> Path:
    """A checkpoint folder from a checkpoint, a `checkpoints/` folder or a run folder (its newest,
    verified): `moekit.models.io.resolve_checkpoint`."""
    return resolve_checkpoint(path).path


def latest(root: Path) -> Checkpoint | None:
    """The newest committed checkpoint under `root`, verified; None when there is none.

    A newest checkpoint that fails verification is an error, not a reason to fall back silently.
    """
    ckpts = list_checkpoints(root)
    if not ckpts:
        return None
    return verify(ckpts[-1][1])


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"corrupt checkpoint: cannot read {path}: {err}") from None


def load_model_weights(model: nn.Module, ckpt_dir: Path, strict: bool = True) -> None:
    """Load model.safetensors into `model`, naming the file when keys or shapes do not match."""
    path = Path(ckpt_dir) / "model.safetensors"
    if not path.exists():
        raise CheckpointError(f"incomplete checkpoint: {path} is missing")
    state = _load_tensors(path)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise CheckpointError(f"{path} does not match the model: {err}") from None
    if strict and (missing or unexpected):
        raise CheckpointError(f"{path} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def load_training_state(ckpt: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    load_model_weights(model, ckpt.path)
    if optimizer is not None:
        path = ckpt.path / "optimizer.safetensors"
        if not path.exists():
            raise CheckpointError(f"incomplete checkpoint: {path} is missing (needed to resume)")
        sd = _optimizer_state_dict(_load_tensors(path), ckpt.manifest["optimizer_param_groups"])
        try:
            optimizer.load_state_dict(sd)
        except (ValueError, KeyError) as err:
            raise CheckpointError(f"{path} does not match the optimizer: {err}") from None
    rng_path = ckpt.path / "trainer.safetensors"
    if not rng_path.exists():
        raise CheckpointError(f"incomplete checkpoint: {rng_path} is missing (needed to resume)")
    set_rng_state(_load_tensors(rng_path), ckpt.manifest["rng"])


def load_file_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's model.safetensors (for comparisons and tools)."""
    return _load_tensors(Path(ckpt_dir) / "model.safetensors")
