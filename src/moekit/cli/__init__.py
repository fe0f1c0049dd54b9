"""`moekit ...` entry point: a table of subcommands, each implemented in its own module of this package.

A command module defines `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import errno
import sys
from types import ModuleType

from moekit.cli import chat, compare, convert, demo, finetune, generate, info, inspect, quantize, train

# name -> module implementing it; kept in the order `moekit --help` lists them.
COMMANDS: dict[str, ModuleType] = {
    "demo": demo,
    "info": info,
    "generate": generate,
    "chat": chat,
    "train": train,
    "compare": compare,
    "inspect": inspect,
    "convert": convert,
    "quantize": quantize,
    "finetune": finetune,
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
        _check_device(getattr(args, "device", None))
        return int(args._run(args) or 0)
    except (ValueError, TypeError) as err:
        # Config and input errors are for the user, not a traceback (exit 2). A failure of the work
        # itself (a non-finite loss) is reported by the command with exit 1; a bug (AttributeError,
        # ...) keeps its traceback.
        print(f"moekit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"moekit {args.command}: error: {describe_os_error(err)}", file=sys.stderr)
        return 2


def _check_device(device) -> None:
    """A command's --device, checked before any work (torch would fail late, with a traceback)."""
    if not isinstance(device, str) or device == "cpu":
        return
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")


# What to do about an OSError, by errno (the OS reason alone does not say).
_OS_HINTS = {
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EROFS: "the file system is read-only: choose another path",
    errno.ENOSPC: "the disk is full: free some space and run again",
    errno.EDQUOT: "the disk quota is exceeded: free some space and run again",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a file stands where a folder must be: move it, or choose another path",
    errno.EISDIR: "a folder stands where a file must be: move it, or choose another path",
    errno.EEXIST: "something already exists there: move it, or choose another path",
}


def describe_os_error(err: OSError) -> str:
    """One line: the file, the OS reason and what to do (OSErrors raised by moekit itself with a
    full message and no file name are shown as they are)."""
    if err.filename is None:
        return str(err)
    where = str(err.filename) + (f" -> {err.filename2}" if err.filename2 is not None else "")
    reason = err.strerror or str(err)
    hint = _OS_HINTS.get(err.errno)
    return f"{where}: {reason}" + (f"; {hint}" if hint else "")
