"""The output folder of `moekit train` and `moekit compare`: one writer at a time, never a folder
that belongs to something else, and small files written atomically.

The lock is an OS file lock (`fcntl.flock`) on `<folder>/.moekit.lock`, taken before anything
in the folder is touched and held for the life of the process that writes it. The OS drops it
when the process exits, however it exits (an exception, a crash, SIGKILL), so there is never a
stale lock to clean up. The lock file also records who holds it (pid, host, start time,
command), so a second writer's error names the holder.

The lock file is never deleted: a process that has opened it but not yet locked it would then
lock a file no longer in the folder, and two processes would both "hold" the lock.

    lock = open_run_folder(out)     # checks, then locks; raises RunFolderError naming the folder
    try: ... finally: lock.release()
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from moekit.checkfiles import fsync_dir, write_atomic  # noqa: F401  (write_atomic: the train package uses it from here)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock; runs are not locked there
    fcntl = None

LOCK_NAME = ".moekit.lock"
# What makes a folder a moekit run folder (any one): a fresh run may write into such a folder, or
# into an empty one, never into another non-empty folder (its tokenizer.json and run.json would
# be overwritten).
RUN_MARKERS = ("run.json", "metrics.jsonl", "checkpoints", LOCK_NAME)
COMPARE_MARKERS = ("summary.json", "moe", "dense-active", "dense-total", LOCK_NAME)


class RunFolderError(ValueError):
    """The output folder cannot be used: not a folder, not writable, someone else's, or in use."""


class RunFolderBusy(RunFolderError):
    """Another process holds the folder's lock; the message names it."""


def _command_line(default: str) -> str:
    """This process's command line as a user would type it (`python -m moekit` shows as moekit)."""
    argv = list(sys.argv)
    if not argv or not argv[0]:
        return default
    prog = Path(argv[0]).name
    if prog in ("__main__.py", "moekit") and Path(argv[0]).parent.name in ("moekit", "bin"):
        prog = "moekit"
    return " ".join([prog, *argv[1:]])


def _holder_text(path: Path) -> str:
    """Who holds the lock at `path`, as recorded in it (the holder writes it right after locking,
    so a reader may briefly find it empty)."""
    for _ in range(20):
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict) and info.get("pid"):
            return (f"pid {info.get('pid')} on {info.get('host', '?')}, started {info.get('started', '?')}: "
                    f"{info.get('command', '?')}")
        time.sleep(0.05)
    return f"holder not recorded in {path}"


class RunLock:
    """An exclusive, non-blocking lock on `<folder>/.moekit.lock`; released by `release()` or by the
    process's exit."""

    def __init__(self, folder: str | Path, what: str = "moekit"):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as err:
            raise RunFolderError(_cannot_write(self.folder, err)) from None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                os.close(fd)
                if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
                raise RunFolderBusy(
                    f"{self.folder} is in use by another process ({_holder_text(self.path)}); wait for it "
                    f"to finish (or stop it), or choose another --out"
                ) from None
        self._fd = fd
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": _command_line(self.what),
            "what": self.what,
        }
        # In place (never replaced: the lock belongs to this file's inode).
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # no holder any more (truncated while still locked)
        except OSError:
            pass
        os.close(fd)  # closing the last descriptor releases the flock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _cannot_write(folder: Path, err: OSError) -> str:
    return (f"cannot write in {folder} ({err.strerror or err}); choose an --out you can write to, "
            f"or fix its permissions")


def check_output_folder(folder: Path, markers: tuple[str, ...], what: str) -> None:
    """Refuse a path that is a file, and a non-empty folder holding none of `markers` (not a
    moekit `what` folder: writing there would overwrite someone else's files)."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"--out {folder} is a file, not a folder; choose a folder (it is created when missing)")
    if not folder.is_dir():
        return
    try:
        entries = [p.name for p in folder.iterdir()]
    except OSError as err:
        raise RunFolderError(f"cannot read the folder {folder} ({err.strerror}); choose another --out") from None
    if entries and not any(m in entries for m in markers):
        shown = ", ".join(sorted(entries)[:5]) + (", ..." if len(entries) > 5 else "")
        raise RunFolderError(
            f"--out {folder} is not empty and is not a moekit {what} folder (it holds {shown}; none of "
            f"{', '.join(m for m in markers if m != LOCK_NAME)}); moekit would overwrite files there: "
            f"choose a new or empty folder"
        )


def _make_folder(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        where = f" ({err.filename})" if err.filename and str(err.filename) != str(folder) else ""
        raise RunFolderError(
            f"cannot create the folder {folder}{where}: {err.strerror or err}; choose another --out"
        ) from None


def open_run_folder(folder: str | Path, what: str = "moekit train") -> RunLock:
    """Check that `folder` can be a run folder, create it and lock it (before anything in it is
    touched); the caller releases the returned lock when the run ends."""
    folder = Path(folder)
    check_output_folder(folder, RUN_MARKERS, "run")
    _make_folder(folder)
    lock = RunLock(folder, what).acquire()
    try:
        ck_root = folder / "checkpoints"
        if ck_root.exists() and not ck_root.is_dir():
            raise RunFolderError(f"{ck_root} is a file, but the run's checkpoints go in a folder there; "
                                 f"move the file away or choose another --out")
        for path in (folder, ck_root):
            if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
                raise RunFolderError(f"{path} is not writable; fix its permissions or choose another --out")
    except BaseException:
        lock.release()
        raise
    return lock


def open_compare_folder(folder: str | Path, what: str = "moekit compare") -> RunLock:
    """The same for the --out of `moekit compare` (summary.json, report.md, cache/ and one run
    folder per variant, which each training locks for itself)."""
    folder = Path(folder)
    check_output_folder(folder, COMPARE_MARKERS, "compare")
    _make_folder(folder)
    return RunLock(folder, what).acquire()


def read_run_json(path: Path) -> dict:
    """The run's earlier run.json (its start, command and resumes), or {} when it is missing or
    unreadable (it is rewritten whole right after)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}
