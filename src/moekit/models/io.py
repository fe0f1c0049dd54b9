"""The checkpoint folder format every moekit command reads and writes, and the one resolver and
the one checked loader behind every `--checkpoint PATH`.

    DIR/config.json        the model config: `config_to_dict(cfg)` (fields + "arch"), or
                           {"preset": NAME, ...overrides}; a writer may nest it as {"model": {...}}
    DIR/model.safetensors  the model's state dict (tied weights stored once)
    DIR/manifest.json      written last: the size and sha256 of every other file (see
                           `moekit.checkfiles`); a training checkpoint adds its optimizer, RNG
                           state and step (`train/checkpoint.py`)

A run folder keeps its checkpoints in `RUN/checkpoints/step-NNNNNNNN` (8 digits, `STEP_DIR`).
`resolve_checkpoint(PATH)` takes a checkpoint folder, a run folder or its `checkpoints/` folder
(the newest checkpoint, by step number, which must be intact: a damaged newest one is an error
unless `fallback=True` picks the newest intact older one and says which it skipped), or a
Hugging Face folder (config.json with "model_type", no manifest: `moekit.hf` reads those).
Loading verifies the manifest first: every file's size and sha256, so a flipped bit in a weight
is an error naming the file, never garbage output. A folder without a manifest is incomplete.
Checkpoints written by moekit before manifests existed have none: `add_manifest(DIR)` records
the files as they are (after checking they parse), or `load_checkpoint(DIR, verify=False)`
loads without the check; the command line always verifies.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from moekit.checkfiles import (
    MANIFEST,
    CheckpointError,
    OutputFolderError,
    atomic_folder,
    is_empty_dir,
    read_json,
    verify_manifest,
    write_manifest,
)
from moekit.models.quantize import prepare_quantized
from moekit.models.registry import build_model, config_from_dict, config_to_dict, uninitialised
from moekit.tensorfile import MappedFile, TensorInfo, read_header, read_into, scratch_buffer

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STEP_DIR = re.compile(r"^step-(\d{8})$")
# Wrappers that prefix state-dict keys: torch.compile and DistributedDataParallel.
_PREFIXES = ("_orig_mod.", "module.")

__all__ = [
    "CONFIG", "STEP_DIR", "WEIGHTS", "CheckpointError", "CheckpointRef", "add_manifest", "list_step_checkpoints",
    "load_checkpoint", "load_model", "load_state", "read_config", "resolve_checkpoint", "save_checkpoint",
    "save_model_checkpoint",
]


# ---------------------------------------------------------------------------------------------
# Writing


def save_model_checkpoint(
    model: nn.Module,
    directory: str | Path,
    extra: dict | None = None,
    *,
    files: Mapping[str, str | Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model checkpoint atomically: config.json (model config, plus `extra` keys beside it),
    model.safetensors, copies of `files` ({name in the checkpoint: source path}, e.g. tokenizer
    files) and the manifest, into a temporary folder beside `directory` that is renamed to it.

    `directory` must be new or empty; `overwrite=True` replaces an existing checkpoint or model
    folder (one with config.json or manifest.json), never any other non-empty folder. (A
    resumable training checkpoint is `train.checkpoint.save_training_checkpoint`.)
    """
    directory = Path(directory)
    if directory.is_dir() and not is_empty_dir(directory):
        if not overwrite:
            raise OutputFolderError(
                f"{directory} is not empty; save to a new or empty folder (overwrite=True replaces a checkpoint)"
            )
        if not _is_model_folder(directory):
            raise OutputFolderError(
                f"{directory} is not empty and holds no checkpoint (no {CONFIG} or {MANIFEST}); "
                f"overwrite=True only replaces a checkpoint: save to a new or empty folder"
            )
    for name in files or {}:
        if name in (CONFIG, WEIGHTS, MANIFEST) or "/" in name or name in ("", ".", ".."):
            raise ValueError(f"files: {name!r} is not a name a checkpoint can hold beside its own files")
    data = config_to_dict(model.cfg)
    if getattr(model, "quantization", None):  # models/quantize.py: how to rebuild the packed modules
        extra = {**(extra or {}), "quantization": model.quantization}
    if extra:
        data = {"model": data, **extra}
    with atomic_folder(directory, replace=overwrite) as tmp:
        (tmp / CONFIG).write_text(_json(data))
        save_model(model, str(tmp / WEIGHTS))
        for name, src in (files or {}).items():
            shutil.copyfile(src, tmp / name)
        write_manifest(tmp, {"kind": "model"})
    return directory


