"""The headline of `moekit compare`, on the test split and over seeds: what summary.json states
and report.md shows (issue 18).

A compare folder holds one run folder per variant and seed: `<variant>` when the compare ran
one seed (the layout before seeds existed), `<variant>-seed<N>` when it ran several. Everything
here is read back from those folders (run.json's "test", metrics.jsonl's evaluations), so the
headline can be rebuilt from a finished compare at any time (`--report-only`).

The gap of one seed is (dense-active - MoE) / dense-active bits per byte at equal training
tokens, in percent: positive when the MoE is lower (better). The headline is its mean over the
seeds that have both runs, with the min and max beside it.
"""

from __future__ import annotations

import re
from pathlib import Path

VARIANTS = ("moe", "dense-active", "dense-total")
_RUN_DIR = re.compile(r"^(moe|dense-active|dense-total)(?:-seed(\d+))?$")


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` -> [0, 1, 2]; None stays None (the config's run.seed)."""
    if text is None:
        return None
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated non-negative integers such as 0,1,2, got {text!r}") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds must be distinct non-negative integers such as 0,1,2, got {text!r}")
    return seeds


def run_name(variant: str, seed: int, seeds: list[int]) -> str:
    """The run folder of `variant` at `seed`: the bare variant name when the compare has one seed."""
    return variant if len(seeds) == 1 else f"{variant}-seed{seed}"


def find_runs(out: Path, seeded: bool | None = None) -> dict[str, tuple[str, int | None]]:
    """Run folders of a compare folder: name -> (variant, seed from the name or None). `seeded`
    picks the layout (`<variant>-seed<N>` or bare `<variant>`); None: the seeded one when the
    folder has any such run, so an older one-seed compare in the same folder is not mixed in."""
    found = {}
    for p in sorted(Path(out).iterdir()) if Path(out).is_dir() else []:
        m = _RUN_DIR.match(p.name)
        if m and p.is_dir():
            found[p.name] = (m.group(1), int(m.group(2)) if m.group(2) is not None else None)
    if seeded is None:
        seeded = any(seed is not None for _, seed in found.values())
    found = {n: vs for n, vs in found.items() if (vs[1] is not None) == seeded}
    order = {v: i for i, v in enumerate(VARIANTS)}
    return dict(sorted(found.items(), key=lambda kv: (order[kv[1][0]], kv[1][1] or 0)))


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values), "values": values}


def first_seed_runs(runs: dict[str, dict]) -> dict[str, dict]:
    """One run per variant for the curves and routing plots: the seed dense-total trained at
    (the first of --seeds), else the smallest; labelled with the bare variant name."""
    by_variant: dict[str, list[tuple[int, dict]]] = {}
    for name, run in runs.items():
        m = _RUN_DIR.match(name)
        if m:
            by_variant.setdefault(m.group(1), []).append((run["meta"].get("config", {}).get("seed", 0), run))
    total = by_variant.get("dense-total")
    first = total[0][0] if total else None
    out = {}
    for variant in VARIANTS:
        if variant in by_variant:
            seeded = sorted(by_variant[variant], key=lambda sr: (sr[0] != first, sr[0]))
            out[variant] = {**seeded[0][1], "label": variant}
    return out


def run_scores(run: dict) -> dict:
    """One loaded run (report.load_run): its seed, final validation and test bits per byte."""
    meta = run["meta"]
    test = meta.get("test")
    return {"seed": meta.get("config", {}).get("seed"),
            "final_val_bpb": run["eval"][-1]["val_bpb"] if run["eval"] else None,
            "test_bpb": test["test_bpb"] if test else None,
            "test_bytes": test["test_bytes"] if test else None}


def reach(evals: list[dict], target: float, key: str) -> float | None:
    """The `key` ("step" or "time") at which the validation curve `evals` first reaches
    `target` bits per byte, interpolated linearly between evaluations; None if it never does."""
    prev = None
    for e in evals:
        if e["val_bpb"] <= target:
            if prev is None or prev["val_bpb"] == e["val_bpb"]:
                return float(e[key])
            w = (prev["val_bpb"] - target) / (prev["val_bpb"] - e["val_bpb"])
            return prev[key] + w * (e[key] - prev[key])
        prev = e
    return None


def speedup(moe_run: dict, dense_run: dict) -> dict | None:
    """Switch Transformer's way of stating the result (Fedus et al. 2022, Fig. 1 and Sec. 3): the
    fraction of the dense-active model's training steps, and of its training time, at which the
    MoE first reaches the dense model's final quality. On the validation curves: the test split
    is scored only at the end of a run."""
    if not moe_run["eval"] or not dense_run["eval"]:
        return None
    final = dense_run["eval"][-1]
    out = {}
    for key in ("step", "time"):
        at = reach(moe_run["eval"], final["val_bpb"], key)
        out[f"{key}s_fraction" if key == "step" else "time_fraction"] = None if at is None else at / final[key]
    return out


def headline(runs: dict[str, dict]) -> dict:
    """summary.json's headline from loaded runs keyed by folder name: "split" ("test", or
    "validation" when the runs have no test evaluation: eval.test=false), "seeds",
    "gap_pct_equal_tokens" (mean over seeds) with its per-seed values and min-max, and each
    variant's bits per byte over its seeds."""
    by_variant: dict[str, dict[int, dict]] = {v: {} for v in VARIANTS}
    loaded: dict[tuple[str, int], dict] = {}
    for name, run in runs.items():
        m = _RUN_DIR.match(name)
        if m:
            scores = run_scores(run)
            by_variant[m.group(1)][scores["seed"]] = scores
            loaded[(m.group(1), scores["seed"])] = run
    moe, dense = by_variant["moe"], by_variant["dense-active"]
    paired = sorted(set(moe) & set(dense))
    on_test = bool(paired) and all(moe[s]["test_bpb"] is not None and dense[s]["test_bpb"] is not None
                                   for s in paired)
    key = "test_bpb" if on_test else "final_val_bpb"
    gaps = {s: 100 * (dense[s][key] - moe[s][key]) / dense[s][key] for s in paired
            if moe[s][key] is not None and dense[s][key] is not None}
    spread = _spread(list(gaps.values()))
    out = {
        "split": "test" if on_test else "validation",
        "seeds": sorted(set(moe) | set(dense)),
        "gap_pct_equal_tokens": spread["mean"] if spread else None,
        "gap_pct_equal_tokens_min": spread["min"] if spread else None,
        "gap_pct_equal_tokens_max": spread["max"] if spread else None,
        "gap_pct_equal_tokens_per_seed": {str(s): g for s, g in gaps.items()},
        "variants": {},
    }
    fast = {s: speedup(loaded[("moe", s)], loaded[("dense-active", s)]) for s in paired}
    fast = {s: f for s, f in fast.items() if f is not None}
    if fast:
        out["speedup_to_dense_active_quality"] = {
            "split": "validation",
            "steps_fraction": _spread([f["steps_fraction"] for f in fast.values() if f["steps_fraction"] is not None]),
            "time_fraction": _spread([f["time_fraction"] for f in fast.values() if f["time_fraction"] is not None]),
            "per_seed": {str(s): f for s, f in fast.items()},
        }
    for variant, seeds in by_variant.items():
        if seeds:
            out["variants"][variant] = {
                "seeds": sorted(seeds),
                "test_bpb": _spread([seeds[s]["test_bpb"] for s in sorted(seeds) if seeds[s]["test_bpb"] is not None]),
                "final_val_bpb": _spread([seeds[s]["final_val_bpb"] for s in sorted(seeds)
                                          if seeds[s]["final_val_bpb"] is not None]),
                "test_bytes": next((v["test_bytes"] for v in seeds.values() if v["test_bytes"]), None),
            }
    return out


def headline_lines(h: dict) -> list[str]:
    """The markdown of the headline: one table of each variant over its seeds, then the gap."""
    split = h["split"]
    lines = [f"## Headline: {split} split, {len(h['seeds'])} seed(s) ({', '.join(map(str, h['seeds']))})", ""]
    if split == "test":
        nbytes = next((v["test_bytes"] for v in h["variants"].values() if v.get("test_bytes")), None)
        lines.append(f"Bits per byte on the whole test split ({nbytes:,} bytes scored per run, files never "
                     f"used for training nor for any choice), at the end of each run.")
    else:
        lines.append("No test evaluation in these runs (eval.test=false): final validation bits per byte instead.")
    lines += ["", f"| model | seeds | mean {split} bits/byte | min | max |", "|---|---|---:|---:|---:|"]
    key = "test_bpb" if split == "test" else "final_val_bpb"
    for variant, v in h["variants"].items():
        s = v.get(key)
        if s:
            lines.append(f"| {variant} | {', '.join(map(str, v['seeds']))} | {s['mean']:.4f} | {s['min']:.4f} | "
                         f"{s['max']:.4f} |")
    lines.append("")
    if h["gap_pct_equal_tokens"] is not None:
        g = h["gap_pct_equal_tokens"]
        per_seed = ", ".join(f"seed {s}: {v:+.2f}%" for s, v in h["gap_pct_equal_tokens_per_seed"].items())
        lines.append(f"**MoE vs dense-active at equal tokens, {split} split**: the MoE is "
                     f"**{abs(g):.2f}% {'lower' if g >= 0 else 'higher'}** on average "
                     f"(min {h['gap_pct_equal_tokens_min']:+.2f}%, max {h['gap_pct_equal_tokens_max']:+.2f}%; "
                     f"{per_seed}; positive = MoE lower).")
        lines.append("")
    fast = h.get("speedup_to_dense_active_quality")
    if fast:
        st, tm = fast["steps_fraction"], fast["time_fraction"]
        never = [s for s, f in fast["per_seed"].items() if f["steps_fraction"] is None]
        text = "**Speed-up to equal quality** (validation curves; the test split is scored only at the end): "
        if st:
            text += (f"the MoE reaches dense-active's final validation bits/byte after {100 * st['mean']:.0f}% of "
                     f"its steps (min {100 * st['min']:.0f}%, max {100 * st['max']:.0f}%)")
            if tm:
                text += (f" and {100 * tm['mean']:.0f}% of its training time (min {100 * tm['min']:.0f}%, "
                         f"max {100 * tm['max']:.0f}%)")
        if never:
            text += f"{'; ' if st else ''}not reached with seed(s) {', '.join(never)}"
        lines += [text + ".", ""]
    return lines
