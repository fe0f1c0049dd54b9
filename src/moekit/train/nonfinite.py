"""Finding where a NaN or inf came from, so a stopped run names the step and the layer.

For a non-finite loss the forward is replayed with a hook on every module: hooks fire as modules
finish, innermost first, so the first module whose output holds a NaN/inf is where it appeared
(`blocks.1.ffn.router`, not the block around it). For a non-finite gradient the parameters whose
gradients are non-finite are listed by layer.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

__all__ = ["NonFiniteError", "describe_module", "first_nonfinite_module", "nonfinite_message"]


class NonFiniteError(RuntimeError):
    """Training stopped on a NaN/inf loss or gradient; the message names the step and layer."""


def _float_tensors(obj, depth: int = 0):
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            yield obj
    elif depth > 3:
        return
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _float_tensors(v, depth + 1)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _float_tensors(v, depth + 1)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            yield from _float_tensors(getattr(obj, f.name), depth + 1)


def describe_module(name: str) -> str:
    """'blocks.1.ffn.router.weight' -> 'layer 1 router' (the part of the model a name belongs to)."""
    parts = name.split(".")
    layer = next((p for p in parts if p.isdigit()), None)
    if "router" in parts:
        what = "router"
    elif "experts" in parts:
        what = "experts"
    elif "shared_expert" in parts:
        what = "shared expert"
    elif "attn" in parts:
        what = "attention"
    else:
        what = parts[-2] if len(parts) > 1 and parts[-1] in ("weight", "bias") else parts[-1]
    return f"layer {layer} {what}" if layer is not None else what


def first_nonfinite_module(model: nn.Module, x_BL: Tensor, ctx) -> str | None:
    """Rerun the forward with hooks; the first module (in completion order, so innermost first)
    whose output holds a NaN or inf is where the non-finite values appeared."""
    found: list[str] = []
    hooks = []

    def hook(name):
        def fn(_module, _inputs, output):
            if not found and any(not torch.isfinite(t).all() for t in _float_tensors(output)):
                found.append(name)
        return fn

    for name, module in model.named_modules():
        if name:
            hooks.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), ctx:
            model(x_BL)
    finally:
        for h in hooks:
            h.remove()
    return found[0] if found else None


def nonfinite_message(kind: str, step: int, model: nn.Module, x_BL: Tensor | None, ctx) -> str:
    lines = [f"non-finite {kind} at step {step}"]
    bad_params = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad_params:
        lines.append("non-finite parameters: " + ", ".join(f"{n} ({describe_module(n)})" for n in bad_params[:6]))
    if kind == "loss" and x_BL is not None:
        where = first_nonfinite_module(model, x_BL, ctx)
        if where:
            lines.append(f"first non-finite output: {where} ({describe_module(where)})")
    if kind == "gradient":
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            layers = sorted({describe_module(n) for n in bad})
            lines.append(f"non-finite gradients in {len(bad)} parameters, from: {', '.join(layers)}; first: {bad[0]}")
    lines.append("training stopped; the last good checkpoint is kept")
    return "; ".join(lines)
