"""Plots (matplotlib, PNG) and the markdown report of `moekit compare` and `moekit inspect`.

Everything here reads what training wrote (`run.json`, `metrics.jsonl`) so a report can be
rebuilt from a finished run at any time; nothing is recomputed from memory of the run.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from moekit.train.headline import find_runs, first_seed_runs, headline, headline_lines
from moekit.train.metrics import read_jsonl
from moekit.train.routing import CLASSES, RoutingSummary
from moekit.train.runfolder import write_atomic

COLORS = {"moe": "tab:red", "dense-active": "tab:blue", "dense-total": "tab:green"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    return plt


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    meta = {}
    if (run_dir / "run.json").exists():
        try:
            meta = json.loads((run_dir / "run.json").read_text())
        except ValueError as err:
            raise ValueError(f"{run_dir / 'run.json'} is not valid JSON ({err}); restore or delete it") from None
    records = read_jsonl(run_dir / "metrics.jsonl")
    return {
        "dir": run_dir,
        "label": meta.get("label", run_dir.name),
        "meta": meta,
        "train": [r for r in records if r.get("kind") == "train"],
        "eval": [r for r in records if r.get("kind") == "eval"],
        "test": [r for r in records if r.get("kind") == "test"],
        "events": [r for r in records if r.get("kind") == "event"],
    }


# ----------------------------------------------------------------------------- curves


def plot_val_bpb(runs: list[dict], x_key: str, path: Path, xlabel: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        ev = run["eval"]
        if not ev:
            continue
        xs = [e[x_key] for e in ev]
        if x_key == "tokens":
            xs = [x / 1e6 for x in xs]
        ax.plot(xs, [e["val_bpb"] for e in ev], marker="o", ms=3, label=run["label"],
                color=COLORS.get(run["label"]))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation bits per byte")
    finals = [r["eval"][-1]["val_bpb"] for r in runs if r["eval"]]
    if finals:  # the early, very high values would flatten the interesting end of the curves
        lo = min(finals)
        ax.set_ylim(lo - 0.05 * lo, lo * 1.6)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _layer_series(train: list[dict], key: str) -> tuple[list[int], dict[str, list[float]]]:
    steps = [r["step"] for r in train if r.get("layers")]
    layers = sorted({k for r in train for k in r.get("layers", {})}, key=int)
    series = {layer: [r["layers"].get(layer, {}).get(key, float("nan")) for r in train if r.get("layers")]
              for layer in layers}
    return steps, series


def plot_layer_scalar(run: dict, key: str, path: Path, ylabel: str, reference: float | None = None,
                      ref_label: str = "") -> Path | None:
    steps, series = _layer_series(run["train"], key)
    if not steps:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for layer, values in series.items():
        ax.plot(steps, values, label=f"layer {layer}")
    if reference is not None:
        ax.axhline(reference, ls="--", color="gray", lw=1, label=ref_label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_load_heatmap(run: dict, path: Path) -> Path | None:
    """Per MoE layer: share of assignments each expert computed (rows) over training (columns)."""
    train = [r for r in run["train"] if r.get("layers")]
    if not train:
        return None
    layers = sorted({k for r in train for k in r["layers"]}, key=int)
    plt = _plt()
    fig, axes = plt.subplots(len(layers), 1, figsize=(8, 1.0 + 1.6 * len(layers)), squeeze=False, sharex=True)
    steps = [r["step"] for r in train]
    image = None
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        loads = np.array([r["layers"][layer]["tokens_per_expert"] for r in train], dtype=np.float64)  # (R, E)
        share = loads / np.maximum(loads.sum(axis=1, keepdims=True), 1)
        num_experts = share.shape[1]
        image = ax.imshow(share.T, aspect="auto", cmap="viridis", vmin=0, vmax=max(2.5 / num_experts, share.max()),
                          extent=(steps[0], steps[-1], num_experts - 0.5, -0.5), interpolation="nearest")
        ax.set_ylabel(f"layer {layer}\nexpert")
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(image, ax=axes[:, 0].tolist(), label="share of assignments (uniform = 1/E)")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_specialisation(summary: RoutingSummary, path: Path) -> Path:
    """Per layer: for each byte class (row), how its assignments spread over the experts."""
    plt = _plt()
    layers = summary.layers
    cols = min(len(layers), 2)
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 3.6 * rows + 0.6), squeeze=False, layout="constrained")
    cmap = plt.get_cmap("RdBu_r").with_extremes(bad="lightgray")  # absent classes, experts given nothing
    image = None
    for ax, layer in zip(axes.flat, layers, strict=False):
        counts = summary.counts[layer]
        lift = summary.lift(layer)
        absent = (counts.sum(axis=1, keepdims=True) == 0) | (counts.sum(axis=0, keepdims=True) == 0)
        log_lift = np.ma.masked_where(absent, np.log2(np.maximum(lift, 1e-3)))
        image = ax.imshow(log_lift, cmap=cmap, vmin=-2, vmax=2, aspect="auto")
        share = summary.share(layer)
        for c in range(lift.shape[0]):
            for e in range(lift.shape[1]):
                if not absent[c, e]:
                    ax.text(e, c, f"{100 * share[c, e]:.0f}", ha="center", va="center", fontsize=7)
        ax.set_yticks(range(len(CLASSES)), [f"{n} ({summary.class_tokens[i]})" for i, n in enumerate(CLASSES)],
                      fontsize=8)
        ax.set_xticks(range(lift.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(f"layer {layer}", fontsize=10)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), label="log2 lift (class share at expert / expert's overall share)")
    fig.suptitle("Expert specialisation: % of each class's assignments that each expert receives "
                 "(rows sum to 100; colour: over/under-represented)", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_text_load(summary: RoutingSummary, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    num_experts = summary.num_experts
    width = 0.8 / max(len(summary.layers), 1)
    for i, layer in enumerate(summary.layers):
        tpe = summary.tokens_per_expert[layer]
        ax.bar(np.arange(num_experts) + i * width, tpe / max(tpe.sum(), 1), width, label=f"layer {layer}")
    ax.axhline(1 / num_experts, ls="--", color="gray", lw=1, label="uniform")
    ax.set_xlabel("expert")
    ax.set_ylabel("share of assignments")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def routing_plots(run: dict | None, summary: RoutingSummary | None, out: Path) -> dict[str, Path]:
    """The routing plots shared by compare and inspect; returns name -> file."""
    out.mkdir(parents=True, exist_ok=True)
    made: dict[str, Path] = {}
    if run is not None and run["train"]:
        num_experts = None
        for r in run["train"]:
            for m in r.get("layers", {}).values():
                num_experts = len(m["tokens_per_expert"])
                break
            if num_experts:
                break
        p = plot_load_heatmap(run, out / "expert_load.png")
        if p:
            made["expert_load"] = p
        ref = math.log(num_experts) if num_experts else None
        p = plot_layer_scalar(run, "router_entropy", out / "router_entropy.png", "router entropy (nats)", ref,
                              "uniform over experts")
        if p:
            made["router_entropy"] = p
        p = plot_layer_scalar(run, "drop_fraction", out / "drop_fraction.png", "dropped share of assignments")
        if p:
            made["drop_fraction"] = p
    if summary is not None:
        made["specialisation"] = plot_specialisation(summary, out / "expert_specialisation.png")
        made["text_load"] = plot_text_load(summary, out / "expert_load_on_text.png")
    return made


# ----------------------------------------------------------------------------- numbers


def interpolate(evals: list[dict], x_key: str, x: float) -> float | None:
    """val_bpb at `x` by linear interpolation between evaluations; None outside the range."""
    xs = [e[x_key] for e in evals]
    if not xs or x < xs[0] or x > xs[-1]:
        return None
    return float(np.interp(x, xs, [e["val_bpb"] for e in evals]))


def gaps(runs: dict[str, dict]) -> dict:
    """The headline numbers: relative bpb gaps at equal tokens and at equal wall-clock."""
    out: dict = {}
    moe, dense = runs.get("moe"), runs.get("dense-active")
    if not (moe and dense and moe["eval"] and dense["eval"]):
        return out
    m_final, d_final = moe["eval"][-1], dense["eval"][-1]
    out["equal_tokens"] = {
        "tokens": m_final["tokens"], "moe_bpb": m_final["val_bpb"], "dense_active_bpb": d_final["val_bpb"],
        "gap": (d_final["val_bpb"] - m_final["val_bpb"]) / d_final["val_bpb"],
    }
    total = runs.get("dense-total")
    if total and total["eval"]:
        t_final = total["eval"][-1]["val_bpb"]
        out["equal_tokens"]["dense_total_bpb"] = t_final
        out["equal_tokens"]["gap_vs_total"] = (t_final - m_final["val_bpb"]) / t_final
    # Equal wall-clock: the time the faster of the two finished; the slower one is read off its
    # curve at that time (interpolated between evaluations), the faster one's final value used.
    # The same on process CPU time, which other jobs on a shared machine disturb far less.
    for key, x_key in (("equal_time", "time"), ("equal_cpu_time", "cpu_time")):
        if x_key not in m_final or x_key not in d_final:
            continue
        t_eq = min(m_final[x_key], d_final[x_key])
        m_at, d_at = interpolate(moe["eval"], x_key, t_eq), interpolate(dense["eval"], x_key, t_eq)
        if m_at is not None and d_at is not None:
            out[key] = {"seconds": t_eq, "moe_bpb": m_at, "dense_active_bpb": d_at, "gap": (d_at - m_at) / d_at,
                        "moe_train_time": m_final[x_key], "dense_active_train_time": d_final[x_key]}
    return out


def command_line(argv: list[str]) -> str:
    """sys.argv as the user typed it: `python -m moekit` and the console script both read `moekit`."""
    if argv and (argv[0].endswith("__main__.py") or Path(argv[0]).name == "moekit"):
        argv = ["moekit", *argv[1:]]
    return " ".join(argv)


def _secs(x: float) -> str:
    return f"{x:.1f}" if x < 10 else f"{x:.0f}"


def _fmt_int(n) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def write_compare_report(out_dir: Path, *, data=None, console=None, target_gap: float = 0.03,
                         specialisation_tokens: int = 32768) -> Path:
    """Write report.md and its PNGs under `out_dir` from the moe/dense-* run folders there."""
    out = Path(out_dir)
    all_runs = {name: load_run(out / name) for name in find_runs(out)}
    runs = first_seed_runs(all_runs)  # the curves and routing: one seed
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    ordered = list(runs.values())
    plot_val_bpb(ordered, "step", plots / "val_bpb_vs_steps.png", "optimizer step (same tokens per step)")
    plot_val_bpb(ordered, "time", plots / "val_bpb_vs_time.png", "training wall-clock (s, evals excluded)")
    if all(e.get("cpu_time") is not None for r in ordered for e in r["eval"]):
        plot_val_bpb(ordered, "cpu_time", plots / "val_bpb_vs_cpu_time.png", "training CPU time (s, all threads)")
    summary = None
    if "moe" in runs and data is not None:
        summary = _specialisation_for(runs["moe"], data, specialisation_tokens)
    made = routing_plots(runs.get("moe"), summary, plots)
    g = gaps(runs)
    write_atomic(out / "gaps.json", json.dumps(g, indent=2))
    text = _report_markdown(runs, g, made, summary, target_gap, out, headline(all_runs))
    path = out / "report.md"
    write_atomic(path, text)
    return path


def _specialisation_for(run: dict, data, max_tokens: int) -> RoutingSummary | None:
    from moekit.models import load_checkpoint
    from moekit.train.checkpoint import list_checkpoints
    from moekit.train.routing import collect_routing, labelled_tokens

    ckpts = list_checkpoints(run["dir"] / "checkpoints")
    if not ckpts:
        return None
    model = load_checkpoint(ckpts[-1][1])
    ids, classes = labelled_tokens(data.tokenizer, data.corpus.val_files, max_tokens)
    seq = data.cfg.seq_len
    if len(ids) < seq:
        return None
    return collect_routing(model, ids, classes, seq, batch_size=data.cfg.batch_size)


def _report_markdown(runs, g, made, summary, target_gap, out: Path, head: dict) -> str:
    first = next(iter(runs.values()))
    meta = first["meta"]
    machine = meta.get("machine", {})
    data = meta.get("data", {})
    cfg = meta.get("config", {})
    lines = ["# moekit compare: sparse MoE vs its dense twins", ""]
    lines.append(f"Generated {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; "
                 f"command `{command_line(meta.get('command', []))}`.")
    lines.append("")
    lines.append(f"Machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, torch "
                 f"{machine.get('torch', '?')} ({machine.get('torch_threads', '?')} threads), Python "
                 f"{machine.get('python', '?')}; load average at start of each run: "
                 + ", ".join(f"{n} {r['meta'].get('machine', {}).get('loadavg_at_start', '?')}"
                             for n, r in runs.items())
                 + ".")
    lines.append(f"Data: {data.get('source', '?')} ({data.get('train_files', '?')} train files, "
                 f"{data.get('train_bytes', 0) / 1e6:.1f} MB; {data.get('val_files', '?')} validation files, "
                 f"{data.get('val_bytes', 0) / 1e6:.2f} MB; {data.get('test_files', '?')} test files, "
                 f"{data.get('test_bytes', 0) / 1e6:.2f} MB; sha256 {str(data.get('sha256', ''))[:16]}...), "
                 f"tokenizer {data.get('tokenizer', {}).get('kind', '?')}.")
    summary_path = out / "summary.json"
    if summary_path.exists():
        info = json.loads(summary_path.read_text())
        if info.get("processes", 1) > 1:
            lines.append(f"The variants trained in {info['processes']} processes side by side "
                         f"({info.get('threads_per_process')} thread(s) each, fixed for the whole run; see the "
                         f"per-model load averages).")
    d, o, s = cfg.get("data", {}), cfg.get("optim", {}), cfg.get("schedule", {})
    lines.append(f"Training: {s.get('steps')} steps x {d.get('batch_size')} x {d.get('seq_len')} tokens "
                 f"(x{o.get('grad_accum', 1)} accumulation), AdamW (peak lr per model below, weight decay "
                 f"{o.get('weight_decay')}, clip {o.get('grad_clip')}), warmup {s.get('warmup_steps')} steps + "
                 f"cosine to {s.get('min_lr_ratio')}x, seed {cfg.get('seed')}, precision {meta.get('precision')}.")
    lines += [""] + headline_lines(head)
    if len(head["seeds"]) > 1:
        shown = next(iter(runs.values()))["meta"].get("config", {}).get("seed")
        lines += [f"The curves, the table below and the routing plots show seed {shown} (dense-total trains "
                  f"at the first seed only).", ""]
    lines += ["## Results", "",
              "| model | params total | params active | peak lr | tokens | train time (s) | CPU time (s) | tokens/s "
              "| final val bits/byte | test bits/byte |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, run in runs.items():
        p = run["meta"].get("params", {})
        ev = run["eval"][-1] if run["eval"] else {}
        tps = ev.get("tokens", 0) / ev["time"] if ev.get("time") else float("nan")
        lr = run["meta"].get("config", {}).get("optim", {}).get("lr", float("nan"))
        lines.append(f"| {name} | {_fmt_int(p.get('total', 0))} | {_fmt_int(p.get('active', 0))} | {lr:g} | "
                     f"{_fmt_int(ev.get('tokens', 0))} | {_secs(ev.get('time', float('nan')))} | "
                     f"{_secs(ev.get('cpu_time', float('nan')))} | {tps:,.0f} | "
                     f"{ev.get('val_bpb', float('nan')):.4f} | "
                     f"{(run['meta'].get('test') or {}).get('test_bpb', float('nan')):.4f} |")
    lines.append("")
    if "equal_tokens" in g:
        e = g["equal_tokens"]
        verdict = "met" if e["gap"] >= target_gap else f"missed by {100 * (target_gap - e['gap']):.2f} points"
        lines.append(f"**At equal training tokens, validation split** ({_fmt_int(e['tokens'])}): MoE "
                     f"{e['moe_bpb']:.4f} vs "
                     f"dense-active {e['dense_active_bpb']:.4f} bits/byte: the MoE is "
                     f"**{100 * e['gap']:.2f}% {'lower' if e['gap'] >= 0 else 'higher'}** "
                     f"(target: at least {100 * target_gap:.0f}% lower; {verdict}).")
        if "gap_vs_total" in e:
            lines.append(f"Against dense-total ({e['dense_total_bpb']:.4f}) the MoE is "
                         f"{100 * abs(e['gap_vs_total']):.2f}% {'lower' if e['gap_vs_total'] >= 0 else 'higher'}.")
    for key, what in (("equal_time", "wall-clock"), ("equal_cpu_time", "CPU time")):
        if key not in g:
            continue
        t = g[key]
        lines.append("")
        lines.append(f"**At equal {what}** ({_secs(t['seconds'])} s of training, when the faster of the two "
                     f"finished; MoE took {_secs(t['moe_train_time'])} s, dense-active "
                     f"{_secs(t['dense_active_train_time'])} s "
                     f"for the same tokens): MoE {t['moe_bpb']:.4f} vs dense-active {t['dense_active_bpb']:.4f}: "
                     f"the MoE is **{100 * abs(t['gap']):.2f}% {'lower' if t['gap'] >= 0 else 'higher'}**.")
    if "equal_time" in g:
        lines.append("")
        lines.append("Values between evaluations are linearly interpolated. Wall-clock moves with whatever else runs "
                     "on the machine; CPU time (process CPU seconds inside training steps) much less.")
    lines += ["", "![val bpb vs steps](plots/val_bpb_vs_steps.png)", "",
              "![val bpb vs time](plots/val_bpb_vs_time.png)", ""]
    if (out / "plots" / "val_bpb_vs_cpu_time.png").exists():
        lines += ["![val bpb vs CPU time](plots/val_bpb_vs_cpu_time.png)", ""]
    moe = runs.get("moe")
    if moe and moe["train"]:
        last = moe["train"][-1]["layers"]
        lines += ["## Routing (MoE model)", "",
                  "Last logged interval of training, per MoE layer:", "",
                  "| layer | load max/mean | router entropy (nats) | idle experts | dropped |",
                  "|---|---:|---:|---:|---:|"]
        for layer, m in last.items():
            lines.append(f"| {layer} | {m.get('load_imbalance', float('nan')):.2f} | "
                         f"{m.get('router_entropy', float('nan')):.3f} | {m.get('experts_without_tokens', 0):.0f} | "
                         f"{100 * m.get('drop_fraction', 0):.1f}% |")
        lines.append("")
        for key, title in (("expert_load", "Expert load per layer over training"),
                           ("router_entropy", "Router entropy"), ("drop_fraction", "Drop fraction")):
            if key in made:
                lines += [f"### {title}", "", f"![{key}](plots/{made[key].name})", ""]
    if summary is not None:
        lines += ["### Expert specialisation", "",
                  f"Validation text labelled by Python's `tokenize` "
                  f"({int(summary.class_tokens.sum())} tokens; classes: {', '.join(CLASSES)}). Each cell is the share "
                  f"of a class's assignments an expert receives (uniform: {100 / summary.num_experts:.1f}%); colour is "
                  f"the lift over the expert's overall share.", "",
                  "![specialisation](plots/expert_specialisation.png)", ""]
        lines += specialisation_lines(summary)
    return "\n".join(lines) + "\n"


def specialisation_lines(summary: RoutingSummary, min_lift: float = 1.5) -> list[str]:
    """Per layer, the classes each expert over-receives (lift >= min_lift), as markdown lines."""
    out = []
    for layer in summary.layers:
        lift = summary.lift(layer)
        parts = []
        for e in range(lift.shape[1]):
            top = [(lift[c, e], CLASSES[c]) for c in range(len(CLASSES))
                   if lift[c, e] >= min_lift and summary.counts[layer][c].sum() > 0]
            if top:
                top.sort(reverse=True)
                parts.append(f"e{e}: " + ", ".join(f"{n} x{v:.1f}" for v, n in top[:2]))
        out.append(f"- layer {layer}: " + ("; ".join(parts) if parts else "no expert over-receives a class by 1.5x"))
    return out
