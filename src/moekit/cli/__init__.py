"""`moekit ...` entry point: a table of subcommands, each implemented in its own module of this package.

A command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import sys
from types import ModuleType

from moekit.cli import compare, convert, demo, generate, info, inspect, train

# name -> module implementing it; kept in the order `moekit --help` lists them.
COMMANDS: dict[str, ModuleType] = {
    "demo": demo,
    "info": info,
    "generate": generate,
    "train": train,
    "compare": compare,
    "inspect": inspect,
    "convert": convert,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Sparse Mixture-of-Experts toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        # Config and input errors are for the user, not a traceback.
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2
