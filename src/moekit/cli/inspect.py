"""`moekit inspect --checkpoint PATH`: per-layer routing statistics of a checkpoint on some text,
and the routing plots (load, entropy, drops over training when the run's log is beside it,
expert specialisation on the text). The checkpoint is resolved and verified as by every command
that reads a model (`cli/common.open_checkpoint`): a damaged or incomplete one is an error."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from moekit.cli.common import (
    CHECKPOINT_HELP,
    add_fallback_argument,
    load_checkpoint_tokenizer,
    load_model,
    open_checkpoint,
    read_checkpoint_json,
)

HELP = "print per-layer routing statistics of a checkpoint on a text and write the routing plots"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", metavar="PATH", required=True, help=CHECKPOINT_HELP)
    add_fallback_argument(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="text to route (default: the run's validation files)")
    src.add_argument("--file", help="file whose text to route")
    p.add_argument("--tokens", type=int, default=16384, help="at most this many tokens (default 16384)")
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the run's data.seq_len)")
    p.add_argument("--out", default=None,
                   help="folder to write the plots and routing_counts.npz into (default: none, print only)")


def _run_dir_of(ckpt_dir: Path) -> Path | None:
    """The run folder holding metrics.jsonl: <run>/checkpoints/step-N -> <run>."""
    for candidate in (ckpt_dir.parent.parent, ckpt_dir.parent, ckpt_dir):
        if (candidate / "metrics.jsonl").exists():
            return candidate
    return None


def run(args: argparse.Namespace) -> int:
    from moekit.checkfiles import CheckpointError
    from moekit.train.config import DataConfig
    from moekit.train.data import collect_corpus
    from moekit.train.report import load_run, routing_plots, specialisation_lines
    from moekit.train.routing import CLASSES, collect_routing, labelled_tokens

    console = Console()
    if args.tokens < 1:
        raise ValueError(f"--tokens must be >= 1, got {args.tokens}")
    ref = open_checkpoint(args.checkpoint, fallback=args.fallback)  # errors reach `moekit` main: one line
    ckpt_dir = ref.path
    model = load_model(ref)
    tokenizer = load_checkpoint_tokenizer(ckpt_dir)
    data_cfg = read_checkpoint_json(ckpt_dir, "run_config.json").get("data", {})
    if not isinstance(data_cfg, dict):
        raise CheckpointError(f"{ckpt_dir / 'run_config.json'}: 'data' is not an object")
    seq_len = args.seq_len or data_cfg.get("seq_len") or min(256, getattr(model.cfg, "max_seq_len", 256))
    if args.text is not None:
        files, source = [("text", args.text.encode())], "--text"
    elif args.file is not None:
        files, source = [(args.file, Path(args.file).read_bytes())], args.file
    else:
        fields = {k: v for k, v in data_cfg.items() if k in DataConfig.__dataclass_fields__}
        corpus = collect_corpus(DataConfig(**fields))
        files, source = corpus.val_files, f"validation split of {corpus.info['source']} ({corpus.info['root']})"
    ids, classes = labelled_tokens(tokenizer, files, args.tokens)
    seq_len = min(seq_len, len(ids))
    if seq_len < 1:
        raise ValueError("the text is empty after tokenization")
    summary = collect_routing(model, ids, classes, seq_len)
    routed = (len(ids) // seq_len) * seq_len

    console.print(f"checkpoint {ckpt_dir}; text: {source}; {routed} tokens in windows of {seq_len}")
    table = Table(title="routing per MoE layer")
    for col in ("layer", "load share per expert (%)", "max/mean", "entropy", "idle", "dropped"):
        table.add_column(col, justify="left" if col.startswith("load") else "right")
    for layer in summary.layers:
        tpe = summary.tokens_per_expert[layer]
        share = tpe / max(tpe.sum(), 1)
        s = summary.scalars[layer]
        table.add_row(str(layer), " ".join(f"{100 * v:.0f}" for v in share), f"{s['load_imbalance']:.2f}",
                      f"{s['router_entropy']:.3f}", str(s["experts_without_tokens"]),
                      f"{100 * s['drop_fraction']:.1f}%")
    console.print(table)
    dist = summary.class_tokens / max(summary.class_tokens.sum(), 1)
    console.print("token classes: " + ", ".join(f"{n} {100 * v:.1f}%" for n, v in zip(CLASSES, dist, strict=True)))
    console.print("experts that over-receive a class (lift = share at the expert / its overall share):")
    for line in specialisation_lines(summary):
        console.print("  " + line)
    if not args.out:  # never into the checkpoint (or any folder the user did not name)
        console.print("plots: pass --out DIR to write them")
        return 0
    out = Path(args.out)
    run_dir = _run_dir_of(ckpt_dir)
    run = load_run(run_dir) if run_dir is not None else None
    made = routing_plots(run, summary, out)
    np.savez(out / "routing_counts.npz", classes=np.array(CLASSES),
             **{f"layer{layer}": summary.counts[layer] for layer in summary.layers})
    for name, path in made.items():
        console.print(f"wrote {name}: {path}")
    return 0
