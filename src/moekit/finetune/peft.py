"""PEFT-format LoRA adapters for moekit models: `save_adapter` writes adapter_config.json and
adapter_model.safetensors for the transformers model that `moekit.hf.to_hf(model)` writes, so
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), adapter_dir)` gives
moekit's logits; `load_adapter` reads one back (or one PEFT wrote) into a moekit model with
matching LoRA. How moekit's factors map onto PEFT's layout for fused experts, and the PEFT facts
that map rests on: `finetune/peft_layout.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from moekit.checkfiles import CheckpointError, read_json, write_atomic, write_json
from moekit.finetune.peft_layout import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PREFIX,
    Pair,
    Plan,
    compress_targets,
    plan_adapters,
    resolve_family,
    saved_modules,
)
from moekit.hf.api import FAMILIES, family, model_family
from moekit.hf.common import NotRepresentable

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "load_adapter", "save_adapter"]


@torch.no_grad()
def save_adapter(model: nn.Module, directory: str | Path, *, hf_family: str | None = None) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter (adapter_config.json and
    adapter_model.safetensors, each replaced atomically) for the transformers model that
    `moekit.hf.to_hf(model, ..., model_type=hf_family)` writes; returns the folder."""
    who = "save_adapter"
    fam = resolve_family(model, hf_family, who)
    plan = plan_adapters(model, fam, who)
    saved = saved_modules(model, plan, who)
    tensors: dict[str, Tensor] = {}
    for p in plan.pairs:
        a, b = p.get()
        tensors[f"{PREFIX}{p.module}.lora_A.weight"] = a.to("cpu", copy=True).contiguous()
        tensors[f"{PREFIX}{p.module}.lora_B.weight"] = b.to("cpu", copy=True).contiguous()
    for keys in saved.values():
        for key in keys:
            tensors[PREFIX + plan.hf_names[key]] = plan.tensors[key].detach().to("cpu", copy=True).contiguous()

    universe_modules = {n.rpartition(".")[0] for n in plan.hf_names.values()}
    universe_params = set(plan.hf_names.values())
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": None,
        "revision": None,
        "inference_mode": True,
        "r": plan.rank,
        "lora_alpha": plan.alpha,
        "lora_dropout": plan.dropout,
        "use_rslora": plan.rslora,
        "target_modules": compress_targets({p.target for p in plan.pairs if p.kind == "module"}, universe_modules),
        "target_parameters": compress_targets({p.target for p in plan.pairs if p.kind == "parameter"}, universe_params)
        or None,
        "modules_to_save": compress_targets(set(saved), universe_modules) or None,
        "bias": "none",
        "lora_bias": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
        "layers_to_transform": None,
        "layers_pattern": None,
        "exclude_modules": None,
    }
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / ADAPTER_WEIGHTS, save_safetensors(tensors, metadata={"format": "pt"}))
    write_json(folder / ADAPTER_CONFIG, config)  # last: a folder with a config has its weights
    return folder


# ---------------------------------------------------------------------------------------------
# load


