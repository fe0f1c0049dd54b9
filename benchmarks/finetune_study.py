"""Fine-tuning study: full, LoRA (experts + attention), LoRA (attention only) and QLoRA on a domain
the base model never trained on, over several seeds.

    .venv/bin/python benchmarks/finetune_study.py                       # about 15 minutes on 2 cores
    .venv/bin/python benchmarks/finetune_study.py --base runs/compare/moe --seeds 0
    .venv/bin/python benchmarks/finetune_study.py --sweep               # the validation sweep behind LRS

1. The base: `moekit compare`'s MoE (train/presets.py `compare`), trained here for
   `--pretrain-steps` on the standard library's source unless `--base` names a checkpoint.
2. The domain: the English reference text of `pydoc_data/topics.py` (the help topics of the
   Python docs), written as JSONL, one example per run of paragraphs of at most 1,000 characters.
   That file lands in the pretraining corpus's *validation* split (checked below, and the check
   is recorded): the base never trained on it. `moekit finetune` splits the examples by a hash of
   their content into train / validation / test (80/10/10).
3. Each method runs as `moekit finetune` in its own process (so peak memory is its own), same
   data, steps, batch and seed; its report gives trainable parameters, peak memory, tokens/s and
   bits/byte on the validation and test splits before and after.

Learning rates: chosen per method on the validation split by `--sweep` (seed 0, LRS_SWEPT), the
result in docs/results/finetune_sweep.json; test numbers come only from the final runs.

Writes docs/results/finetune_study.json (every report, the command, versions) and
docs/results/finetune_study.md (the table).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = {  # name -> (--method, extra --set values)
    "full": ("full", []),
    "lora": ("lora", ["lora.targets=experts,attention"]),
    "lora-attention": ("lora", ["lora.targets=attention"]),
    "qlora": ("qlora", ["lora.targets=experts,attention", "qlora.bits=4"]),
    # rank 8 (about 13% trainable, past the 5% goal): how far more adapter capacity goes
    "lora-r8": ("lora", ["lora.targets=experts,attention", "lora.rank=8", "lora.alpha=16"]),
}
# Rank 2: the largest power of two that keeps LoRA on experts + attention under 5% of this small
# model's parameters (d_model 64: at rank 16 the adapters would be a quarter of it).
COMMON = ["lora.rank=2", "lora.alpha=4", "data.seq_len=128", "data.batch_size=16", "schedule.warmup_steps=20",
          "eval.every=100", "eval.batches=32", "checkpoint.every=0", "logging.every=20"]
_ADAPTER_LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]
LRS_SWEPT = {"full": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], "lora": _ADAPTER_LRS, "lora-attention": _ADAPTER_LRS,
             "qlora": _ADAPTER_LRS, "lora-r8": [3e-3, 1e-2, 3e-2]}
# The best validation bits/byte of each method's sweep (docs/results/finetune_sweep.json, `best_lr`).
LRS = {"full": 3e-3, "lora": 1e-2, "lora-attention": 3e-2, "qlora": 1e-2, "lora-r8": 1e-2}


def topics_jsonl(path: Path, max_chars: int = 1000) -> dict:
    """The pydoc topics as JSONL examples of whole paragraphs, at most `max_chars` each."""
    import pydoc_data.topics as topics

    lines, total = [], 0
    for key in sorted(topics.topics):
        chunk = ""
        for para in topics.topics[key].split("\n\n"):
            para = para.strip("\n")
            if not para.strip():
                continue
            if chunk and len(chunk) + 2 + len(para) > max_chars:
                lines.append(json.dumps({"text": chunk}))
                chunk = ""
            chunk = para if not chunk else chunk + "\n\n" + para
        if chunk:
            lines.append(json.dumps({"text": chunk}))
    text = "\n".join(lines) + "\n"
    total = len(text.encode())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return {"file": str(path), "examples": len(lines), "bytes": total, "source": topics.__file__}


def check_held_out() -> dict:
    """Where pydoc_data/topics.py sits in the pretraining corpus's split."""
    from moekit.train.data import collect_corpus
    from moekit.train.presets import get_run_preset

    corpus = collect_corpus(get_run_preset("compare").data)
    where = {name: [p for p, _ in files if p.startswith("pydoc_data/")]
             for name, files in (("train", corpus.train_files), ("validation", corpus.val_files),
                                 ("test", corpus.test_files))}
    if where["train"]:
        raise SystemExit(f"pydoc_data is in the pretraining train split ({where['train']}): not a held-out domain")
    return where


def run(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}; see {log}")


def pretrain(out: Path, steps: int) -> Path:
    folder = out / "base"
    if (folder / "checkpoints").exists():
        print(f"base: reusing {folder}", flush=True)
        return folder
    run([sys.executable, "-m", "moekit", "train", "--preset", "compare", "--out", str(folder), "--set",
         f"schedule.steps={steps}", "eval.test=false", "checkpoint.every=0"], out / "base.log")
    return folder


def finetune(base: Path, data: Path, out: Path, name: str, lr: float, seed: int, steps: int) -> dict:
    method, extra = METHODS[name]
    folder = out / f"{name}-lr{lr:g}-seed{seed}"
    report = folder / "report.json"
    if not report.exists():
        run([sys.executable, "-m", "moekit", "finetune", "--checkpoint", str(base), "--data", str(data), "--method",
             method, "--out", str(folder), "--set", *COMMON, *extra, f"optim.lr={lr}", f"seed={seed}",
             f"schedule.steps={steps}"], out / f"{folder.name}.log")
    return json.loads(report.read_text())


