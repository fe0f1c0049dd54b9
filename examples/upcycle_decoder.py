r"""Sparse upcycling shown on a tiny decoder: train it dense with moekit's trainer, then continue
two ways for the same number of tokens: (a) dense, as it is; (b) upcycled to a MoE of copies of
its FFNs (moekit.convert.upcycle; Komatsuzaki et al. 2022). Both continuations use the same
schedule, data order and validation windows; the validation curves go to docs/results/.

    python examples/upcycle_decoder.py                 # trains the dense model itself (~4 minutes), or
    moekit train --preset tiny-dense --out runs/upcycle/dense --set model.d_ff=256 data.max_bytes=4000000 \
        data.seq_len=128 data.batch_size=16 schedule.steps=600 schedule.warmup_steps=30 optim.lr=2e-3 \
        eval.every=50 eval.batches=8 checkpoint.every=0 threads=1 logging.tensorboard=off
    python examples/upcycle_decoder.py --dense runs/upcycle/dense --steps 600   # continue from its checkpoint

Data: the Python standard library's own source (the trainer's default corpus), byte tokens.
Writes docs/results/upcycle_decoder.{md,json,png} (--results none to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from moekit.convert import ffn_flops_per_token, upcycle
from moekit.machine import cpu_name
from moekit.models import DecoderConfig, count_parameters, load_checkpoint
from moekit.train.checkpoint import resolve
from moekit.train.config import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    ScheduleConfig,
)
from moekit.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


def dense_config(d_model: int = 64, n_layers: int = 2, d_ff: int = 256) -> DecoderConfig:
    """The tiny dense decoder (the `tiny-dense` preset's attention, a wider FFN)."""
    return DecoderConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=d_ff,
                         max_seq_len=256)


