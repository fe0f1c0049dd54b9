"""`moekit compare`: the MoE model against its two dense twins, same data, tokens and seed.

    dense-active  every FFN dense, width chosen so its parameters equal the MoE's *active* count
                  (what one token pays in compute): the fair test of the MoE claim
    dense-total   width chosen so its parameters equal the MoE's *total* count (the memory the
                  MoE holds): the upper reference a sparse model hopes to approach

All three share the corpus, the batch sequence (a pure function of seed and step), the optimizer,
schedule and seed; only the FFN blocks differ. With `seeds`, the MoE and dense-active train once
per seed (folders `<variant>-seed<N>`) and dense-total once, at the first seed: it is the
memory-matched reference, not part of the headline gap, and the costliest run. The headline
(headline.py: test bits per byte over seeds, the gap) goes to summary.json; the report is
written by report.py.

With `workers` > 1 the runs train in separate processes, each with cores // workers threads,
assigned longest-first to the least-loaded worker (on 2 cores: dense-total in one process, MoE
then dense-active in the other). Small models use two single-threaded processes far better than
one two-threaded one, and the MoE and dense-active runs still see the same conditions (both run
beside dense-total), so their wall-clock comparison stays fair. The thread count of a run is
fixed for the whole run: raising it when another worker finished (as moekit did before) made the
arithmetic depend on timing, since torch's CPU reductions split their work by thread count and
add the pieces in another order (tests/train/test_compare_seeds.py shows one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from moekit.train.config import RunConfig
from moekit.train.data import LMData
from moekit.train.distributed import check_launch
from moekit.train.headline import VARIANTS, find_runs, headline, run_name
from moekit.train.loop import TrainResult, train
from moekit.train.metrics import read_jsonl
from moekit.train.runfolder import open_compare_folder, write_atomic
from moekit.train.steps import resolve_device


def variant_configs(cfg: RunConfig, variants=VARIANTS) -> list[tuple[str, RunConfig]]:
    from moekit.models import dense_twin

    if getattr(cfg.model, "moe", None) is None:
        raise ValueError("compare needs an MoE model config (model.moe is None)")
    out = []
    for name in variants:
        if name not in VARIANTS:
            raise ValueError(f"compare: unknown variant {name!r}; valid: {list(VARIANTS)}")
        if name == "moe":
            out.append((name, dataclasses.replace(cfg, name=f"{cfg.name}-{name}")))
            continue
        model = dense_twin(cfg.model, match=name.split("-")[1])
        optim = cfg.optim
        if cfg.compare.dense_lr is not None:
            optim = dataclasses.replace(optim, lr=cfg.compare.dense_lr)
        out.append((name, dataclasses.replace(cfg, model=model, optim=optim, name=f"{cfg.name}-{name}")))
    return out


def seeded_configs(cfg: RunConfig, variants=VARIANTS, seeds: list[int] | None = None) -> list[tuple[str, RunConfig]]:
    """(run folder name, config) of every run: each variant at each seed, dense-total at the first
    seed only (see the module docstring). One seed keeps the bare variant names."""
    seeds = list(seeds) if seeds else [cfg.seed]
    out = []
    for variant, vcfg in variant_configs(cfg, variants):
        for seed in seeds[:1] if variant == "dense-total" else seeds:
            name = run_name(variant, seed, seeds)
            out.append((name, dataclasses.replace(vcfg, seed=seed, name=f"{cfg.name}-{name}")))
    return out


def _variant(name: str) -> str:
    return next(v for v in sorted(VARIANTS, key=len, reverse=True) if name.startswith(v))


def resolve_workers(workers: int | str, num_variants: int) -> int:
    if workers == "auto":
        return max(1, min(num_variants, os.cpu_count() or 1))
    workers = int(workers)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 or 'auto', got {workers}")
    return min(workers, num_variants)


def plan_workers(configs: list[tuple[str, RunConfig]], workers: int) -> list[list[tuple[str, RunConfig]]]:
    """Longest-processing-time-first: estimated cost = active parameters (compute per token)."""
    from moekit.models import count_parameters

    costs = {name: count_parameters(c.model)[1] for name, c in configs}
    groups: list[list[tuple[str, RunConfig]]] = [[] for _ in range(workers)]
    load = [0] * workers
    for name, c in sorted(configs, key=lambda nc: -costs[nc[0]]):
        i = load.index(min(load))
        groups[i].append((name, c))
        load[i] += costs[name]
    # Within a worker keep the canonical order (moe before dense-active, seeds in order) for readable logs.
    order = {v: i for i, v in enumerate(VARIANTS)}
    return [sorted(g, key=lambda nc: (order[_variant(nc[0])], nc[1].seed)) for g in groups if g]


def _train_group(group: list[tuple[str, RunConfig]], out: str, resume: bool) -> list[TrainResult]:
    """One worker process: train its runs one after the other, silently (the parent reports)."""
    results = []
    data = None
    for name, cfg in group:
        cfg = dataclasses.replace(cfg, logging=dataclasses.replace(cfg.logging, progress=False))
        if data is None:
            data = LMData.from_config(cfg.data, cfg.seed, cache_dir=Path(out) / "cache")
        run_dir = Path(out) / name
        results.append(train(cfg, run_dir, data=data.with_seed(cfg.seed), label=name,
                             resume=resume and (run_dir / "checkpoints").exists(), overwrite=not resume))
    return results


def _watch(futures, runs: dict[str, tuple[Path, int]], console) -> None:
    """Progress bars in the parent, fed by the workers' metrics.jsonl files."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    live = console.is_terminal
    bar = Progress(TextColumn("[bold]{task.description:<13}"), BarColumn(bar_width=20), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("{task.fields[stats]}"), console=console, disable=not live)
    printed: dict[str, int] = {}
    with bar:
        tasks = {name: bar.add_task(name, total=steps, stats="") for name, (_, steps) in runs.items()}
        while True:
            for name, (run_dir, _) in runs.items():
                records = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").exists() else []
                train_recs = [r for r in records if r.get("kind") == "train"]
                evals = [r for r in records if r.get("kind") == "eval"]
                stats = ""
                if train_recs:
                    r = train_recs[-1]
                    stats = f"loss {r['loss']:.3f}  {r['tokens_per_s']:,.0f} tok/s"
                if evals:
                    stats += f"  val {evals[-1]['val_bpb']:.3f} bpb"
                    if not live and printed.get(name) != evals[-1]["step"]:
                        # Not a terminal (a log file, CI): one line per evaluation instead of bars.
                        printed[name] = evals[-1]["step"]
                        console.print(f"{name}: step {evals[-1]['step']}/{runs[name][1]}  {stats}", soft_wrap=True)
                bar.update(tasks[name], completed=train_recs[-1]["step"] if train_recs else 0, stats=stats)
            if all(f.done() for f in futures):
                break
            time.sleep(2.0)