def _weight_bytes(report: dict) -> int | None:
    return report.get("weight_bytes")


def summarize(reports: dict[str, list[dict]]) -> dict:
    rows = {}
    for name, reps in reports.items():
        def stat(values):
            return {"mean": statistics.mean(values), "min": min(values), "max": max(values), "values": values}
        before = [r["before"]["test_bpb"] for r in reps]
        after = [r["after"]["test_bpb"] for r in reps]
        rows[name] = {
            "seeds": [r["seed"] for r in reps],
            "trainable": reps[0]["params"]["trainable"], "total": reps[0]["params"]["total"],
            "trainable_fraction": reps[0]["params"]["fraction"],
            "peak_memory_mib": stat([r["peak_memory_bytes"] / 2**20 for r in reps]),
            "weight_mib": reps[0].get("weight_bytes", 0) / 2**20,
            "step_seconds": stat([r["train_seconds"] / r["steps"] for r in reps]),
            "test_bpb_before": stat(before), "test_bpb_after": stat(after),
            "val_bpb_after": stat([r["after"]["val_bpb"] for r in reps]),
            "improvement": stat([b - a for b, a in zip(before, after)]),
        }
    full = rows.get("full")
    for name, row in rows.items():
        if full and name != "full":
            row["recovered_of_full"] = row["improvement"]["mean"] / full["improvement"]["mean"]
    if "qlora" in rows and "lora" in rows:
        q, lo = rows["qlora"], rows["lora"]
        q["final_bpb_gap_to_lora"] = q["test_bpb_after"]["mean"] / lo["test_bpb_after"]["mean"] - 1
        if lo["weight_mib"]:
            q["weight_memory_vs_lora"] = q["weight_mib"] / lo["weight_mib"]
    return rows


def table(rows: dict) -> str:
    out = ["| method | trainable | weights (MiB) | peak memory (MiB) | step (s) | test bpb before | "
           "test bpb after (mean [min-max]) | improvement | of full's |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        a = r["test_bpb_after"]
        out.append(
            f"| {name} | {r['trainable']:,} ({100 * r['trainable_fraction']:.2f}%) | {r['weight_mib']:.2f} | "
            f"{r['peak_memory_mib']['mean']:.0f} | {r['step_seconds']['mean']:.3f} | "
            f"{r['test_bpb_before']['mean']:.4f} | {a['mean']:.4f} [{a['min']:.4f}-{a['max']:.4f}] | "
            f"{r['improvement']['mean']:.4f} | "
            f"{'' if 'recovered_of_full' not in r else format(r['recovered_of_full'], '.0%')} |")
    return "\n".join(out)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/finetune-study", help="run folders (created)")
    ap.add_argument("--base", default=None, help="a base checkpoint; default: pretrain compare's MoE here")
    ap.add_argument("--pretrain-steps", type=int, default=800)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--sweep", action="store_true", help="the learning-rate sweep on validation (seed 0)")
    ap.add_argument("--results", default="docs/results", help="where the JSON and the table go")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    held_out = check_held_out()
    data = topics_jsonl(out / "pydoc_topics.jsonl")
    base = Path(args.base) if args.base else pretrain(out, args.pretrain_steps)
    names = [m.strip() for m in args.methods.split(",")]
    bad = [m for m in names if m not in METHODS]
    if bad:
        print(f"--methods: unknown {bad}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    meta = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "command": "python " + " ".join(sys.argv),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
            "versions": {"python": platform.python_version()}, "base": str(base), "data": data,
            "pretraining_split_of_pydoc_data": held_out, "common_settings": COMMON, "steps": args.steps}
    if args.sweep:
        sweep = {name: {str(lr): finetune(base, Path(data["file"]), out, name, lr, 0, args.steps)["after"]["val_bpb"]
                        for lr in LRS_SWEPT[name]} for name in names}
        path = Path(args.results) / "finetune_sweep.json"
        if path.exists():  # a sweep of some methods keeps the others' entries
            sweep = {**json.loads(path.read_text())["val_bpb"], **sweep}
        best = {name: min(v, key=v.get) for name, v in sweep.items()}
        _write(path, json.dumps({**meta, "val_bpb": sweep, "best_lr": best}, indent=1))
        print(json.dumps({"val_bpb": sweep, "best_lr": best}, indent=1))
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    reports = {}
    for name in names:
        reports[name] = []
        for seed in seeds:
            rep = finetune(base, Path(data["file"]), out, name, LRS[name], seed, args.steps)
            rep["seed"] = seed
            reports[name].append(rep)
    rows = summarize(reports)
    import torch

    meta["versions"]["torch"] = torch.__version__
    meta["learning_rates"] = {n: LRS[n] for n in names}
    meta["seconds"] = time.time() - started
    _write(Path(args.results) / "finetune_study.json", json.dumps({**meta, "rows": rows, "reports": reports},
                                                                  indent=1))
    text = table(rows)
    _write(Path(args.results) / "finetune_study.md",
           f"# Fine-tuning study ({meta['date'][:10]})\n\n`{meta['command']}`, seeds {seeds}, "
           f"{args.steps} steps each, {meta['seconds'] / 60:.1f} minutes in all.\n\n{text}\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
