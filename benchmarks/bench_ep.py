"""Expert-parallel MoE layer on gloo/CPU: all-to-all bytes, communication vs compute, tokens/s.

For each EP size it spawns that many processes (gloo over loopback), builds the same MoE layer
on every rank, shards it with `moekit.parallel.EPMoE`, and times forward + backward steps with a
fixed number of tokens per rank (weak scaling: the global batch grows with EP). Per step it
reports, per rank (mean over ranks and steps):

    a2a_MB         payload bytes this rank sent to other ranks (dispatch, combine, and the two
                   reverse exchanges of backward)
    model_MB       the cost model: 4 * T * k * D * bytes * (ep - 1) / ep (uniform routing)
    exact_MB       the same count from the actual routing (rows whose expert lives elsewhere,
                   sent, plus rows received, times 2 for backward): must equal a2a_MB
    comm_ms        wall time inside the payload all-to-alls (includes waiting for peers)
    control_ms     wall time in the small collectives (split sizes, statistics, metadata)
    compute_ms     step time minus both
    tokens/s       global tokens / step time

EP=1 is the single-process `MoE` (no collectives). Every rank runs one thread (`--threads`): on
a shared 2-core machine, OpenMP threads of several processes spin against each other and a
2-thread layer ran 25x slower than a 1-thread one. EP=4 on 2 cores therefore runs two ranks per
core and shows the cost of that, not the scaling of a real cluster (see docs/scaling.md).

    python benchmarks/bench_ep.py                       # EP 1, 2, 4, 3 repeats; docs/results/bench_ep.json
    python benchmarks/bench_ep.py --extrapolate         # the docs/scaling.md step-time model only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import sys
import time
from datetime import date, timedelta
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- measurement


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, ep: int, port: int, args: dict, out_q) -> None:
    import torch.distributed as dist

    from moekit import MoE, MoEConfig
    from moekit.parallel import EPMoE, build_mesh, record_comm

    torch.set_num_threads(args["threads"])
    if ep > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=ep,
                                timeout=timedelta(seconds=120))
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=args["d_model"], d_ff=args["d_ff"], num_experts=args["experts"], top_k=args["top_k"],
                    capacity_factor=args["capacity_factor"])
    layer = MoE(cfg)
    if ep > 1:
        layer = EPMoE(layer, build_mesh(1, ep))
    layer.train()
    gen = torch.Generator().manual_seed(100 + rank)
    tokens, d = args["tokens_per_rank"], args["d_model"]
    local = range(rank * cfg.num_experts // ep, (rank + 1) * cfg.num_experts // ep)
    rows = []
    for step in range(args["warmup"] + args["steps"]):
        x = torch.randn(tokens, d, generator=gen, requires_grad=True)
        g = torch.randn(tokens, d, generator=gen)
        if ep > 1:
            dist.barrier()
        with record_comm() as rec:
            t0 = time.perf_counter()
            out = layer(x)
            ((out.output * g).sum() + out.aux_loss).backward()
            dt = time.perf_counter() - t0
        if step < args["warmup"]:
            continue
        idx = out.routing.expert_idx_TK.reshape(-1)
        off_rank = int(((idx < local.start) | (idx >= local.stop)).sum()) if ep > 1 else 0
        if args["capacity_factor"] is not None:
            off_rank = None  # dropped assignments are not sent; the exact count needs the keep mask
        rows.append({"step_s": dt, "comm_s": rec.seconds, "control_s": rec.control_seconds,
                     "bytes_sent": rec.bytes_sent, "bytes_received": rec.bytes_received,
                     "calls": rec.calls, "control_calls": rec.control_calls, "off_rank_sent": off_rank})
        layer.zero_grad(set_to_none=True)
    out_q.put((rank, rows))
    if ep > 1:
        dist.destroy_process_group()


def measure(ep: int, args: dict) -> dict:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, ep, port, args, q)) for r in range(ep)]
    for p in procs:
        p.start()
    results = {}
    deadline = time.monotonic() + 600
    while len(results) < ep:
        rank, rows = q.get(timeout=max(1.0, deadline - time.monotonic()))
        results[rank] = rows
    for p in procs:
        p.join(timeout=30)
    steps = len(results[0])
    elem = 4  # float32 activations
    t, k, d = args["tokens_per_rank"], args["top_k"], args["d_model"]
    per_step = []
    for s in range(steps):
        ranks = [results[r][s] for r in range(ep)]
        step_s = max(r["step_s"] for r in ranks)  # the step ends when the slowest rank ends
        exact = None
        if all(r["off_rank_sent"] is not None for r in ranks):
            # Every off-rank row is sent once in dispatch and once back in combine, and both
            # again in backward: 4 crossings, split between sender and receiver.
            exact = sum(2 * r["off_rank_sent"] * d * elem for r in ranks) / ep * 2
        per_step.append({
            "step_s": step_s,
            "comm_s": statistics.mean(r["comm_s"] for r in ranks),
            "control_s": statistics.mean(r["control_s"] for r in ranks),
            "bytes_sent": statistics.mean(r["bytes_sent"] for r in ranks),
            "bytes_sent_total": sum(r["bytes_sent"] for r in ranks),
            "exact_bytes": exact,
        })

    def mean(key):
        vals = [p[key] for p in per_step if p[key] is not None]
        return statistics.mean(vals) if vals else None

    step_s = statistics.median(p["step_s"] for p in per_step)
    comm_s, control_s = mean("comm_s"), mean("control_s")
    return {
        "ep": ep,
        "ranks": ep,
        "threads_per_rank": args["threads"],
        "tokens_per_rank": t,
        "global_tokens": t * ep,
        "step_ms": 1e3 * step_s,
        "comm_ms": 1e3 * comm_s,
        "control_ms": 1e3 * control_s,
        "compute_ms": 1e3 * max(step_s - comm_s - control_s, 0.0),
        "comm_share": (comm_s + control_s) / step_s,
        "tokens_per_s": t * ep / step_s,
        "a2a_MB_per_rank": mean("bytes_sent") / 1e6,
        "model_MB_per_rank": 4 * t * k * d * elem * (ep - 1) / ep / 1e6,
        "exact_MB_per_rank": None if mean("exact_bytes") is None else mean("exact_bytes") / 1e6,
        "a2a_calls_per_step": results[0][0]["calls"],
        "control_calls_per_step": results[0][0]["control_calls"],
    }


# ----------------------------------------------------------------------------- extrapolation

# Stated hardware numbers (sources in docs/scaling.md):
#   H100 SXM: 989 TFLOP/s dense BF16; NVLink 4: 900 GB/s bidirectional = 450 GB/s per direction.
#   ConnectX-7 InfiniBand NDR: 400 Gb/s = 50 GB/s per direction per GPU (one NIC per GPU).
#   Achieved by DeepEP on H800 (docs/legacy.md): ~155 GB/s of the ~160 GB/s NVLink, 43-58 GB/s RDMA.
HW = {
    "peak_flops": 989e12,
    "mfu": 0.40,  # assumed share of peak the expert GEMMs reach (forward and backward)
    "nvlink_Bps": 450e9,
    "nvlink_efficiency": 0.80,  # assumed all-to-all efficiency on NVLink
    "ib_Bps": 50e9,
    "ib_efficiency": 0.85,  # DeepEP's 43-58 GB/s of 50 GB/s
    "gpus_per_node": 8,
}

MODELS = {
    # name: d_model, d_ff per expert, experts, top_k, tokens per GPU per micro-batch, bytes/elem
    "mixtral-8x7b": {"d": 4096, "f": 14336, "e": 8, "k": 2, "t": 4096, "b": 2},
    "deepseek-v3": {"d": 7168, "f": 2048, "e": 256, "k": 8, "t": 4096, "b": 2},
}


def layer_times(model: dict, gpus: int, hw: dict = HW, node_limit: int | None = None) -> dict:
    """One MoE layer, forward + backward, per GPU, weak scaling (t tokens per GPU).

    EP = min(gpus, experts); the rest of the GPUs are data parallel (their all-to-all stays
    inside their own EP group). Of the 4 * t * k * d * b bytes a GPU sends (dispatch, combine,
    and both again in backward), the share (ep - 1) / ep leaves the GPU; of that, the share
    (ep - g) / ep leaves the node when EP spans nodes (g GPUs per node). `node_limit` (DeepSeek's
    node-limited routing, hierarchical all-to-all): a token crosses to at most M nodes once each
    and fans out over NVLink there, so cross-node bytes per token are M*d*b instead of k*d*b.
    """
    d, f, e, k, t, b = model["d"], model["f"], model["e"], model["k"], model["t"], model["b"]
    ep = min(gpus, e)
    g = hw["gpus_per_node"]
    flops = 3 * 2 * t * k * 3 * d * f  # SwiGLU: 3 matrices; backward = 2x forward
    compute_s = flops / (hw["peak_flops"] * hw["mfu"])
    volume = 4 * t * k * d * b
    off_gpu = volume * (ep - 1) / ep
    if ep <= g:
        inter, intra = 0.0, off_gpu
    else:
        inter = volume * (ep - g) / ep
        intra = volume * (g - 1) / ep
        if node_limit is not None:
            nodes = ep // g
            inter = 4 * t * min(node_limit, k) * d * b * (nodes - 1) / nodes
    nvl_s = intra / (hw["nvlink_Bps"] * hw["nvlink_efficiency"])
    ib_s = inter / (hw["ib_Bps"] * hw["ib_efficiency"])
    comm_s = max(nvl_s, ib_s)  # both links run at once; the slower one bounds the exchange
    return {
        "gpus": gpus, "ep": ep, "dp": gpus // ep, "compute_ms": 1e3 * compute_s,
        "bytes_off_gpu_MB": off_gpu / 1e6, "bytes_off_node_MB": inter / 1e6,
        "nvlink_ms": 1e3 * nvl_s, "ib_ms": 1e3 * ib_s, "comm_ms": 1e3 * comm_s,
        "serial_ms": 1e3 * (compute_s + comm_s),  # no overlap
        "overlapped_ms": 1e3 * max(compute_s, comm_s),  # perfect overlap (two micro-batches)
        "comm_over_compute": comm_s / compute_s,
    }


def extrapolation_table() -> list[dict]:
    rows = []
    for name, model in MODELS.items():
        for gpus in (8, 64, 512):
            r = layer_times(model, gpus)
            rows.append({"model": name, "routing": "plain", **r})
            if name == "deepseek-v3" and gpus > HW["gpus_per_node"]:
                rows.append({"model": name, "routing": "node-limited M=4", **layer_times(model, gpus, node_limit=4)})
    return rows


def print_extrapolation(rows: list[dict]) -> None:
    print(f"{'model':14} {'routing':17} {'GPUs':>5} {'EP':>4} {'DP':>4} {'compute':>8} {'off-node':>9} "
          f"{'NVLink':>7} {'IB':>7} {'serial':>7} {'overlap':>8} {'comm/comp':>9}")
    for r in rows:
        print(f"{r['model']:14} {r['routing']:17} {r['gpus']:5d} {r['ep']:4d} {r['dp']:4d} {r['compute_ms']:7.1f}m "
              f"{r['bytes_off_node_MB']:7.0f}MB {r['nvlink_ms']:6.1f}m {r['ib_ms']:6.1f}m {r['serial_ms']:6.1f}m "
              f"{r['overlapped_ms']:7.1f}m {r['comm_over_compute']:9.2f}")


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens-per-rank", type=int, default=512)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--capacity-factor", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3, help="runs per EP size; the median one is reported")
    ap.add_argument("--json", default=str(REPO / "docs" / "results" / "bench_ep.json"))
    ap.add_argument("--extrapolate", action="store_true", help="print the step-time model and exit")
    args = ap.parse_args()
    rows = extrapolation_table()
    if args.extrapolate:
        print_extrapolation(rows)
        return 0
    conf = {k: getattr(args, k) for k in ("tokens_per_rank", "d_model", "d_ff", "experts", "top_k",
                                           "capacity_factor", "threads", "steps", "warmup", "repeat")}
    print(f"{'EP':>3} {'tok/rank':>8} {'step ms':>8} {'compute':>8} {'a2a ms':>7} {'ctrl ms':>7} {'comm %':>6} "
          f"{'a2a MB':>7} {'model MB':>8} {'exact MB':>8} {'tokens/s':>9}")
    runs: dict[int, list[dict]] = {ep: [] for ep in args.ep}
    # Repeats interleave the EP sizes, so a burst of load from other jobs hits all of them.
    for _ in range(args.repeat):
        for ep in args.ep:
            runs[ep].append(measure(ep, conf))
    results = []
    for ep in args.ep:
        ordered = sorted(runs[ep], key=lambda r: r["step_ms"])
        r = dict(ordered[len(ordered) // 2])  # the repeat with the median step time
        r["repeats_step_ms"] = [x["step_ms"] for x in runs[ep]]
        results.append(r)
        exact = "-" if r["exact_MB_per_rank"] is None else f"{r['exact_MB_per_rank']:.3f}"
        print(f"{r['ep']:3d} {r['tokens_per_rank']:8d} {r['step_ms']:8.1f} {r['compute_ms']:8.1f} {r['comm_ms']:7.1f} "
              f"{r['control_ms']:7.1f} {100 * r['comm_share']:5.1f}% {r['a2a_MB_per_rank']:7.3f} "
              f"{r['model_MB_per_rank']:8.3f} {exact:>8} {r['tokens_per_s']:9.0f}   "
              f"(step ms of the {args.repeat} repeats: {', '.join(f'{v:.0f}' for v in r['repeats_step_ms'])})",
              flush=True)
    record = {
        "date": date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "config": conf,
        "results": results,
        "extrapolation": {"hardware": HW, "models": MODELS, "rows": rows},
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(record, indent=2))
    md = Path(args.json).with_suffix(".md")
    md.write_text(markdown(record))
    print(f"wrote {args.json} and {md}")
    return 0


def markdown(record: dict) -> str:
    c, m = record["config"], record["machine"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        "# bench_ep: expert-parallel MoE layer on gloo (CPU)",
        "",
        f"- date: {record['date']}",
        f"- command: `{record['command']}`",
        f"- machine: {m['cpus']} CPU cores shared with other jobs (1-min load average {load:.1f} at the end "
        f"of the run), {m['platform']}, Python {m['python']}, torch {m['torch']}",
        f"- layer: d_model {c['d_model']}, d_ff {c['d_ff']}, {c['experts']} experts, top-{c['top_k']}, "
        f"{'dropless' if c['capacity_factor'] is None else 'capacity factor ' + str(c['capacity_factor'])}, float32, "
        f"{c['tokens_per_rank']} tokens per rank (weak scaling), {c['threads']} thread per rank, forward + backward, "
        f"{c['steps']} timed steps after {c['warmup']} warm-up; each EP size run {c.get('repeat', 1)} times "
        f"(interleaved), the run with the median step time shown",
        "- EP=1 is the single-process `MoE`; EP>1 is `moekit.parallel.EPMoE`, one process per rank, gloo over loopback",
        "",
        "| EP | global tokens | step (ms) | compute (ms) | all-to-all (ms) | control (ms) | comm share "
        "| a2a MB sent / rank | model MB | exact MB | all-to-alls / step | control collectives / step | tokens/s "
        "| step ms of each repeat |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for x in record["results"]:
        exact = "-" if x["exact_MB_per_rank"] is None else f"{x['exact_MB_per_rank']:.3f}"
        lines.append(
            f"| {x['ep']} | {x['global_tokens']} | {x['step_ms']:.1f} | {x['compute_ms']:.1f} | {x['comm_ms']:.1f} | "
            f"{x['control_ms']:.1f} | {100 * x['comm_share']:.0f}% | {x['a2a_MB_per_rank']:.3f} | "
            f"{x['model_MB_per_rank']:.3f} | {exact} | {x['a2a_calls_per_step']} | {x['control_calls_per_step']} | "
            f"{x['tokens_per_s']:,.0f} | {', '.join(f'{v:.0f}' for v in x.get('repeats_step_ms', []))} |")
    lines += [
        "",
        "- model MB = 4 x tokens x k x d_model x 4 bytes x (ep - 1) / ep, the uniform-routing cost model; exact MB =",
        "  the same count from each step's actual routing (off-rank assignments x 4 crossings), which the measured",
        "  bytes equal.",
        "- all-to-all and control times include waiting for the slowest peer; compute = step - both.",
        "- EP=4 runs 4 processes on 2 cores. docs/scaling.md reads these numbers and extrapolates to GPU clusters",
        "  (`python benchmarks/bench_ep.py --extrapolate`).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