def _json(data) -> str:
    return json.dumps(data, indent=2) + "\n"


def _is_model_folder(path: Path) -> bool:
    return (path / CONFIG).is_file() or (path / MANIFEST).is_file()


def add_manifest(directory: str | Path) -> dict:
    """Record the files of a model checkpoint written before moekit wrote manifests (config.json +
    model.safetensors, no manifest.json), after checking that both parse and fit together.
    Use it on checkpoints you trust: it vouches for the bytes as they are now."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        raise CheckpointError(f"{directory / MANIFEST} exists already; nothing to add")
    model = prepare_quantized(build_model(read_config(directory)), directory / CONFIG)
    _load_weights(model, directory)
    return write_manifest(directory, {"kind": "model"})


# ---------------------------------------------------------------------------------------------
# Finding the checkpoint a PATH means


@dataclass(frozen=True)
class CheckpointRef:
    """The checkpoint a PATH resolved to.

    kind: "moekit" (verified unless resolved with verify=False) or "hf" (a Hugging Face folder,
    whose files `moekit.hf` checks when it reads them). note: which checkpoint is used and why,
    for the user (empty when PATH named the checkpoint itself). skipped: newer checkpoints
    passed over with fallback=True, each with the reason.
    """

    path: Path
    kind: str
    manifest: dict | None = None
    note: str = ""
    skipped: tuple[tuple[Path, str], ...] = field(default=())


def list_step_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step-NNNNNNNN` folder under `root`, oldest first (by number)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _is_hf_folder(path: Path) -> bool:
    """A folder with a Hugging Face config.json ("model_type") and no moekit manifest. A
    config.json that is not a JSON object is an error naming it."""
    if (path / MANIFEST).exists() or not (path / CONFIG).is_file():
        return False
    data = read_json(path / CONFIG)
    return "model_type" in data and not {"arch", "preset", "model"} & set(data)


def _is_checkpoint_folder(path: Path) -> bool:
    return (
        STEP_DIR.match(path.name) is not None
        or any((path / name).exists() for name in (MANIFEST, CONFIG, WEIGHTS))
    )


def resolve_checkpoint(path: str | Path, *, fallback: bool = False, verify: bool = True) -> CheckpointRef:
    """The checkpoint PATH means: PATH itself when it is a checkpoint or Hugging Face folder, else
    the newest `step-NNNNNNNN` under PATH/checkpoints or PATH. A moekit checkpoint is verified
    (manifest, every file's size and sha256; `verify=False` skips this). A damaged newest
    checkpoint is an error, unless `fallback`: then the newest intact one is used and the
    skipped ones are reported in `skipped` and `note`. Errors are CheckpointError naming the
    folder or file."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: it does not exist")
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path}: it is a file; give a checkpoint or run folder")
    if _is_checkpoint_folder(path):
        if _is_hf_folder(path):
            return CheckpointRef(path, "hf")
        return CheckpointRef(path, "moekit", verify_manifest(path) if verify else None)
    for root in (path / "checkpoints", path):
        found = list_step_checkpoints(root)
        if found:
            break
    else:
        odd = sorted(p.name for r in (path / "checkpoints", path) if r.is_dir() for p in r.glob("step-*"))
        hint = f" ({', '.join(odd[:3])} do not match: checkpoint folders are named step- and 8 digits)" if odd else ""
        raise CheckpointError(
            f"no checkpoint found in {path}: no {MANIFEST} or {CONFIG} there, and no step-NNNNNNNN folder in "
            f"{path / 'checkpoints'} or {path}{hint}"
        )
    newest = found[-1][1]
    if not verify:
        return CheckpointRef(newest, "moekit", None, f"using {newest}: the newest of {len(found)} checkpoint(s) "
                             f"in {root} (not verified)")
    skipped: list[tuple[Path, str]] = []
    for _, candidate in reversed(found):
        try:
            manifest = verify_manifest(candidate)
        except CheckpointError as err:
            if not fallback:
                older = len(found) - 1
                raise CheckpointError(
                    f"the newest checkpoint in {root} is damaged: {err}; "
                    + (f"pass --fallback (fallback=True in Python) to use the newest intact one of the {older} "
                       f"older checkpoint(s), or name a checkpoint folder" if older else "it is the only one")
                ) from None
            skipped.append((candidate, str(err)))
            continue
        if skipped:
            note = (f"using {candidate}: the newest intact checkpoint in {root} "
                    f"(skipped {len(skipped)} damaged newer one(s), --fallback)")
        else:
            note = f"using {candidate}: the newest of {len(found)} checkpoint(s) in {root}"
        return CheckpointRef(candidate, "moekit", manifest, note, tuple(skipped))
    raise CheckpointError(
        f"no intact checkpoint in {root}: all {len(found)} are damaged (the newest: {skipped[0][1]})"
    )


