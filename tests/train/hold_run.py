"""Test helper (test_runfolder.py): `moekit train ...` in a process of its own that pauses before
optimizer step --pause-at, after writing --ready, until --go exists: a live run holding its folder.

    python hold_run.py --ready R --go G --pause-at 1 -- train --preset tiny --out DIR --set ...
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ready", required=True)
    ap.add_argument("--go", required=True)
    ap.add_argument("--pause-at", type=int, default=1)
    ap.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()

    def pause(step, _model):
        if step == a.pause_at:
            Path(a.ready).write_text("ready\n")
            deadline = time.monotonic() + 300
            while not Path(a.go).exists():
                if time.monotonic() > deadline:
                    raise SystemExit("hold_run: --go never appeared")
                time.sleep(0.05)

    import moekit.train.loop as loop
    from moekit.cli import main as cli_main

    loop.train = functools.partial(loop.train, before_step=pause)  # cli/train.py imports it at run time
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
