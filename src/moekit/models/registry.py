"""Registries: architectures (config class -> model class) and presets (name -> config function).

A preset is a plain Python function returning a config; `@register_preset("name")` files it.
Configs serialise to a JSON-able dict with an "arch" key (and "preset" when built from one), the
format of the `config.json` beside a checkpoint's `model.safetensors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Arch:
    name: str
    config_cls: type
    model_cls: type
    count: Callable[[Any], tuple[int, int]]  # analytic (total, active per token) from a config
    describe: Callable[[Any], list[tuple[str, str]]] | None = None  # layer layout rows for `moekit info`
    twin: Callable[[Any, str], Any] | None = None  # dense twin config (config, match) -> config


ARCHS: dict[str, Arch] = {}
PRESETS: dict[str, tuple[str, Callable[[], Any], str]] = {}  # name -> (arch, fn, one-line doc)


def register_arch(name: str, config_cls: type, model_cls: type, count, describe=None, twin=None) -> None:
    ARCHS[name] = Arch(name, config_cls, model_cls, count, describe, twin)


def register_preset(name: str, arch: str):
    def wrap(fn):
        if name in PRESETS:
            raise ValueError(f"preset {name!r} registered twice")
        first_paragraph = (fn.__doc__ or "").strip().split("\n\n")[0]
        PRESETS[name] = (arch, fn, " ".join(line.strip() for line in first_paragraph.splitlines()))
        return fn

    return wrap


def arch_of(config: Any) -> Arch:
    for arch in ARCHS.values():  # exact type first: a config class may extend another arch's
        if type(config) is arch.config_cls:
            return arch
    for arch in ARCHS.values():
        if isinstance(config, arch.config_cls):
            return arch
    raise TypeError(
        f"not a model config: {type(config).__name__}; known: {[a.config_cls.__name__ for a in ARCHS.values()]}"
    )


def get_preset(name: str, **overrides):
    """The config a preset describes; keyword overrides replace top-level fields (and re-validate)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    cfg = PRESETS[name][1]()
    if overrides:
        cfg = dataclasses.replace(cfg, **overrides)
    if hasattr(cfg, "preset") and cfg.preset is None:
        cfg.preset = name
    return cfg


def list_presets(arch: str | None = None) -> list[str]:
    return sorted(n for n, (a, _, _) in PRESETS.items() if arch is None or a == arch)


def preset_doc(name: str) -> str:
    return PRESETS[name][2]


def build_model(config) -> nn.Module:
    """Instantiate the model a config describes (or a preset name)."""
    if isinstance(config, str):
        config = get_preset(config)
    return arch_of(config).model_cls(config)


def count_parameters(model_or_config) -> tuple[int, int]:
    """(total, active per token). A config is counted analytically, without building anything;
    a module is counted from its parameters (shared/tied parameters once)."""
    from moekit.models.common import count_module

    if isinstance(model_or_config, nn.Module):
        return count_module(model_or_config)
    if isinstance(model_or_config, str):
        model_or_config = get_preset(model_or_config)
    return arch_of(model_or_config).count(model_or_config)


def dense_twin(config, match: str = "active"):
    """A dense config of the same architecture whose parameter count matches the MoE model's
    active-per-token count (`match="active"`) or its total (`match="total"`). Each architecture
    documents how it rounds; see `docs/models.md`."""
    if match not in ("active", "total"):
        raise ValueError(f"dense_twin match must be 'active' or 'total', got {match!r}")
    if isinstance(config, str):
        config = get_preset(config)
    arch = arch_of(config)
    if arch.twin is None:
        raise ValueError(f"architecture {arch.name!r} has no dense twin")
    return arch.twin(config, match)


def summary(config) -> dict:
    """What `moekit info` shows, as a JSON-able dict: analytic total and active-per-token counts,
    the architecture's layout rows, the dense twins' widths and counts (MoE configs), the config."""
    arch = arch_of(config)
    total, active = count_parameters(config)
    info = {
        "preset": getattr(config, "preset", None),
        "arch": arch.name,
        "total_params": total,
        "active_params_per_token": active,
        "active_fraction": active / total,
        "layout": dict(arch.describe(config)) if arch.describe else {},
    }
    if getattr(config, "moe", None) is not None and arch.twin is not None:
        for match in ("active", "total"):
            twin = dense_twin(config, match)
            info[f"dense_twin_{match}"] = {"d_ff": twin.d_ff, "params": count_parameters(twin)[0]}
    info["config"] = config_to_dict(config)
    return info


# ---------------------------------------------------------------------------------------------
# Serialisation


def _plain(value):
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(config) -> dict:
    """JSON-able dict: every field, nested MoEConfig as a dict, plus "arch"."""
    out = _plain(config)
    out["arch"] = arch_of(config).name
    return out


def config_from_dict(data: dict):
    """Inverse of `config_to_dict`. A dict holding only {"preset": name} (plus overrides) builds
    the preset."""
    data = dict(data)
    arch_name = data.pop("arch", None)
    if arch_name is None:
        if "preset" not in data:
            raise ValueError("model config dict needs an 'arch' or a 'preset' key")
        name = data.pop("preset")
        return get_preset(name, **data)
    if arch_name not in ARCHS:
        raise ValueError(f"unknown arch {arch_name!r} in model config; known: {sorted(ARCHS)}")
    cls = ARCHS[arch_name].config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown} in model config")
    return cls(**data)



_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
                   "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                   "sparse_")


@contextlib.contextmanager
def uninitialised(dtype: torch.dtype) -> Iterator[None]:
    """Build modules with storage in `dtype` and skip random initialisation, for a model whose
    every parameter a checkpoint then overwrites (the loaders prove coverage): initialising a
    large model only to discard it costs minutes, and writing every page makes the allocation
    resident before the weights arrive. Buffers made with torch.zeros/ones keep their values."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS if hasattr(nn.init, name)}
    previous = torch.get_default_dtype()

    def keep(tensor, *args, **kwargs):
        return tensor

    try:
        for name in saved:
            setattr(nn.init, name, keep)
        torch.set_default_dtype(dtype)
        yield
    finally:
        torch.set_default_dtype(previous)
        for name, fn in saved.items():
            setattr(nn.init, name, fn)
