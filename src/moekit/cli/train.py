"""`moekit train --preset NAME [--set a.b=c ...] [--out DIR] [--resume]`."""

from __future__ import annotations

import argparse
import os

from rich.console import Console

from moekit.cli.common import add_run_arguments, start_run, training_failed

HELP = "train a model from a preset: checkpoints, JSONL and TensorBoard logs, a progress bar"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, default_preset=None)


def run(args: argparse.Namespace) -> int:
    from moekit.train.loop import NonFiniteError, train

    console = Console(stderr=True)
    started = start_run(args)
    if started is None:
        return 0
    cfg, out = started
    try:
        result = train(cfg, out, resume=args.resume, console=console)
    except NonFiniteError as err:
        return training_failed("train", err)
    # (a missing or damaged checkpoint to resume from is a CheckpointError, a ValueError:
    # cli.main says so in one line with exit status 2)
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun rank 0 reports for the job
    if result.already_finished:
        return 0  # train() said so ("already finished ... nothing to do"); nothing was written
    bpb = f"{result.final_val_bpb:.4f}" if result.final_val_bpb is not None else "n/a"
    test = (f"; test {result.test_bpb:.4f} bits/byte ({result.test['test_bytes']:,} bytes)"
            if result.test_bpb is not None else "")
    console.print(f"done: {result.steps} steps, {result.tokens:,} tokens, {result.train_time:.0f} s; "
                  f"val {bpb} bits/byte{test}; run folder {out}", soft_wrap=True, markup=False)
    return 0
