"""`moekit compare`: MoE vs active- and total-matched dense models, then report.md with plots."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from moekit.cli.common import add_run_arguments, start_run, training_failed

HELP = "train the MoE and its two dense twins on the same data and write report.md with plots"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p, default_preset="compare")
    p.add_argument("--only", nargs="+", default=None, choices=["moe", "dense-active", "dense-total"],
                   help="train only these variants (the report covers whatever run folders exist)")
    p.add_argument("--report-only", action="store_true", help="rebuild report.md from the run folders in --out")
    p.add_argument("--workers", default="auto",
                   help="processes training variants side by side, each with cores/workers threads "
                        "(default auto: one per variant up to the core count; 1 = one after the other)")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="train the MoE and dense-active once per seed (e.g. 0,1,2) and report the mean and "
                        "min-max; dense-total trains at the first seed only (default: run.seed, one seed)")


def run(args: argparse.Namespace) -> int:
    from moekit.train.compare import VARIANTS, refresh_summary_headline, run_compare
    from moekit.train.data import LMData
    from moekit.train.headline import parse_seeds
    from moekit.train.loop import NonFiniteError
    from moekit.train.report import write_compare_report
    from moekit.train.runfolder import open_compare_folder

    console = Console(stderr=True)
    seeds = parse_seeds(args.seeds)  # before start_run: a bad value must not touch the folder
    started = start_run(args)
    if started is None:
        return 0
    cfg, out = started
    if args.report_only:
        if not out.is_dir():
            raise ValueError(f"--report-only: {out} is not a folder; point --out at a compare folder")
        with open_compare_folder(out, "moekit compare --report-only"):
            data = LMData.from_config(cfg.data, cfg.seed, cache_dir=out / "cache")
            refresh_summary_headline(out)
            path = write_compare_report(out, data=data, console=console)
    else:
        try:
            run_compare(cfg, out, variants=tuple(args.only or VARIANTS), console=console, resume=args.resume,
                        workers=args.workers, seeds=seeds)
        except NonFiniteError as err:
            return training_failed("compare", err)
        path = out / "report.md"
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").exists() else {}
    if summary:
        table = Table(title="moekit compare")
        for col in ("model", "params total", "params active", "tokens", "train s", "val bits/byte", "test bits/byte"):
            table.add_column(col, justify="left" if col == "model" else "right", no_wrap=col == "model")
        for name, r in summary["models"].items():
            bpb, test = (f"{r[k]:.4f}" if r.get(k) is not None else "-" for k in ("final_val_bpb", "test_bpb"))
            table.add_row(name, f"{r['params_total']:,}", f"{r['params_active']:,}", f"{r['tokens']:,}",
                          f"{r['train_time']:.0f}", bpb, test)
        Console().print(table)
    if summary.get("gap_pct_equal_tokens") is not None:
        h = summary
        console.print(f"MoE vs dense-active at equal tokens, {h['split']} split, seeds {h['seeds']}: "
                      f"{h['gap_pct_equal_tokens']:+.2f}% mean (min {h['gap_pct_equal_tokens_min']:+.2f}%, max "
                      f"{h['gap_pct_equal_tokens_max']:+.2f}%; positive = MoE lower)", soft_wrap=True)
    gaps = json.loads((out / "gaps.json").read_text()) if (out / "gaps.json").exists() else {}
    if "equal_tokens" in gaps:
        e = gaps["equal_tokens"]
        console.print(f"validation, seed {(summary.get('seeds') or ['?'])[0]}: MoE vs dense-active at equal tokens: "
                      f"{e['moe_bpb']:.4f} vs {e['dense_active_bpb']:.4f} "
                      f"bits/byte ({100 * e['gap']:+.2f}% in the MoE's favour)")
    for key, what in (("equal_time", "wall-clock"), ("equal_cpu_time", "CPU time")):
        if key in gaps:
            t = gaps[key]
            console.print(f"at equal {what} ({t['seconds']:.0f} s): {t['moe_bpb']:.4f} vs "
                          f"{t['dense_active_bpb']:.4f} ({100 * t['gap']:+.2f}%)")
    print(f"report: {path}")
    return 0
