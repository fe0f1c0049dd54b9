"""What several commands share: the run arguments of `moekit train` and `moekit compare` (preset,
--set overrides, output), and the checkpoint folder `moekit generate` and `moekit info` read."""

from __future__ import annotations

import argparse
from pathlib import Path

from moekit.train.config import RunConfig, to_dict
from moekit.train.overrides import apply_overrides


def add_run_arguments(p: argparse.ArgumentParser, default_preset: str | None) -> None:
    p.add_argument("--preset", default=default_preset,
                   help="run preset (see --list-presets); any model preset name also works"
                        + (f" (default {default_preset})" if default_preset else ""))
    p.add_argument("--set", dest="overrides", action="append", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 model.moe.top_k=1 (repeatable)")
    p.add_argument("--out", default=None, help="output folder (default runs/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in --out")
    p.add_argument("--show-config", action="store_true", help="print the resolved config as JSON and exit")
    p.add_argument("--list-presets", action="store_true", help="list run presets and exit")


def resolve_config(args: argparse.Namespace) -> RunConfig:
    from moekit.train.presets import get_run_preset

    if args.preset is None:
        raise ValueError("--preset is required (see --list-presets)")
    cfg = get_run_preset(args.preset)
    return apply_overrides(cfg, [a for group in args.overrides for a in group])


def print_presets(console) -> None:
    from moekit.models import list_presets
    from moekit.train.presets import describe_presets

    for name, doc in describe_presets():
        console.print(f"[bold]{name}[/bold]  {doc}")
    console.print("model presets (default training settings): " + ", ".join(list_presets()))


def config_json(cfg: RunConfig) -> dict:
    return to_dict(cfg)


def resolve_checkpoint(path: str | Path) -> Path:
    """A folder with config.json, else the newest step-* under it or under its checkpoints/."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        if not root.is_dir():
            continue
        steps = sorted(d for d in root.glob("step-*") if d.is_dir() and (d / "config.json").is_file())
        if steps:
            return steps[-1]
    raise FileNotFoundError(f"no checkpoint (config.json) in {path}, {path / 'checkpoints'}/step-* or {path}/step-*")
