"""`--set a.b=c`: edit a run config (or any tree of config dataclasses and dicts) from strings.

`apply_override(cfg, "optim.lr=3e-4")` parses the text after `=` by the field's annotation, rebuilds
the dataclasses on the path with `dataclasses.replace` (so each one's own validation runs again,
including the model config's), and lists the valid keys when a name is unknown.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import types
import typing
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # not at run time: config.py imports this module to re-export its entry points
    from moekit.train.config import RunConfig

_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1", "yes", "on")
_FALSE_WORDS = ("false", "0", "no", "off")


def _hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(type(obj))
    except Exception:  # an annotation that cannot be resolved: fall back to the current value's type
        return {}


def _parse(raw: str, annotation: Any, current: Any, key: str) -> Any:
    """Turn the text after `=` into a value of the field's declared type."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is None or annotation is Any:
        if current is not None and not isinstance(current, (dict, list)):
            return _parse(raw, type(current), current, key)
        if raw.lower() in _NONE_WORDS:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    if origin in (typing.Union, types.UnionType):
        members = [a for a in args if a is not type(None)]
        if type(None) in args and raw.lower() in _NONE_WORDS:
            return None
        errors = []
        for member in members:
            try:
                return _parse(raw, member, current, key)
            except (TypeError, ValueError) as err:
                errors.append(str(err))
        raise ValueError(f"--set {key}={raw}: not a valid {annotation}: {'; '.join(errors)}")
    if origin is typing.Literal:
        for option in args:
            if str(option) == raw:
                return option
        raise ValueError(f"--set {key}={raw}: must be one of {list(args)}")
    if origin in (tuple, list):
        parts = [p.strip() for p in raw.strip("()[]").split(",") if p.strip()]
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(parts) != len(args):
                raise ValueError(f"--set {key}={raw}: expected {len(args)} comma-separated values")
            return tuple(_parse(p, a, None, key) for p, a in zip(parts, args, strict=True))
        elem = args[0] if args else Any
        values = [_parse(p, elem, None, key) for p in parts]
        return tuple(values) if origin is tuple else values
    if annotation is bool:
        low = raw.lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
        raise ValueError(f"--set {key}={raw}: expected true or false")
    if annotation is int:
        try:
            return int(raw, 0) if raw.lower().startswith(("0x", "0b", "0o")) else int(raw.replace("_", ""))
        except ValueError:
            try:  # allow 1e6 style for integers when exact
                value = float(raw)
            except ValueError:
                raise ValueError(f"--set {key}={raw}: expected an integer") from None
            if value.is_integer():
                return int(value)
            raise ValueError(f"--set {key}={raw}: expected an integer") from None
    if annotation is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"--set {key}={raw}: expected a number") from None
    if annotation is str:
        return raw
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        raise ValueError(f"--set {key}={raw}: '{key}' is a section; set one of its fields")
    if isinstance(annotation, type):
        try:
            return annotation(raw)
        except Exception as err:
            raise ValueError(f"--set {key}={raw}: cannot convert to {annotation.__name__}: {err}") from None
    return raw


def _field_names(obj: Any) -> list[str]:
    if dataclasses.is_dataclass(obj):
        return [f.name for f in dataclasses.fields(obj) if f.init]
    if isinstance(obj, dict):
        return sorted(obj)
    return []


def valid_keys(cfg: Any, prefix: str = "") -> list[str]:
    """Every settable dotted key below `cfg` (for help texts and error messages)."""
    keys = []
    for name in _field_names(cfg):
        value = getattr(cfg, name) if dataclasses.is_dataclass(cfg) else cfg[name]
        if dataclasses.is_dataclass(value) or (isinstance(value, dict) and value):
            keys.extend(valid_keys(value, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _set_in(obj: Any, parts: list[str], raw: str, key: str, trail: str) -> None:
    """Set the dotted path in place (on a private copy); validation happens once at the end."""
    name = parts[0]
    where = trail or "the run config"
    names = _field_names(obj)
    if name not in names:
        raise ValueError(
            f"--set {key}: unknown key '{name}' in {where}; valid keys: {', '.join(names) or '(none)'}"
        )
    current = getattr(obj, name) if dataclasses.is_dataclass(obj) else obj[name]
    path = f"{trail}.{name}" if trail else name
    if len(parts) > 1:
        if not (dataclasses.is_dataclass(current) or isinstance(current, dict)):
            raise ValueError(f"--set {key}: '{path}' is a value ({current!r}), not a section")
        _set_in(current, parts[1:], raw, key, path)
        return
    annotation = _hints(obj).get(name) if dataclasses.is_dataclass(obj) else None
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
        annotation
    )
    if dataclasses.is_dataclass(current) and not (optional and raw.lower() in _NONE_WORDS):
        raise ValueError(
            f"--set {key}: '{path}' is a section; set one of: "
            + ", ".join(f"{path}.{n}" for n in _field_names(current))
        )
    new_value = _parse(raw, annotation, current, key)
    if isinstance(obj, dict):
        obj[name] = new_value
        return
    if name == "router" and hasattr(obj, "router_options") and new_value != current:
        # Options belong to one router family: a new router starts from its own defaults.
        from moekit.layers.routers import ROUTERS

        obj.router_options = ROUTERS[new_value].options_cls() if new_value in ROUTERS else None
    if name == "d_model":
        # A nested layer config (model.moe) repeats the model width; it follows the model's.
        for f in dataclasses.fields(obj):
            child = getattr(obj, f.name)
            if dataclasses.is_dataclass(child) and getattr(child, "d_model", None) == current:
                child.d_model = new_value
    setattr(obj, name, new_value)


def revalidate(obj: Any) -> Any:
    """Rebuild every dataclass in the tree, innermost first, so each `__post_init__` runs again."""
    if isinstance(obj, dict):
        return {k: revalidate(v) for k, v in obj.items()}
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    changes = {f.name: revalidate(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
    return dataclasses.replace(obj, **changes)


def _split(assignment: str) -> tuple[str, str]:
    if "=" not in assignment:
        raise ValueError(f"--set expects KEY=VALUE (for example optim.lr=3e-4), got {assignment!r}")
    key, raw = assignment.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ValueError(f"--set: malformed key {key!r}")
    return key, raw.strip()


def apply_overrides(cfg: RunConfig, assignments: list[str] | None) -> RunConfig:
    """Apply `a.b=c` assignments (in order) to a copy, then validate the whole tree once, so
    fields checked against each other (warmup <= steps) can be changed together in any order."""
    assignments = list(assignments or [])
    if not assignments:
        return cfg
    work = copy.deepcopy(cfg)
    for assignment in assignments:
        key, raw = _split(assignment)
        _set_in(work, key.split("."), raw, key, "")
    try:
        return revalidate(work)
    except (TypeError, ValueError) as err:
        # The message names the field; repeating every assignment would bury it in a long line.
        raise type(err)(f"--set: {err}") from None


def apply_override(cfg: RunConfig, assignment: str) -> RunConfig:
    """Apply one `a.b=c` assignment; returns a new validated RunConfig."""
    return apply_overrides(cfg, [assignment])
