"""`moekit compare`: the MoE model against its two dense twins, same data, tokens and seed.

    dense-active  every FFN dense, width chosen so its parameters equal the MoE's *active* count
                  (what one token pays in compute): the fair test of the MoE claim
    dense-total   width chosen so its parameters equal the MoE's *total* count (the memory the
                  MoE holds): the upper reference a sparse model hopes to approach

All three share one loaded corpus, the batch sequence (a pure function of seed and step), the
optimizer, schedule and seed; only the FFN blocks differ. The report is written by report.py.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from moekit.train.config import RunConfig
from moekit.train.data import LMData
from moekit.train.loop import TrainResult, train

VARIANTS = ("moe", "dense-active", "dense-total")


def variant_configs(cfg: RunConfig, variants=VARIANTS) -> list[tuple[str, RunConfig]]:
    from moekit.models import dense_twin

    if getattr(cfg.model, "moe", None) is None:
        raise ValueError("compare needs an MoE model config (model.moe is None)")
    out = []
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"compare: unknown variant {name!r}; valid: {list(VARIANTS)}")
        model = cfg.model if name == "moe" else dense_twin(cfg.model, match=name.split("-")[1])
        out.append((name, dataclasses.replace(cfg, model=model, name=f"{cfg.name}-{name}")))
    return out


def run_compare(cfg: RunConfig, out_dir: str | Path, *, variants=VARIANTS, console=None, resume: bool = False,
                write_report: bool = True) -> list[TrainResult]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = LMData.from_config(cfg.data, cfg.seed, cache_dir=out / "cache")
    results = []
    for name, run_cfg in variant_configs(cfg, variants):
        if console is not None:
            console.print(f"[bold]compare:[/bold] training {name}")
        results.append(train(run_cfg, out / name, data=data, label=name, console=console,
                             resume=resume and (out / name / "checkpoints").exists(), overwrite=not resume))
    summary = {r.label: {"steps": r.steps, "tokens": r.tokens, "train_time": r.train_time, "cpu_time": r.cpu_time,
                         "params_total": r.params_total, "params_active": r.params_active,
                         "final_val_bpb": r.final_val_bpb} for r in results}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if write_report:
        from moekit.train.report import write_compare_report

        write_compare_report(out, data=data, console=console)
    return results
