"""`moekit ...` entry point: a table of subcommands, each implemented in its own module.

A command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
Commands whose module is not part of this install are left out of the table.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> module implementing it; kept in the order `moekit --help` lists them.
COMMANDS: dict[str, str] = {
    "demo": "moekit.demo",
    "info": "moekit.models.cli_info",
    "generate": "moekit.models.cli_generate",
    "train": "moekit.train.cli_train",
    "compare": "moekit.train.cli_compare",
    "inspect": "moekit.train.cli_inspect",
    "convert": "moekit.hf.cli_convert",
}


def _available() -> dict[str, object]:
    modules = {}
    for name, path in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(path)
        except ModuleNotFoundError as err:
            if err.name is not None and err.name.startswith(path.rsplit(".", 1)[0]) and err.name == path:
                continue  # the command's module is not written yet
            raise
    return modules


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description="Sparse Mixture-of-Experts toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in _available().items():
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


if __name__ == "__main__":
    raise SystemExit(main())
