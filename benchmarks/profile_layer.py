"""Which op dominates: torch.profiler over one benchmark shape, for moekit and the peers.

    .venv/bin/python benchmarks/profile_layer.py decode_single --pass fwd
    .venv/bin/python benchmarks/profile_layer.py coarse_train --pass fwd_bwd --impls moekit hf_eager

Builds exactly what benchmarks/bench_layer.py times (same shapes, weights and inputs), runs the
pass `--warmup` times, then profiles `--reps` runs and prints, per contender, the ops by self
CPU time (per run) and the share of the time spent in matrix products (aten::mm/bmm, whose
self time includes MKL). For the decode shapes it also prints the rate at which the matrix
products stream the touched expert weights, beside the copy bandwidth of bench_layer.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_layer as B  # noqa: E402

GEMM_OPS = ("aten::mm", "aten::bmm", "aten::addmm")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("shape", choices=list(B.SHAPES))
    p.add_argument("--pass", dest="phase", choices=("fwd", "fwd_bwd"), default="fwd")
    p.add_argument("--impls", nargs="+", default=["expert_compute", *B.IMPLS],
                   choices=["expert_compute", *B.IMPLS])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rows", type=int, default=12, help="ops listed per contender")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = B.SHAPES[args.shape]
    models, x, grad = B.build(shape)
    for m in models.values():
        m.train()
    touched = B.check_same(models, x)["touched_experts"]
    t, d, f, e, k = shape
    weight_bytes = touched * 3 * d * f * 4
    idx = 0 if args.phase == "fwd" else 1
    print(f"# {args.shape} {args.phase}, {torch.get_num_threads()} threads, {touched} experts touched "
          f"({weight_bytes / 2**20:.1f} MiB of weights), copy bandwidth {B.copy_bandwidth(5) / 1e9:.1f} GB/s")
    for impl in args.impls:
        fn = B.expert_compute_fns(shape)[idx] if impl == "expert_compute" else B.contender_fns(
            impl, models[impl], x, grad)[idx]
        for _ in range(args.warmup):
            fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.reps):
                fn()
        events = prof.key_averages()
        total = sum(ev.self_cpu_time_total for ev in events) / args.reps / 1e3
        gemm = sum(ev.self_cpu_time_total for ev in events if ev.key in GEMM_OPS) / args.reps / 1e3
        line = f"\n## {impl}: {total:.2f} ms per run, matrix products {gemm:.2f} ms ({100 * gemm / total:.0f}%)"
        if t <= 32 and impl != "expert_compute":
            line += f", streaming the weights at {weight_bytes / (gemm / 1e3) / 1e9:.1f} GB/s"
        print(line)
        rows = sorted(events, key=lambda ev: ev.self_cpu_time_total, reverse=True)[: args.rows]
        for ev in rows:
            print(f"  {ev.key[:48]:48s} {ev.self_cpu_time_total / args.reps / 1e3:9.3f} ms  "
                  f"{ev.count / args.reps:7.0f} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
