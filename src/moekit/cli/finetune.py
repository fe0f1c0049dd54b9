"""`moekit finetune --checkpoint PATH --data FILE --method lora|qlora|full --out DIR [--set k=v ...] [--resume]`."""

from __future__ import annotations

import argparse
import os

from moekit.cli.common import CHECKPOINT_HELP, training_failed

HELP = "fine-tune a checkpoint on a JSONL file: LoRA, QLoRA or full, with checkpoints, logs and a report"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="the base model: " + CHECKPOINT_HELP)
    p.add_argument("--data", required=True, metavar="FILE",
                   help='JSONL, one example a line: {"text": ...} or {"prompt": ..., "response": ...}')
    p.add_argument("--method", required=True, choices=("lora", "qlora", "full"))
    p.add_argument("--out", required=True, metavar="DIR", help="the run folder")
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a setting: schedule.*, optim.*, eval.*, checkpoint.*, logging.*, data.seq_len, "
                        "data.batch_size, data.val_fraction, data.test_fraction, lora.rank, lora.alpha, "
                        "lora.dropout, lora.targets, lora.experts, lora.rslora, lora.train_router, "
                        "lora.train_norms, qlora.bits, qlora.block (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from moekit.finetune.job import finetune
    from moekit.finetune.report import report_lines
    from moekit.train.loop import NonFiniteError

    console = Console(stderr=True)
    sets = [a for group in args.overrides for a in group]
    try:
        report = finetune(args.checkpoint, args.data, args.method, args.out, sets=sets, resume=args.resume,
                          console=console)
    except NonFiniteError as err:
        return training_failed("finetune", err)
    if os.environ.get("RANK", "0") != "0":
        return 0
    for line in report_lines(report):
        console.print(line, soft_wrap=True, markup=False)
    console.print(f"report: {os.path.join(args.out, 'report.json')}", soft_wrap=True, markup=False)
    return 0
