"""`from_hf` and `to_hf`: Hugging Face folders <-> moekit decoder models.

Loading is checked before it is done: config.json is translated, every shard's header is read
and every tensor name is mapped, shape-checked and tiled onto our tensors (see keymap.py). Only
when all of that holds is the model allocated (uninitialised, in the target dtype) and filled one
tensor at a time, shard by shard, so the weights are held once plus the tensor in flight. Any
problem raises `CheckpointError` naming the file and the tensor; no half-loaded model escapes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from moekit.checkfiles import read_json
from moekit.hf import bert, deepseek_v3, llama, mixtral, olmoe, qwen2, qwen2_moe, qwen3_moe
from moekit.hf.common import Family, NotRepresentable
from moekit.hf.keymap import Slot, check_coverage
from moekit.hf.shards import CheckpointError, ShardSet, parse_size, remove_old_weights, write_shards
from moekit.models.decoder import DecoderConfig
from moekit.models.registry import build_model, uninitialised

# The order `to_hf` tries when no model_type is given (the families' configs exclude each other).
FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (mixtral.FAMILY, qwen2_moe.FAMILY, qwen3_moe.FAMILY, olmoe.FAMILY, deepseek_v3.FAMILY,
              llama.FAMILY, qwen2.FAMILY, bert.FAMILY)
}
SUPPORTED_MODEL_TYPES = tuple(sorted(FAMILIES))
# config.json fields carried through a conversion unchanged (our config has no place for them).
CARRIED_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
FLOAT_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
}
MAX_LISTED = 20


# ---------------------------------------------------------------------------------------------
# Families and configs


def family(model_type: str) -> Family:
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return FAMILIES[model_type]


def read_hf_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no config.json in {path}")
    hf = read_json(file)  # names the file when it is not a JSON object
    if "model_type" not in hf:
        raise CheckpointError(f"{file} has no model_type; is {path} a Hugging Face model folder?")
    return hf


def config_from_hf(path_or_config: str | Path | dict[str, Any]) -> DecoderConfig:
    """The moekit DecoderConfig a Hugging Face config.json (or its dict) describes."""
    hf = path_or_config if isinstance(path_or_config, dict) else read_hf_config(path_or_config)
    return family(hf.get("model_type")).config_from_hf(hf)


def config_to_hf(cfg: DecoderConfig, model_type: str | None = None) -> dict[str, Any]:
    """The config.json of `cfg` in the family `model_type`, or the one family that can express it."""
    return pick_family(cfg, model_type).config_to_hf(cfg)


def pick_family(cfg: DecoderConfig, model_type: str | None = None) -> Family:
    if not isinstance(cfg, DecoderConfig):
        raise TypeError(f"Hugging Face export needs a decoder model (DecoderConfig), got {type(cfg).__name__}")
    if model_type is not None:
        fam = family(model_type)
        fam.config_to_hf(cfg)  # raises NotRepresentable with the reason
        return fam
    reasons = []
    for fam in FAMILIES.values():
        try:
            fam.config_to_hf(cfg)
            return fam
        except NotRepresentable as err:
            reasons.append(str(err))
    raise NotRepresentable("no Hugging Face family can express this model:\n  " + "\n  ".join(reasons))


# ---------------------------------------------------------------------------------------------
# Model construction without initialisation


def _targets(model: nn.Module) -> dict[str, Tensor]:
    """Our persistent tensors by state-dict name, a tied tensor under its first name only."""
    out, seen = {}, set()
    for key, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[key] = t
    return out


def _float32_modules(model: nn.Module, fam: Family) -> None:
    if not fam.float32_modules:
        return
    rx = [re.compile(p) for p in fam.float32_modules]
    for name, module in model.named_modules():
        if any(r.fullmatch(name) for r in rx):
            module.float()


# ---------------------------------------------------------------------------------------------
# from_hf


def _resolve_dtype(dtype: Any, hf: dict, shards: ShardSet) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    if dtype not in (None, "auto"):
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be None, 'auto', a torch dtype or one of {list(FLOAT_DTYPES)}, got {dtype!r}")
        return FLOAT_DTYPES[dtype]
    stored = hf.get("dtype") or hf.get("torch_dtype")
    if isinstance(stored, str) and stored in FLOAT_DTYPES:
        return FLOAT_DTYPES[stored]
    for info in shards.tensors.values():
        if info.dtype in FLOAT_DTYPES.values():
            return info.dtype
    return torch.float32


def plan_load(fam: Family, cfg: DecoderConfig, hf: dict, shards: ShardSet) -> dict[str, tuple[str, Slot]]:
    """Map every tensor of the checkpoint onto the model `cfg` builds, or raise CheckpointError
    listing every problem (unmapped name, wrong shape, missing or doubled piece), each with its
    file and tensor. Uses a meta-device model: no memory."""
    with torch.device("meta"), uninitialised(torch.get_default_dtype()):
        meta = build_model(cfg)
    shapes = {k: tuple(t.shape) for k, t in _targets(meta).items()}
    plan: dict[str, tuple[str, Slot]] = {}
    pieces: dict[str, list[Slot]] = {}
    givers: dict[str, list[str]] = {}
    problems: list[str] = []
    for key, info in shards.tensors.items():
        if fam.keymap.ignored(key, hf) is not None:
            continue
        hit = fam.keymap.to_ours(key)
        if hit is None:
            problems.append(f"{info.file}: tensor {key!r} maps to nothing in the {fam.model_type} key map")
            continue
        ours, slot = hit
        if ours not in shapes:
            problems.append(
                f"{info.file}: tensor {key!r} maps to {ours}, which the model config.json describes does not have"
            )
            continue
        want = slot.shape(shapes[ours])
        if want != info.shape:
            problems.append(
                f"{info.file}: tensor {key!r} has shape {list(info.shape)}, expected {list(want) if want else '?'} "
                f"(for {ours}{slot.describe()} of shape {list(shapes[ours])}, from config.json)"
            )
            continue
        if not info.dtype.is_floating_point or info.dtype.itemsize == 1:
            problems.append(f"{info.file}: tensor {key!r} has dtype {info.dtype}; expected bf16/fp16/fp32 weights")
            continue
        plan[key] = (ours, slot)
        pieces.setdefault(ours, []).append(slot)
        givers.setdefault(ours, []).append(key)
    for problem in check_coverage(shapes, pieces):
        ours = problem.split(":", 1)[0]
        if "more than once" in problem:
            names = ", ".join(f"{k!r} ({shards.tensors[k].file})" for k in givers.get(ours, []))
            problems.append(f"{ours} is given more than once, by {names}")
        else:
            problems.extend(_missing(fam, ours, shapes, shards))
    if problems:
        shown = problems[:MAX_LISTED]
        more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise CheckpointError(
            f"cannot load {shards.folder} as {fam.model_type}: {len(problems)} problem(s); nothing was loaded\n  "
            + "\n  ".join(shown) + more
        )
    return plan


def _missing(fam: Family, ours: str, shapes: dict, shards: ShardSet) -> list[str]:
    """Name the HF tensors that would have provided the missing parts of `ours`."""
    expected = [hf for hf, key, _ in fam.keymap.to_hf({ours: shapes[ours]}) if key == ours]
    absent = [hf for hf in expected if hf not in shards]
    where = "the checkpoint" if len(shards.files) == 1 else f"any of the {len(shards.files)} shards"
    if not absent:  # partly given in another form (fused vs per expert)
        return [f"{ours}: only partly provided by the checkpoint"]
    return [f"missing tensor {hf!r} (for {ours}), not in {where}" for hf in absent]


def from_hf(path: str | Path, dtype: Any = None) -> nn.Module:
    """Load a Hugging Face folder (config.json + model.safetensors, or shards with
    model.safetensors.index.json) as a moekit DecoderLM, in eval mode.

    dtype: None or "auto" keeps the checkpoint's dtype (config.json's, else the first tensor's);
    or a torch dtype / "float32" / "bfloat16" / "float16". Routers that transformers keeps in
    float32 (DeepSeek-V3) stay float32.
    """
    folder = Path(path)
    hf = read_hf_config(folder)
    fam = family(hf.get("model_type"))
    try:
        cfg = fam.config_from_hf(hf)
    except (ValueError, TypeError) as err:
        if str(err).startswith("config.json"):
            raise
        raise type(err)(f"config.json ({fam.model_type}) in {folder} gives an invalid moekit config: {err}") from err
    shards = ShardSet(folder)
    plan = plan_load(fam, cfg, hf, shards)
    target_dtype = _resolve_dtype(dtype, hf, shards)
    with uninitialised(target_dtype):
        model = build_model(cfg)
    _float32_modules(model, fam)
    targets = _targets(model)
    with torch.no_grad():
        shards.fill(list(plan), lambda info: plan[info.name][1].view(targets[plan[info.name][0]]))
    model.eval()
    model.hf_source = {"model_type": fam.model_type, "dtype": str(target_dtype).removeprefix("torch."),
                       **{k: hf[k] for k in CARRIED_FIELDS if k in hf}}
    return model


# ---------------------------------------------------------------------------------------------
# to_hf


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside torch.compile / DDP wrappers."""
    while isinstance(getattr(model, "_orig_mod", None) or getattr(model, "module", None), nn.Module):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def model_family(model: nn.Module, model_type: str | None = None) -> Family:
    """The family `to_hf(model, ...)` writes: `model_type` if given, else the one the model was
    loaded from (if its config still fits it), else the only one that can express its config."""
    model = unwrap(model)
    cfg = getattr(model, "cfg", None)
    source = getattr(model, "hf_source", None) or {}
    if model_type is None and source.get("model_type") in FAMILIES:
        try:
            return pick_family(cfg, source["model_type"])
        except NotRepresentable:
            pass  # the model changed since it was loaded; find a family that fits
    return pick_family(cfg, model_type)


