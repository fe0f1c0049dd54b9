"""`moekit info`: parameter counts and layer layout of a model preset, computed from its config.

    moekit info --preset mixtral-8x7b       # total vs active parameters per token, layout
    moekit info --list                      # every preset with its counts
    moekit info --checkpoint PATH           # the model a checkpoint, run or Hugging Face folder holds

Nothing is instantiated: counts come from the config analytically (tests check the formula
against real modules on tiny configs), so the 671B DeepSeek-V3 preset costs nothing to inspect.
A moekit checkpoint is verified against its manifest like every other command's (a run folder:
its newest checkpoint, `--fallback` for an older one when that is damaged).
"""

from __future__ import annotations

import argparse
import json

from moekit.cli.common import CHECKPOINT_HELP, add_fallback_argument, open_checkpoint, read_model_config

HELP = "show a model preset's total vs active parameters per token and its layer layout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", metavar="NAME")
    src.add_argument("--checkpoint", metavar="PATH", help=CHECKPOINT_HELP + " (its config; the files are verified)")
    src.add_argument("--list", action="store_true", help="list every preset with its parameter counts")
    add_fallback_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from moekit.models import PRESETS, count_parameters, get_preset, list_presets
    from moekit.models.registry import preset_doc, summary

    console = Console(width=140)
    if args.list:
        rows = []
        for name in list_presets():
            total, active = count_parameters(get_preset(name))
            rows.append({"preset": name, "arch": PRESETS[name][0], "total_params": total,
                         "active_params_per_token": active, "description": preset_doc(name)})
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        table = Table(title="moekit presets")
        for col in ("preset", "arch", "total", "active/token", "description"):
            table.add_column(col, justify="right" if col in ("total", "active/token") else "left")
        for r in rows:
            table.add_row(r["preset"], r["arch"], _human(r["total_params"]), _human(r["active_params_per_token"]),
                          r["description"])
        console.print(table)
        return 0
    stored = None
    if args.checkpoint:
        ref = open_checkpoint(args.checkpoint, fallback=args.fallback)
        cfg = read_model_config(ref)
        stored = _stored(ref)
    else:
        cfg = get_preset(args.preset)
    info = summary(cfg)
    if stored:
        info["checkpoint"] = stored
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    title = info["preset"] or "model"
    table = Table(title=f"{title} ({info['arch']})", show_header=False)
    table.add_column("what")
    table.add_column("value")
    if info["preset"] and info["preset"] in PRESETS:
        table.add_row("description", preset_doc(info["preset"]))
    table.add_row("total parameters", f"{_human(info['total_params'])} ({info['total_params']:,})")
    table.add_row("active per token", f"{_human(info['active_params_per_token'])} "
                  f"({info['active_params_per_token']:,}, {100 * info['active_fraction']:.1f}% of total)")
    for key, value in info["layout"].items():
        table.add_row(key, value)
    for match in ("active", "total"):
        twin = info.get(f"dense_twin_{match}")
        if twin:
            table.add_row(f"dense twin ({match})", f"d_ff {twin['d_ff']} in every layer: {_human(twin['params'])} "
                          f"({twin['params']:,}) parameters")
    if stored:
        q = stored.get("quantization")
        if q:
            table.add_row("quantized", f"{q['format']}: {q['bits']}-bit, block {q['block']}, "
                          f"{', '.join(q['targets'])} (scales {q['scale_dtype']})")
        table.add_row("weights on disk", f"{stored['weight_bytes'] / 1e6:.2f} MB ({stored['dtypes']})")
    console.print(table)
    return 0


def _stored(ref) -> dict | None:
    """What a checkpoint's files hold beside the config: weight bytes and dtypes (from the
    safetensors headers, no weight read), and a moekit checkpoint's quantization record."""
    from collections import Counter

    from moekit.cli.common import read_checkpoint_json
    from moekit.hf.shards import ShardSet

    if ref.kind == "hf":
        infos = list(ShardSet(ref.path).tensors.values())
        quant = None
    else:
        from moekit.tensorfile import read_header

        weights = ref.path / "model.safetensors"
        if not weights.is_file():
            return None
        infos = list(read_header(weights, str(weights)).values())
        quant = read_checkpoint_json(ref.path, "config.json").get("quantization")
    by_dtype = Counter()
    for i in infos:
        by_dtype[str(i.dtype).removeprefix("torch.")] += i.nbytes
    dtypes = ", ".join(f"{d} {n / 1e6:.2f} MB" for d, n in by_dtype.most_common())
    return {"weight_bytes": sum(by_dtype.values()), "dtypes": dtypes, "quantization": quant}
