"""LoRA on experts: forward+backward cost over the frozen base, beside the per-expert loop.

    .venv/bin/python benchmarks/bench_lora.py                    # both shapes, writes docs/results/bench_lora.json
    .venv/bin/python benchmarks/bench_lora.py --shapes coarse_train --reps 3

Shape legend: T tokens, D d_model, F d_ff, E experts, k top-k; the shapes are bench_layer.py's
training shapes. One MoE layer (softmax top-k, dropless), rank 16, alpha 32, input x requiring
grad (a layer inside a network passes a gradient down), one fixed random output gradient:

- `frozen base`: the experts and router frozen, nothing trains; the fused routed op runs and
  skips the weight gradients (what LoRA costs is measured against this, the cheapest backward);
- `moekit LoRA`: `LoraExperts` on the same weights, rank 16 on both projections of every expert,
  the deltas as grouped products on the sorted rows (layers/lora.py);
- `per-expert loop LoRA`: the usual approach (one module per expert, each projection an
  nn.Linear with its own LoRA, a Python loop over experts: what PEFT does on unfused experts),
  same weights and factors, through moekit's `ModuleExperts` path.

All three are checked to give the same output (the adapters get a non-zero B first). Runs are
interleaved rep by rep (drift hits every contender alike); the median of `--reps` runs after one
warm-up; the garbage collector is off during the timed runs. Ratios come from one run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.layers.experts import ModuleExperts
from moekit.layers.lora import LoraExperts, LoraLinear
from moekit.ops.activations import activate

SHAPES = {  # T, D, F, E, k (benchmarks/bench_layer.py)
    "coarse_train": (4096, 512, 1024, 8, 2),
    "fine_train": (4096, 512, 256, 64, 8),
}
RANK, ALPHA = 16, 32.0


class _LoopExpert(nn.Module):
    """One expert as two nn.Linear with LoRA: the unfused layout PEFT adapts module by module."""

    def __init__(self, w_in, w_out, a_in, b_in, a_out, b_out, activation):
        super().__init__()
        self.activation = activation
        up = nn.Linear(w_in.shape[1], w_in.shape[0], bias=False)
        down = nn.Linear(w_out.shape[1], w_out.shape[0], bias=False)
        up.weight.data.copy_(w_in)
        down.weight.data.copy_(w_out)
        self.up, self.down = LoraLinear(up, RANK, ALPHA), LoraLinear(down, RANK, ALPHA)
        for lora, a, b in ((self.up, a_in, b_in), (self.down, a_out, b_out)):
            lora.lora_A.data.copy_(a)
            lora.lora_B.data.copy_(b)

    def forward(self, x):
        return self.down(activate(self.up(x), self.activation))


def _layers(shape):
    t, d, f, e, k = shape
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=d, d_ff=f, num_experts=e, top_k=k)
    base = MoE(cfg)
    for p in base.parameters():
        p.requires_grad_(False)
    lora = MoE(cfg)
    lora.load_state_dict(base.state_dict())
    lora.experts = LoraExperts(lora.experts, RANK, ALPHA)
    for p in lora.router.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        lora.experts.lora_in_B.normal_(std=0.01)
        lora.experts.lora_out_B.normal_(std=0.01)
    loop = MoE(cfg)
    loop.load_state_dict(base.state_dict())
    le = lora.experts
    loop.experts = ModuleExperts([
        _LoopExpert(le.base.w_in[i], le.base.w_out[i], le.lora_in_A[i], le.lora_in_B[i], le.lora_out_A[i],
                    le.lora_out_B[i], cfg.activation) for i in range(e)], d)
    for p in loop.parameters():
        p.requires_grad_(False)
    for m in loop.experts.modules():
        if isinstance(m, LoraLinear):
            m.lora_A.requires_grad_(True)
            m.lora_B.requires_grad_(True)
    return {"frozen base": base, "moekit LoRA": lora, "per-expert loop LoRA": loop}


def _run(layer, x, grad):
    for p in layer.parameters():
        p.grad = None
    x.grad = None
    out = layer(x).output
    out.backward(grad)


def bench(name, reps):
    shape = SHAPES[name]
    t, d = shape[0], shape[1]
    layers = _layers(shape)
    torch.manual_seed(1)
    x = torch.randn(t, d, requires_grad=True)
    grad = torch.randn(t, d)
    with torch.no_grad():  # same output from every contender
        outs = {k: m(x).output for k, m in layers.items()}
    base_out = outs["moekit LoRA"]
    for k, o in outs.items():
        if k != "frozen base":
            torch.testing.assert_close(o, base_out, rtol=1e-4, atol=1e-4)
    times = {k: [] for k in layers}
    for m in layers.values():  # warm-up
        _run(m, x, grad)
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for k, m in layers.items():
                start = time.perf_counter()
                _run(m, x, grad)
                times[k].append(time.perf_counter() - start)
    finally:
        gc.enable()
    med = {k: statistics.median(v) for k, v in times.items()}
    trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in layers.items()}
    return {"shape": dict(zip("TDFEk", shape)), "seconds": times, "median_s": med,
            "ratio_to_frozen_base": {k: med[k] / med["frozen base"] for k in med},
            "trainable_parameters": trainable}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="docs/results/bench_lora.json")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.shapes.split(",")]
    bad = [n for n in names if n not in SHAPES]
    if bad:
        print(f"--shapes: unknown {bad}; choose from {list(SHAPES)}", file=sys.stderr)
        return 2
    rows = {}
    for name in names:
        rows[name] = bench(name, args.reps)
        r = rows[name]["ratio_to_frozen_base"]
        print(f"{name}: " + ", ".join(f"{k} {rows[name]['median_s'][k] * 1e3:.0f} ms ({r[k]:.2f}x)" for k in r),
              flush=True)
    result = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv),
        "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "rank": RANK, "alpha": ALPHA, "reps": args.reps,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