# ---------------------------------------------------------------------------------------------
# Reading


def read_config(directory: str | Path):
    """The model config of a checkpoint folder's config.json (errors name the file)."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG} in checkpoint folder {directory}")
    data = read_json(path)
    if isinstance(data.get("model"), dict):
        data = data["model"]
    try:
        return config_from_dict(data)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def load_model(
    ref: CheckpointRef,
    map_location: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | str | None = None,
    mmap: bool = False,
) -> nn.Module:
    """Build the model of a resolved moekit checkpoint and load its weights (the manifest was
    checked when `ref` was resolved). Weights are required: a checkpoint without them is
    incomplete, not a model with random weights.

    The model is built without initialisation in the target dtype and its tensors are filled
    straight from the file (see `moekit.tensorfile`): peak memory is the weights once. dtype:
    None = float32 (what training writes), "auto" = the dtype most of the stored floating-point
    bytes have, or a torch dtype / "float32" / "bfloat16" / "float16".

    mmap=True: a CPU tensor stored in its target dtype becomes a copy-on-write view of the file
    instead of a copy (loading copies nothing; pages come in from the page cache when first read,
    and changing the model never changes the file). Off by default: a view starts wherever the
    file puts the tensor, not at the 64-byte boundary torch's allocator gives, and the CPU matrix
    kernels then take other code paths, so outputs can differ from the saved model's in the last
    bits (under 1e-6 in the tiny preset's logits, tests/models/test_load_memory.py). Without it the
    outputs are bit-equal.
    """
    if ref.kind != "moekit":
        raise CheckpointError(f"{ref.path} is a Hugging Face folder: load it with moekit.hf.from_hf")
    if (ref.path / "finetune.json").is_file():  # its weights are the adapted model's, its config the base's
        raise CheckpointError(f"{ref.path} is a `moekit finetune` checkpoint (a base plus adapters): load it with "
                              f"moekit.finetune.load_finetuned")
    if ref.manifest is not None:
        listed = ref.manifest.get("files", {})
        for name in (CONFIG, WEIGHTS):
            if name not in listed:
                raise CheckpointError(f"incomplete checkpoint: {ref.path / name} is not in {ref.path / MANIFEST}")
    cfg = read_config(ref.path)
    weights = ref.path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"incomplete checkpoint: {weights} is missing (the checkpoint holds no weights)")
    stored = read_header(weights, str(weights))
    target = _target_dtype(dtype, stored)
    device = torch.device(map_location)
    # Built on the CPU, where untouched pages cost nothing, so that a quantized checkpoint's float
    # modules, swapped out by prepare_quantized, never take memory on `device`.
    with torch.device("cpu"), uninitialised(target):
        model = prepare_quantized(build_model(cfg), ref.path / CONFIG)
    _keep_stored_precision(model, stored, target)
    if device.type != "cpu":
        model = model.to(device)
    try:
        fill_state(model, weights, stored, mmap=mmap and device.type == "cpu")
    except ValueError as err:
        raise CheckpointError(f"{weights} does not fit the model {ref.path / CONFIG} describes: {err}") from None
    return model


def load_checkpoint(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    verify: bool = True,
    dtype: torch.dtype | str | None = None,
    mmap: bool = False,
) -> nn.Module:
    """The model of a checkpoint folder, or of a run folder's newest checkpoint, verified against
    its manifest first. `verify=False` loads without the check (a checkpoint written by an older
    moekit, which has no manifest): an escape hatch for files you trust. dtype and mmap: see
    `load_model`."""
    return load_model(resolve_checkpoint(directory, verify=verify), map_location, dtype=dtype, mmap=mmap)


_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _main_dtype(stored: dict[str, TensorInfo]) -> torch.dtype | None:
    """The dtype most of a checkpoint's floating-point weight bytes have (quantization scales,
    float32 by format, do not vote)."""
    by_dtype: dict[torch.dtype, int] = {}
    for name, info in stored.items():
        if info.dtype.is_floating_point and not name.endswith("_scale"):
            by_dtype[info.dtype] = by_dtype.get(info.dtype, 0) + info.nbytes
    return max(by_dtype, key=by_dtype.get) if by_dtype else None


def _keep_stored_precision(model: nn.Module, stored: dict[str, TensorInfo], target: torch.dtype) -> None:
    """A checkpoint whose weights are mostly in a narrower dtype but stores some in float32 kept
    those so on purpose (DeepSeek-V3's router and its bias, as transformers keeps them): they
    stay float32 rather than being rounded to `target`. A float32 checkpoint is cast whole."""
    main = _main_dtype(stored)
    if main is None or main == torch.float32 or target == torch.float32:
        return
    by_key = {_clean_key(k): info for k, info in stored.items()}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        for table in (module._parameters, module._buffers):
            for attr, t in table.items():
                info = by_key.get(prefix + attr)
                if (t is not None and info is not None and info.dtype == torch.float32
                        and t.dtype in (torch.bfloat16, torch.float16)):
                    wide = torch.empty(t.shape, dtype=torch.float32, device=t.device)
                    if isinstance(t, nn.Parameter):
                        t.data = wide
                    else:
                        table[attr] = wide


def _target_dtype(dtype, stored: dict[str, TensorInfo]) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _FLOATS:
            raise ValueError(f"dtype must be one of float32, bfloat16, float16, float64, got {dtype}")
        return dtype
    if dtype == "auto":
        return _main_dtype(stored) or torch.float32
    if dtype in _DTYPE_NAMES:
        return _DTYPE_NAMES[dtype]
    raise ValueError(f"dtype must be None, 'auto', a torch dtype or one of {list(_DTYPE_NAMES)}, got {dtype!r}")


def _load_weights(model: nn.Module, directory: Path) -> None:
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"incomplete checkpoint: {weights} is missing (the checkpoint holds no weights)")
    try:
        fill_state(model, weights, read_header(weights, str(weights)), mmap=False)
    except ValueError as err:
        raise CheckpointError(f"{weights} does not fit the model {directory / CONFIG} describes: {err}") from None


def _mismatch(missing: list[str], unexpected: list[str]) -> ValueError:
    return ValueError(
        f"checkpoint does not match the model: missing {missing[:8]}{'...' if len(missing) > 8 else ''}, "
        f"unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
    )


def _clean_key(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def fill_state(model: nn.Module, path: Path, stored: dict[str, TensorInfo], *, mmap: bool) -> None:
    """Fill every persistent tensor of `model` from the safetensors file `path` (its checked
    header `stored`), strictly: a tensor the file lacks or a name the model lacks is a ValueError
    listing them; a tied weight stored once under either name is fine. A floating-point tensor
    is cast to the model's dtype on the way in; mapped (`mmap`) where the dtypes already agree."""
    names = {}  # state-dict name -> (module, attribute, kind)
    for mod_name, module in model.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for attr, p in module._parameters.items():
            if p is not None:
                names[prefix + attr] = (module, attr, "p")
        for attr, b in module._buffers.items():
            if b is not None and attr not in module._non_persistent_buffers_set:
                names[prefix + attr] = (module, attr, "b")
    by_key: dict[str, TensorInfo] = {}
    for k, info in stored.items():
        key = _clean_key(k)
        if key in by_key:
            raise ValueError(f"tensors {by_key[key].name!r} and {k!r} both name {key!r} (a wrapper prefix); "
                             f"the checkpoint must hold one of them")
        by_key[key] = info
    unexpected = [k for k in by_key if k not in names]
    filled: set[int] = set()
    for key in by_key:
        if key in names:
            module, attr, kind = names[key]
            filled.add(id(getattr(module, attr)))
    missing = [k for k, (m, a, _) in names.items() if id(getattr(m, a)) not in filled]
    if missing or unexpected:
        raise _mismatch(missing, unexpected)
    mapped = MappedFile(path) if mmap else None
    scratch = scratch_buffer()
    with path.open("rb") as fh, torch.no_grad():
        for key, info in sorted(by_key.items(), key=lambda kv: kv[1].offset):
            module, attr, kind = names[key]
            current = getattr(module, attr)
            if tuple(current.shape) != info.shape:
                raise ValueError(f"tensor {key!r} has shape {list(info.shape)}, the model's is {list(current.shape)}")
            view = mapped.tensor(info) if mapped is not None and current.dtype == info.dtype else None
            if view is None:
                read_into(fh, info, current, scratch=scratch)
            elif kind == "p":
                current.data = view
            else:
                module._buffers[attr] = view


def load_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Strict load that tolerates wrapper prefixes and a tied weight stored once."""
    clean = {_clean_key(key): value for key, value in state.items()}
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
        raise _mismatch(missing, result.unexpected_keys)


# The name before the two checkpoint writers got names saying what each saves.
save_checkpoint = save_model_checkpoint
