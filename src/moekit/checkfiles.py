"""Checked files: the manifest that proves a checkpoint folder complete and intact, JSON reads that
name the file when it is wrong, and folders written atomically.

A leaf module (standard library only). `models/io.py` (model checkpoints), `train/checkpoint.py`
(training checkpoints) and `hf/` (Hugging Face folders) use it; it imports none of them, so
models need not import train to verify what train wrote.

The manifest, `manifest.json`, is written last into the folder it describes:

    {"format_version": 1, "files": {"model.safetensors": {"bytes": N, "sha256": HEX}, ...}, ...}

plus whatever fields the writer adds (a training checkpoint: step, optimizer groups, RNG). A
folder is a complete checkpoint when its manifest parses and every file it lists exists with
that size and sha256. A folder without a manifest is incomplete: moekit's writers put it in
before the folder gets its final name, so only an interrupted copy or an older moekit (model
checkpoints before manifests) leaves a checkpoint without one.

Atomic writes (`atomic_folder`): the files go to a temporary folder beside the target, are
fsynced, and the folder is renamed onto the target in one step. A crash or an error leaves the
target as it was (the temporary folder is removed on error; a kill leaves a `.NAME.tmp-*`
folder beside it, never a half-written target).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint (moekit or Hugging Face) that is missing, partial or corrupt; the message names
    the file. One type for every loader: `moekit.train.checkpoint.CheckpointError` and
    `moekit.hf.CheckpointError` are this class."""


class OutputFolderError(ValueError):
    """An output folder moekit refuses to write: it holds something the write would destroy."""


# ---------------------------------------------------------------------------------------------
# Small file helpers


def sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename in `path` durable (POSIX needs the directory itself synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on directories
        pass
    finally:
        os.close(fd)


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Replace `path` with `data` so that a reader (or a crash) sees the old or the new file,
    never a part: a temporary file in the same folder, fsynced, then renamed over it."""
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        # Name the file the caller asked for, not the temporary one.
        raise OSError(err.errno, f"{err.strerror} (the previous version is unchanged)", str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from `path`; CheckpointError naming the file when it is missing, unreadable as
    UTF-8, not JSON, or JSON of another kind (a list, a number)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON (not UTF-8: {err.reason} at byte {err.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a JSON {type(data).__name__}, expected an object ({{...}})")
    return data


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (temporary file, fsync, rename): a reader sees the old file or the new."""
    write_atomic(path, json.dumps(data, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Manifests


def file_entries(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file in `folder` but the manifest (each fsynced first).
    Subfolders are not part of a checkpoint and are not listed."""
    files = {}
    for p in sorted(Path(folder).iterdir()):
        if p.name == MANIFEST or not p.is_file():
            continue
        fsync_file(p)
        files[p.name] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    return files


def write_manifest(folder: str | Path, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """Record every file of `folder` in its manifest.json (written last, atomically); returns it."""
    folder = Path(folder)
    manifest = {"format_version": FORMAT_VERSION, **(fields or {}), "files": file_entries(folder)}
    write_json(folder / MANIFEST, manifest)
    return manifest


def _plain_name(name: Any) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name


def verify_manifest(folder: str | Path) -> dict[str, Any]:
    """Check `folder`'s manifest and the size and sha256 of every file it lists; return the
    manifest. Raises CheckpointError naming the folder or the file that fails."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint at {folder}: not a folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(
            f"incomplete checkpoint {folder}: {path} is missing (an interrupted copy or save; a model checkpoint "
            f"written by an older moekit has none: if you trust its files, record them with "
            f"moekit.models.io.add_manifest('{folder}'))"
        )
    try:
        manifest = read_json(path)
    except CheckpointError as err:
        raise CheckpointError(f"corrupt checkpoint: {err}") from None
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"corrupt checkpoint: {path} has no 'files' table")
    for name, meta in files.items():
        if not _plain_name(name):
            raise CheckpointError(f"corrupt checkpoint: {path} lists {name!r}, which is not a file name in {folder}")
        if not (isinstance(meta, dict) and isinstance(meta.get("bytes"), int) and isinstance(meta.get("sha256"), str)):
            raise CheckpointError(f"corrupt checkpoint: {path} has a malformed entry for {name}: {meta!r}")
        f = folder / name
        if not f.is_file():
            raise CheckpointError(f"incomplete checkpoint: {f} is listed in the manifest but missing")
        size = f.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"corrupt checkpoint: {f} has {size} bytes, the manifest says {meta['bytes']}")
        if sha256(f) != meta["sha256"]:
            raise CheckpointError(f"corrupt checkpoint: {f} does not match its sha256 in {path}")
    return manifest


# ---------------------------------------------------------------------------------------------
# Atomic folders


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


@contextmanager
def atomic_folder(target: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a new temporary folder beside `target`; when the block ends without error, its files
    are fsynced and it is renamed to `target`. On error the temporary folder is removed and
    `target` is untouched.

    `target` may be absent or an empty folder. A non-empty one is refused (OutputFolderError)
    unless `replace`, which swaps the new folder in and deletes the old one: deciding whether
    the old folder may be destroyed is the caller's job.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputFolderError(f"{target} exists and is not a folder; choose another output folder")
    if target.is_dir() and not replace and not is_empty_dir(target):
        raise OutputFolderError(f"{target} is not empty; choose a new or empty output folder")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()  # mkdir, not mkdtemp: the folder gets the user's usual permissions
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_file(p)
        fsync_dir(tmp)
        if is_empty_dir(target):
            target.rmdir()
        if target.exists():  # replace: swap, then drop the old folder
            old = parent / f".{target.name}.old-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
