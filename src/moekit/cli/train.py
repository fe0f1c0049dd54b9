"""`moekit train --preset NAME [--set a.b=c ...] [--out DIR] [--resume]`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rich.console import Console

from moekit.cli.common import add_run_arguments, config_json, print_presets, resolve_config

HELP = "train a model from a preset: checkpoints, JSONL and TensorBoard logs, a progress bar"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, default_preset=None)


def run(args: argparse.Namespace) -> int:
    from moekit.train.checkpoint import CheckpointError
    from moekit.train.loop import NonFiniteError, train

    console = Console(stderr=True)
    if args.list_presets:
        print_presets(Console())
        return 0
    cfg = resolve_config(args)
    if args.show_config:
        print(json.dumps(config_json(cfg), indent=2))
        return 0
    out = Path(args.out or f"runs/{args.preset}")
    try:
        result = train(cfg, out, resume=args.resume, console=console)
    except NonFiniteError as err:
        # The run failed (not the user's input): exit 1; the last good checkpoint is kept.
        print(f"moekit train: error: {err}", file=sys.stderr)
        return 1
    except CheckpointError as err:
        # A missing or damaged checkpoint to resume from: the user's to fix (exit 2, like every
        # input error; CheckpointError may be a ValueError, then cli.main would say the same).
        print(f"moekit train: error: {err}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 reports for the job
    if result.already_finished:
        return 0  # train() said so ("already finished ... nothing to do"); nothing was written
    bpb = f"{result.final_val_bpb:.4f}" if result.final_val_bpb is not None else "n/a"
    console.print(f"done: {result.steps} steps, {result.tokens:,} tokens, {result.train_time:.0f} s; "
                  f"val {bpb} bits/byte; run folder {out}", soft_wrap=True, markup=False)
    return 0