def to_hf(
    model: nn.Module,
    path: str | Path,
    max_shard_size: int | str = "5GB",
    model_type: str | None = None,
    dtype: Any = None,
) -> Path:
    """Write `model` as a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads:
    config.json plus model.safetensors, or shards of at most max_shard_size with
    model.safetensors.index.json. Experts are written per expert, as save_pretrained and the Hub
    store them. Earlier weights in the folder are replaced.

    model_type: the family to write (default: the one the model was loaded from, else the only
    one that can express its config). dtype: cast floating tensors on the way out (default: as
    they are), except those the family keeps in float32.
    """
    model = unwrap(model)
    cfg = getattr(model, "cfg", None)
    source = getattr(model, "hf_source", None) or {}
    fam = model_family(model, model_type)
    hf_cfg = fam.config_to_hf(cfg)
    hf_cfg.update({k: v for k, v in source.items() if k in CARRIED_FIELDS})
    out_dtype = None if dtype is None else _resolve_dtype(dtype, {}, None)
    max_bytes = parse_size(max_shard_size)

    targets = _targets(model)
    plan = fam.keymap.to_hf({k: tuple(t.shape) for k, t in targets.items()})
    keep32 = [re.compile(p) for p in fam.float32_modules]

    def dtype_of(ours: str, t: Tensor) -> torch.dtype:
        if out_dtype is None or not t.is_floating_point():
            return t.dtype
        if any(r.fullmatch(ours.rsplit(".", 1)[0]) for r in keep32):
            return torch.float32
        return out_dtype

    by_name = {hf: (ours, slot) for hf, ours, slot in plan}
    sizes = []
    for hf, ours, slot in plan:
        t = targets[ours]
        numel = 1
        for d in slot.shape(tuple(t.shape)):
            numel *= d
        sizes.append((hf, numel * dtype_of(ours, t).itemsize))

    def materialize(name: str) -> Tensor:
        ours, slot = by_name[name]
        t = targets[ours]
        return slot.view(t.detach()).to("cpu", dtype_of(ours, t), copy=True).contiguous()

    main = out_dtype or next((t.dtype for k, t in targets.items() if t.is_floating_point()), torch.float32)
    hf_cfg["torch_dtype"] = str(main).removeprefix("torch.")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    remove_old_weights(folder)
    write_shards(folder, sizes, materialize, max_bytes)
    (folder / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return folder
