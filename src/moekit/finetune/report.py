"""What a fine-tuning run reports: the base and the fine-tuned model on the same validation and
test data (loss, bits per byte), each MoE layer's expert load on the validation data before and
after (did fine-tuning shift the routing?), trainable parameters, peak memory and throughput.

Expert load: the share of routed token slots each expert receives per layer (tokens_per_expert of
the MoE layers' metrics, summed over the validation batches, over their total), every position of
the validation windows counted, prompts included: they are routed too. `shift` is the total
variation distance between the two shares, 0 (same load) to 1.
"""

from __future__ import annotations

import resource
import sys

import torch
from torch import nn

from moekit.train.metrics import LayerStats
from moekit.train.steps import autocast, evaluate, resolve_device, use_bf16
from moekit.train.testeval import evaluate_test


def _device_ctx(run_cfg):
    device = resolve_device(run_cfg)
    return device, autocast(device, use_bf16(run_cfg, device))


@torch.no_grad()
def expert_load(model: nn.Module, data, run_cfg) -> dict[str, list[float]]:
    """Per MoE layer (by index): each expert's share of the routed slots on the validation batches."""
    device, ctx = _device_ctx(run_cfg)
    was_training = model.training
    model.eval()
    stats = LayerStats()
    try:
        with torch.random.fork_rng(devices=[]):
            for x_BL, _ in data.val_batches(run_cfg.eval.batches):
                with ctx:
                    out = model(x_BL.to(device))
                stats.add(getattr(out, "layer_metrics", None))
    finally:
        model.train(was_training)
    load = {}
    for layer, acc in sorted(stats.layers.items()):
        counts = acc["tokens_per_expert"].double()
        load[str(layer)] = (counts / counts.sum().clamp_min(1)).tolist()
    return load


def base_scores(model: nn.Module, data, run_cfg) -> dict:
    """The base model on the validation batches the trainer evaluates and on the test split."""
    device, ctx = _device_ctx(run_cfg)
    model.to(device)
    val_loss, val_bpb = evaluate(model, data.val_batches(run_cfg.eval.batches), data.token_bytes, device, ctx)
    test = evaluate_test(model, data, device, ctx) if run_cfg.eval.test else None
    return {"val_loss": val_loss, "val_bpb": val_bpb,
            "test_loss": test["test_loss"] if test else None, "test_bpb": test["test_bpb"] if test else None,
            "load": expert_load(model, data, run_cfg)}


def peak_memory_bytes() -> int:
    """The process's peak resident memory (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def _shift(p: list[float], q: list[float]) -> float:
    return 0.5 * sum(abs(a - b) for a, b in zip(p, q, strict=True))


def build_report(cfg, rec: dict, result, before: dict, after: dict, params: dict) -> dict:
    """report.json of a run: `before` from base_scores, `after` the fine-tuned model's load; its
    scores come from the trainer's final evaluation and test evaluation (`result`)."""
    final = result.evals[-1] if result.evals else {}
    layers = {layer: {"base": share, "finetuned": after["load"].get(layer),
                      "shift": _shift(share, after["load"][layer]) if layer in after["load"] else None}
              for layer, share in before["load"].items()}
    return {
        "method": rec["method"], "lora": rec["lora"], "qlora": rec["qlora"], "base": rec["base"], "data": rec["data"],
        "steps": result.steps, "tokens": result.tokens,
        "params": params,
        "peak_memory_bytes": peak_memory_bytes(),
        "tokens_per_second": result.tokens / result.train_time if result.train_time > 0 else None,
        "train_seconds": result.train_time,
        "before": {k: before[k] for k in ("val_loss", "val_bpb", "test_loss", "test_bpb")},
        "after": {"val_loss": final.get("val_loss"), "val_bpb": final.get("val_bpb"),
                  "test_loss": (result.test or {}).get("test_loss"), "test_bpb": result.test_bpb},
        "expert_load": layers,
    }


def _num(x, fmt: str = ".4f") -> str:
    return "n/a" if x is None else format(x, fmt)


def report_lines(report: dict) -> list[str]:
    """The report for the console, a few lines."""
    p, b, a = report["params"], report["before"], report["after"]
    shifts = [v["shift"] for v in report["expert_load"].values() if v["shift"] is not None]
    lines = [
        f"{report['method']}: {report['steps']} steps, {report['tokens']:,} tokens, "
        f"{_num(report['tokens_per_second'], ',.0f')} tokens/s, "
        f"peak memory {report['peak_memory_bytes'] / 2**20:,.0f} MiB",
        f"trainable parameters {p['trainable']:,} of {p['total']:,} ({100 * p['fraction']:.2f}%)",
        f"validation loss {_num(b['val_loss'])} -> {_num(a['val_loss'])}, bits/byte {_num(b['val_bpb'])} -> "
        f"{_num(a['val_bpb'])}; test bits/byte {_num(b['test_bpb'])} -> {_num(a['test_bpb'])}",
    ]
    if shifts:
        lines.append("expert load shift (total variation, per layer): "
                     + ", ".join(f"{s:.3f}" for s in shifts))
    return lines