def run_compare(cfg: RunConfig, out_dir: str | Path, *, variants=VARIANTS, console=None, resume: bool = False,
                write_report: bool = True, workers: int | str = 1, seeds: list[int] | None = None) -> list[TrainResult]:
    """Train the variants in `<out_dir>/<variant>` (`<variant>-seed<N>` with several `seeds`) and
    write summary.json and the report in `out_dir`. `out_dir` is locked for the whole call (each
    run's training locks its own run folder as well, in whichever process trains it)."""
    out = Path(out_dir)
    configs = seeded_configs(cfg, variants, seeds)
    resolve_device(cfg)
    check_launch(cfg, "compare")
    with open_compare_folder(out):
        return _run_compare(cfg, out, configs, console=console, resume=resume, write_report=write_report,
                            workers=workers)


def _run_compare(cfg: RunConfig, out: Path, configs: list[tuple[str, RunConfig]], *, console, resume: bool,
                 write_report: bool, workers: int | str) -> list[TrainResult]:
    n_workers = resolve_workers(workers, len(configs))
    if n_workers == 1:
        data = LMData.from_config(cfg.data, cfg.seed, cache_dir=out / "cache")
        results = []
        for name, run_cfg in configs:
            if console is not None:
                console.print(f"[bold]compare:[/bold] training {name}")
            run_dir = out / name
            results.append(train(run_cfg, run_dir, data=data.with_seed(run_cfg.seed), label=name, console=console,
                                 resume=resume and (run_dir / "checkpoints").exists(), overwrite=not resume))
    else:
        threads = max(1, (os.cpu_count() or 1) // n_workers)
        if cfg.threads == 0:
            configs = [(n, dataclasses.replace(c, threads=threads)) for n, c in configs]
        groups = plan_workers(configs, n_workers)
        if console is not None:
            console.print("[bold]compare:[/bold] " + "; ".join(
                f"process {i + 1}: {' then '.join(n for n, _ in g)}" for i, g in enumerate(groups))
                + f" ({configs[0][1].threads} thread(s) each)")
        # spawn, not fork: the parent may hold threads (torch, rich) that fork would copy mid-state.
        with ProcessPoolExecutor(max_workers=len(groups), mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(_train_group, g, str(out), resume) for g in groups]
            if console is not None:
                _watch(futures, {n: (out / n, c.schedule.steps) for n, c in configs}, console)
            by_name = {r.label: r for f in futures for r in f.result()}
        results = [by_name[n] for n, _ in configs]
        data = LMData.from_config(cfg.data, cfg.seed, cache_dir=out / "cache") if write_report else None
    models = {r.label: {"variant": _variant(r.label), "seed": c.seed, "steps": r.steps, "tokens": r.tokens,
                        "train_time": r.train_time, "cpu_time": r.cpu_time, "params_total": r.params_total,
                        "params_active": r.params_active, "final_val_bpb": r.final_val_bpb, "test_bpb": r.test_bpb}
              for r, (_, c) in zip(results, configs, strict=True)}
    seeded = len({c.seed for _, c in configs}) > 1
    summary = {**compare_headline(out, seeded), "models": models, "processes": n_workers,
               "threads_per_process": configs[0][1].threads or None}
    write_atomic(out / "summary.json", json.dumps(summary, indent=2))
    if write_report:
        from moekit.train.report import write_compare_report

        write_compare_report(out, data=data, console=console)
    return results


def refresh_summary_headline(out: Path) -> None:
    """Recompute summary.json's headline keys from the run folders (`--report-only`), keeping the
    keys only a training compare knows (the models' timings, processes, threads)."""
    path = out / "summary.json"
    if not path.is_file():
        return
    summary = json.loads(path.read_text())
    summary.update(compare_headline(out))
    write_atomic(path, json.dumps(summary, indent=2))


def compare_headline(out: Path, seeded: bool | None = None) -> dict:
    """headline.py's summary of the run folders of the compare folder `out` (of one layout)."""
    from moekit.train.report import load_run

    return headline({name: load_run(out / name) for name in find_runs(out, seeded)})