def _read_adapter(folder: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder {folder} does not exist")
    cfg = read_json(folder / ADAPTER_CONFIG)
    file = folder / ADAPTER_WEIGHTS
    if not file.is_file():
        hint = " (adapter_model.bin is a pickle: re-save it with safe_serialization=True)" if (
            folder / "adapter_model.bin").exists() else ""
        raise CheckpointError(f"{file} is missing{hint}")
    try:
        tensors = load_safetensors(file.read_bytes())
    except (SafetensorError, ValueError) as err:
        raise CheckpointError(f"{file} is not a readable safetensors file ({err})") from None
    return cfg, tensors


def _check_config(cfg: dict[str, Any], plan: Plan, file: Path) -> None:
    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{file}: {field}={cfg.get(field)!r} {why}")

    if cfg.get("peft_type") != "LORA":
        raise bad("peft_type", "is not a LoRA adapter (expected 'LORA')")
    for field, ok in (("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False)):
        if bool(cfg.get(field, False)) != ok:
            raise bad(field, "is not supported by moekit's LoRA")
    if cfg.get("bias", "none") != "none":
        raise bad("bias", "(trained biases) is not supported by moekit's LoRA; expected 'none'")
    for field in ("rank_pattern", "alpha_pattern"):
        if cfg.get(field):
            raise bad(field, "(per-module ranks) is not supported: moekit's adapters share one rank and alpha")
    r, alpha, rslora = cfg.get("r"), cfg.get("lora_alpha"), bool(cfg.get("use_rslora", False))
    if r != plan.rank:
        raise bad("r", f"but this model's adapters have rank {plan.rank}; apply_lora with LoraSpec(rank={r}, ...) "
                       f"to load it")
    if not isinstance(alpha, (int, float)) or float(alpha) != plan.alpha:
        raise bad("lora_alpha", f"but this model's adapters have alpha {plan.alpha:g}; apply_lora with "
                                f"LoraSpec(alpha={alpha}, ...) to load it")
    if rslora != plan.rslora:
        raise bad("use_rslora", f"but this model's adapters have rslora={plan.rslora}; apply_lora with "
                                f"LoraSpec(rslora={rslora}, ...) to load it")


def _listed(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f", ... ({len(names)} in all)" if len(names) > n else "")


@torch.no_grad()
def load_adapter(model: nn.Module, directory: str | Path, *, hf_family: str | None = None) -> nn.Module:
    """Load a PEFT LoRA adapter (one `save_adapter` wrote, or one PEFT saved for the transformers
    model `to_hf(model)` writes) into `model`, whose adapters `apply_lora` made with the same
    rank, alpha, rsLoRA and targets; returns the model. Every check runs before a factor is set
    (a refused adapter leaves the model as it was). hf_family: as for save_adapter (default: the
    adapter's base_model_class when PEFT recorded one, else the family to_hf would pick)."""
    who = "load_adapter"
    folder = Path(directory)
    cfg, tensors = _read_adapter(folder)
    config_file = folder / ADAPTER_CONFIG
    if hf_family is None:
        cls = (cfg.get("auto_mapping") or {}).get("base_model_class") if isinstance(cfg.get("auto_mapping"),
                                                                                     dict) else None
        match = [f.model_type for f in FAMILIES.values() if f.architecture == cls]
        if cls is not None and match:
            fam = family(match[0])
            try:
                model_family(model, fam.model_type)
            except NotRepresentable as err:
                raise CheckpointError(f"{config_file}: the adapter is for a {cls}, and this model is not one ({err})"
                                      ) from None
            hf_family = fam.model_type
    fam = resolve_family(model, hf_family, who)
    plan = plan_adapters(model, fam, who)
    _check_config(cfg, plan, config_file)

    weights = folder / ADAPTER_WEIGHTS
    expected: dict[str, tuple[tuple[int, ...], Pair, str]] = {}
    for p in plan.pairs:
        expected[f"{PREFIX}{p.module}.lora_A.weight"] = (p.shape_A, p, "A")
        expected[f"{PREFIX}{p.module}.lora_B.weight"] = (p.shape_B, p, "B")
    to_ours = {PREFIX + n: k for k, n in plan.hf_names.items()}
    whole = {}  # modules_to_save tensors: adapter key -> our tensor
    unexpected, problems = [], []
    for key, t in tensors.items():
        if key in expected:
            shape = expected[key][0]
            if tuple(t.shape) != shape:
                problems.append(f"{key} has shape {list(t.shape)}, this model's adapter needs {list(shape)} "
                                f"(for {expected[key][1].ours})")
        elif key in to_ours and not key.endswith((".lora_A.weight", ".lora_B.weight")):
            ours = plan.tensors[to_ours[key]]
            if tuple(t.shape) != tuple(ours.shape):
                problems.append(f"{key} has shape {list(t.shape)}, this model's {to_ours[key]} is "
                                f"{list(ours.shape)}")
            whole[key] = to_ours[key]
        else:
            unexpected.append(key)
    missing = sorted(set(expected) - set(tensors))
    if problems:
        raise CheckpointError(f"{weights} does not fit this model (an adapter for another model?): "
                              f"{_listed(problems, 2)}")
    if unexpected:
        raise CheckpointError(f"{weights} holds tensors this model has no adapter or module for: "
                              f"{_listed(sorted(unexpected))}; apply_lora with the targets the adapter was trained "
                              f"on (adapter_config.json target_modules={cfg.get('target_modules')}, "
                              f"target_parameters={cfg.get('target_parameters')})")
    if missing:
        raise CheckpointError(f"{weights} lacks tensors for this model's adapters: {_listed(missing)}; apply_lora "
                              f"only on the targets the adapter has")
    first_A: dict[tuple, str] = {}
    for p in plan.pairs:
        a_key, b_key = f"{PREFIX}{p.module}.lora_A.weight", f"{PREFIX}{p.module}.lora_B.weight"
        try:
            if p.check is not None:
                p.check(tensors[a_key], tensors[b_key])
        except CheckpointError as err:
            raise CheckpointError(f"{weights}: {err}") from None
        if p.share is not None:
            other = first_A.setdefault(p.share, a_key)
            if not torch.equal(tensors[other], tensors[a_key]):
                raise CheckpointError(
                    f"{weights}: {a_key} differs from {other}: moekit's {p.ours} is one LoRA on the fused "
                    f"gate+up projection, with one A; separate A's make it rank {2 * plan.rank} there, which "
                    f"this model's rank-{plan.rank} adapter cannot hold exactly")
    # Every check passed: only now is anything written.
    for p in plan.pairs:
        p.put(tensors[f"{PREFIX}{p.module}.lora_A.weight"], tensors[f"{PREFIX}{p.module}.lora_B.weight"])
    for key, ours in whole.items():
        plan.tensors[ours].copy_(tensors[key])
    return model