def run_config(model_cfg, name: str, steps: int, seed: int, lr: float, args) -> RunConfig:
    return RunConfig(
        model=model_cfg, name=name, seed=seed, threads=args.threads,
        data=DataConfig(max_bytes=args.max_bytes, seq_len=args.seq_len, batch_size=args.batch_size),
        optim=OptimConfig(lr=lr, weight_decay=0.1, grad_clip=1.0),
        schedule=ScheduleConfig(steps=steps, warmup_steps=max(1, steps // 20), min_lr_ratio=0.1),
        eval=EvalConfig(every=max(1, steps // args.evals), batches=args.eval_batches),
        checkpoint=CheckpointConfig(every=0, keep_last=1),
        logging=LoggingConfig(every=max(1, steps // 20), progress=not args.quiet, tensorboard="off"),
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dense", type=Path, default=None, help="a `moekit train` run (or checkpoint) of a dense decoder")
    p.add_argument("--dense-steps", type=int, default=600, help="steps of the dense run when --dense is not given")
    p.add_argument("--steps", type=int, default=600, help="continuation steps, the same for both")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--granularity", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr of the dense run")
    p.add_argument("--continue-lr", type=float, default=1e-3, help="peak lr of both continuations")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--max-bytes", type=int, default=4_000_000)
    p.add_argument("--evals", type=int, default=12, help="validation passes per run")
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core machine)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "runs" / "upcycle")
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "results" / "upcycle_decoder",
                   help="results path without suffix; 'none' to skip")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv[1:])
    out = args.out_dir

    # 1. The dense model: from a `moekit train` run, or trained here with the same trainer.
    phase1 = None
    if args.dense is not None:
        dense_dir = resolve(args.dense)
        dense = load_checkpoint(dense_dir)
        phase1_evals = _evals_of(args.dense)
        run_json = Path(args.dense) / "run.json"
        if run_json.is_file():  # continue on the dense run's own data (same corpus, same validation windows)
            data = json.loads(run_json.read_text())["config"]["data"]
            args.max_bytes, args.seq_len, args.batch_size = data["max_bytes"], data["seq_len"], data["batch_size"]
    else:
        cfg1 = run_config(dense_config(), "dense", args.dense_steps, 0, args.lr, args)
        phase1 = train(cfg1, out / "dense", overwrite=True)
        dense = load_checkpoint(resolve(out / "dense"))
        phase1_evals = phase1.evals
    if not isinstance(dense.cfg, DecoderConfig) or dense.cfg.moe is not None:
        print(f"{args.dense}: not a dense decoder checkpoint", file=sys.stderr)
        return 2
    start_tokens = phase1_evals[-1]["tokens"] if phase1_evals else 0

    # 2. Continue dense and upcycled, identically (seed 1: a new sample order for both).
    moe_model = upcycle(dense, num_experts=args.experts, top_k=args.top_k, granularity=args.granularity)
    runs = {}
    for label, model in (("dense", dense), ("upcycled", moe_model)):
        cfg = run_config(model.cfg, f"continue-{label}", args.steps, 1, args.continue_lr, args)
        runs[label] = train(cfg, out / f"continue-{label}", overwrite=True, model_factory=lambda _cfg, m=model: m)

    result = {
        "dense_config": {k: v for k, v in vars(dense.cfg).items() if k not in ("moe", "mla")},
        "upcycle": {"num_experts": args.experts, "top_k": args.top_k, "granularity": args.granularity,
                    "router": moe_model.cfg.moe.router},
        "params": {"dense": count_parameters(dense), "upcycled": count_parameters(moe_model)},
        "ffn_flops_per_token": {"dense": ffn_flops_per_token(dense), "upcycled": ffn_flops_per_token(moe_model)},
        "tokens_per_step": runs["dense"].tokens // max(1, runs["dense"].steps),
        "phase1_tokens": start_tokens, "continue_lr": args.continue_lr, "threads": args.threads,
        "phase1": [_slim(e) for e in phase1_evals],
        "continue": {k: [_slim(e, start_tokens) for e in r.evals] for k, r in runs.items()},
        "train_seconds": {"phase1": None if phase1 is None else round(phase1.train_time, 1),
                          **{k: round(r.train_time, 1) for k, r in runs.items()}},
    }
    d0, u0 = result["continue"]["dense"][0]["val_bpb"], result["continue"]["upcycled"][0]["val_bpb"]
    dn, un = result["continue"]["dense"][-1]["val_bpb"], result["continue"]["upcycled"][-1]["val_bpb"]
    print(f"at the upcycling point: dense {d0:.4f}, upcycled {u0:.4f} bits/byte (equal: the experts are copies)")
    print(f"after {args.steps} more steps: dense {dn:.4f}, upcycled {un:.4f} bits/byte")
    if str(args.results) != "none":
        write_results(result, argv, args.results)
        print(f"wrote {args.results.with_suffix('.md')}, .json, .png")
    return 0


def _evals_of(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "eval"]


def _slim(rec: dict, offset: int = 0) -> dict:
    return {"step": rec["step"], "tokens": rec["tokens"] + offset, "val_loss": round(rec["val_loss"], 5),
            "val_bpb": round(rec["val_bpb"], 5)}


def write_results(result: dict, argv: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result["meta"] = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "command": "python " + " ".join(argv),
                      "machine": f"{cpu_name()}, {os.cpu_count()} cores (shared), {result['threads']} torch thread(s)",
                      "python": platform.python_version(), "torch": torch.__version__}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    if result["phase1"]:
        ax.plot([e["tokens"] / 1e6 for e in result["phase1"]], [e["val_bpb"] for e in result["phase1"]],
                color="0.5", label="dense (first run)")
    for label, color in (("dense", "C0"), ("upcycled", "C3")):
        ev = result["continue"][label]
        name = "dense, continued" if label == "dense" else (
            f"upcycled: {result['upcycle']['num_experts']} copies, top-{result['upcycle']['top_k']}")
        ax.plot([e["tokens"] / 1e6 for e in ev], [e["val_bpb"] for e in ev], color=color, marker=".", label=name)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("validation bits per byte")
    lows = [e["val_bpb"] for k in ("dense", "upcycled") for e in result["continue"][k]]
    ax.set_ylim(min(lows) - 0.05, max(lows) + 0.15)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Sparse upcycling of a tiny byte-level decoder")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)

    r, m = result, result["meta"]
    dense_ev, up_ev = r["continue"]["dense"], r["continue"]["upcycled"]
    rows = "\n".join(f"| {d['step']} | {d['tokens'] / 1e6:.3f} | {d['val_bpb']:.4f} | {u['val_bpb']:.4f} | "
                     f"{d['val_bpb'] - u['val_bpb']:+.4f} |" for d, u in zip(dense_ev, up_ev))
    fl, pa = r["ffn_flops_per_token"], r["params"]
    cfg = r["dense_config"]
    text = f"""# Sparse upcycling of a tiny decoder (results)

Generated by `{m['command']}` on {m['date']} ({m['machine']}; Python {m['python']}, torch {m['torch']}).
Raw numbers: `upcycle_decoder.json`; plot: `upcycle_decoder.png`.

Dense model: decoder, d_model {cfg['d_model']}, {cfg['n_layers']} layers, SwiGLU FFN width {cfg['d_ff']}, byte
vocabulary, trained with `moekit train` on the standard-library corpus (grey curve; {r['phase1_tokens'] / 1e6:.2f}M
tokens). It is then continued for the same number of tokens ({r['tokens_per_step']} per step) two ways, with the
same schedule (peak lr {r['continue_lr']}, warmup, cosine), data order and validation windows: as it is, and
upcycled by `moekit.convert.upcycle` to {r['upcycle']['num_experts']} copies of each FFN, router
{r['upcycle']['router']} top-{r['upcycle']['top_k']} (granularity {r['upcycle']['granularity']}).

| | dense | upcycled |
|---|---|---|
| parameters (total / active per token) | {pa['dense'][0]:,} / {pa['dense'][1]:,} | {pa['upcycled'][0]:,} / \
{pa['upcycled'][1]:,} |
| FFN forward FLOPs per token | {fl['dense']:,.0f} | {fl['upcycled']:,.0f} |
| training time of the continuation (s) | {r['train_seconds']['dense']} | {r['train_seconds']['upcycled']} |

Validation bits per byte during the continuation (step 0 is the upcycling point: both models
compute the same function there):

| step | tokens (M, total) | dense | upcycled | dense - upcycled |
|---|---|---|---|---|
{rows}

![validation curves](upcycle_decoder.png)
"""
    out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
