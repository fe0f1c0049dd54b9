"""The CPU facts the fast paths are built on, measured on this machine (docs/performance.md).

    .venv/bin/python benchmarks/micro_cpu.py            # prints a table, writes docs/results/micro_cpu.json

1. page faults: filling a fresh 64 MiB tensor (new pages each time) against filling a reused one;
2. one small matmul per expert weight (1024 x 1024 fp32, 8 different experts so nothing stays in
   cache) with 1, 2, 3, 4, 8 rows, in the two forms `x @ W^T` (what the grouped GEMM does) and
   `W @ x^T` (weight-stationary), and the same rows of all 8 experts in one call of the decode
   path's native kernel (ops/native.py), reported as the rate at which the weights are read;
3. the read and copy bandwidth of the machine with all threads, the ceiling of (2);
4. the chunk size of the routed FFN's CPU loop (ops/routed.py CHUNK_BYTES): the forward+backward
   of the coarse training shape of bench_layer.py for 1, 2, 4, 8 and 64 MiB chunks.

Median of `--reps` runs after warm-up, wall clock, all torch threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def median_s(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def page_faults(reps: int) -> dict:
    n = 16 * 2**20  # 64 MiB of float32
    reused = torch.empty(n)
    fresh_s = median_s(lambda: torch.empty(n).fill_(1.0), reps)
    reused_s = median_s(lambda: reused.fill_(1.0), reps)
    return {"fresh_fill_s": fresh_s, "reused_fill_s": reused_s, "fresh_over_reused": fresh_s / reused_s}


def small_matmuls(reps: int) -> dict:
    from moekit.ops import native

    d = 1024
    w = torch.randn(64, d, d)
    experts = torch.randperm(64)[:8].tolist()
    weight_bytes = len(experts) * d * d * 4
    out = {}
    for rows in (1, 2, 3, 4, 8):
        x = torch.randn(rows, d)
        xw = median_s(lambda x=x: [torch.mm(x, w[e].t()) for e in experts], reps)
        wx = median_s(lambda x=x: [torch.mm(w[e], x.t()) for e in experts], reps)
        out[str(rows)] = {"x_Wt_GBps": weight_bytes / xw / 1e9, "W_xt_GBps": weight_bytes / wx / 1e9,
                          "weight_stationary_speedup": xw / wx}
        if native.library() is not None:  # the decode path's kernel: all 8 experts in one call
            counts = torch.zeros(64, dtype=torch.int32)
            counts[experts] = rows
            ends, x_all = counts.cumsum(0), x.repeat(len(experts), 1)
            gv = median_s(lambda ends=ends, x_all=x_all: native.grouped_gemv(x_all, w, ends), reps)
            out[str(rows)]["native_gemv_GBps"] = weight_bytes / gv / 1e9
    return out


def bandwidth(reps: int) -> dict:
    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)
    nbytes = src.numel() * 4
    return {"read_GBps": nbytes / median_s(lambda: src.sum(), reps) / 1e9,
            "copy_GBps_read_plus_write": 2 * nbytes / median_s(lambda: dst.copy_(src), reps) / 1e9}


def chunk_sizes(reps: int) -> dict:
    import moekit.ops.routed as routed
    from moekit import MoE, MoEConfig

    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=512, d_ff=1024, num_experts=8, top_k=2, router="softmax_topk"))
    x = torch.randn(4096, 512)
    grad = torch.randn(4096, 512)

    def step():
        moe.zero_grad(set_to_none=True)
        moe(x).output.backward(grad)

    before = routed.CHUNK_BYTES
    out = {}
    try:
        for mib in (1, 2, 4, 8, 64):
            routed.CHUNK_BYTES = mib * 2**20
            out[str(mib)] = median_s(step, reps)
    finally:
        routed.CHUNK_BYTES = before
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "results" / "micro_cpu.json"))
    args = p.parse_args(argv)
    res = {"torch": torch.__version__, "threads": torch.get_num_threads(), "reps": args.reps,
           "page_faults": page_faults(args.reps), "bandwidth": bandwidth(args.reps),
           "small_matmuls": small_matmuls(args.reps), "chunk_fwd_bwd_s": chunk_sizes(max(5, args.reps // 2))}
    pf, bw = res["page_faults"], res["bandwidth"]
    print(f"# {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"page faults: fill a fresh 64 MiB tensor {pf['fresh_fill_s'] * 1e3:.2f} ms, a reused one "
          f"{pf['reused_fill_s'] * 1e3:.2f} ms ({pf['fresh_over_reused']:.2f}x)")
    print(f"bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps_read_plus_write']:.1f} GB/s (read + write)")
    print("rows per expert | x @ W^T GB/s | W @ x^T GB/s | weight-stationary speed-up | native grouped_gemv GB/s")
    for rows, r in res["small_matmuls"].items():
        print(f"{rows:>15} | {r['x_Wt_GBps']:12.1f} | {r['W_xt_GBps']:12.1f} | "
              f"{r['weight_stationary_speedup']:25.2f}x | {r.get('native_gemv_GBps', float('nan')):.1f}")
    print("routed FFN chunk size (coarse_train fwd+bwd): " + ", ".join(
        f"{mib} MiB {s * 1e3:.0f} ms" for mib, s in res["chunk_fwd_bwd_s"].items()))
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"# wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
