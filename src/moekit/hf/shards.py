"""Reading and writing Hugging Face safetensors weights, one tensor at a time.

A Hugging Face folder holds either one `model.safetensors` or shards listed by
`model.safetensors.index.json` ({"weight_map": {tensor name: file name}}). Before any tensor is
read, every file's header is parsed and checked against the file size, so a missing shard, a
truncated file or an index that disagrees with a file is reported with the file and the tensor
it concerns, and nothing is loaded at all.

Headers and reading go through `moekit.tensorfile` (each tensor read straight into the model's
own tensor, so the weights are held once).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath, PureWindowsPath

from safetensors.torch import save_file
from torch import Tensor

# One error type for every checkpoint loader; here: a Hugging Face folder that cannot be read as it
# stands, the message naming file and tensor.
from moekit.checkfiles import CheckpointError, read_json
from moekit.tensorfile import DTYPES, MAX_HEADER, TensorInfo, read_header, read_into, scratch_buffer  # noqa: F401 (re-exported)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

def inside_folder(name: str) -> bool:
    """Whether a file name from an index stays inside its folder: relative, no `..` part. The name
    is checked, not where a symlink points: a Hugging Face cache snapshot's files are symlinks
    into `../../blobs`, and the folder's owner made those, not the index."""
    if not name or "\\" in name or PureWindowsPath(name).drive:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts and path.parts != ()


class ShardSet:
    """Every tensor of a Hugging Face folder, by name, read lazily one at a time."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index_path, single = self.folder / INDEX_FILE, self.folder / SINGLE_FILE
        if index_path.is_file():
            index = read_json(index_path)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
            ):
                raise CheckpointError(
                    f"{index_path}: not a safetensors index (needs a 'weight_map' of tensor name -> shard file)"
                )
            for key, file in weight_map.items():
                if not inside_folder(file):
                    raise CheckpointError(
                        f"{index_path}: weight_map entry {key!r} names {file!r}, outside the model folder "
                        f"{self.folder}; shard files must be inside it (no absolute paths, no '..')"
                    )
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            others = sorted(p.name for pattern in ("*.bin", "*.pt") for p in self.folder.glob(pattern))
            hint = f" (found {', '.join(others)}: convert them to safetensors first)" if others else ""
            raise CheckpointError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.folder}{hint}")
        missing = [f for f in files if not (self.folder / f).is_file()]
        if missing:
            lines = []
            for f in missing:
                names = sorted(k for k, v in weight_map.items() if v == f)
                shown = ", ".join(names[:4]) + (f", ... ({len(names)} tensors)" if len(names) > 4 else "")
                lines.append(f"{f} (holds {shown})")
            raise CheckpointError(f"{INDEX_FILE} lists shard(s) missing from {self.folder}: " + "; ".join(lines))
        self.tensors: dict[str, TensorInfo] = {}
        for f in files:
            for key, info in read_header(self.folder / f).items():
                if key in self.tensors:
                    raise CheckpointError(f"tensor {key!r} appears in both {self.tensors[key].file} and {f}")
                if weight_map is not None and weight_map.get(key) != f:
                    where = weight_map.get(key)
                    said = f"in {where}" if where else "nowhere"
                    raise CheckpointError(f"{f}: holds tensor {key!r} but {INDEX_FILE} puts it {said}")
                self.tensors[key] = info
        if weight_map is not None:
            absent = sorted(k for k in weight_map if k not in self.tensors)
            if absent:
                raise CheckpointError(
                    f"{weight_map[absent[0]]}: tensor {absent[0]!r} is listed in {INDEX_FILE} but not in the file"
                    + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else "")
                )
        self.files = files

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def fill(self, keys: list[str], dest: Callable[[TensorInfo], Tensor]) -> None:
        """Read each tensor of `keys` straight into `dest(info)` (a tensor or view of its shape,
        cast on the way), file by file in file order: no second copy of the weights is held."""
        by_file: dict[str, list[TensorInfo]] = {}
        for key in set(keys):
            info = self.tensors[key]
            by_file.setdefault(info.file, []).append(info)
        scratch = scratch_buffer()
        for f in self.files:
            infos = sorted(by_file.get(f, []), key=lambda i: i.offset)
            if not infos:
                continue
            with (self.folder / f).open("rb") as fh:
                for info in infos:
                    read_into(fh, info, dest(info), scratch=scratch)


# ---------------------------------------------------------------------------------------------
# Writing


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB" (decimal, as transformers reads it) or "200MiB"."""
    if isinstance(size, bool):
        raise TypeError(f"max_shard_size must be an int or a string like '5GB', got {size!r}")
    if isinstance(size, int):
        value = size
    elif isinstance(size, str):
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", size, flags=re.IGNORECASE)
        if not m:
            raise ValueError(f"max_shard_size {size!r} is not a size; use e.g. 5GB, 500MB, 200MiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
    else:
        raise TypeError(f"max_shard_size must be an int or a string like '5GB', got {type(size).__name__}")
    if value < 1:
        raise ValueError(f"max_shard_size must be at least 1 byte, got {size!r}")
    return value


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Greedy, order-preserving packing: a shard closes when the next tensor would overflow it;
    a tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards if shards[0] else []


def remove_old_weights(folder: Path) -> None:
    """Delete the safetensors weights an earlier save left, so no stale shard survives beside
    the new index (transformers' save_pretrained does the same)."""
    for p in folder.iterdir():
        if p.name in (SINGLE_FILE, INDEX_FILE) or SHARD_NAME.match(p.name):
            p.unlink()


def write_shards(folder: Path, names_in_order: list[tuple[str, int]], materialize, max_bytes: int) -> list[str]:
    """Write the tensors `materialize(name)` returns, packed into shards of at most max_bytes
    (one file and no index when they fit in one). Only one shard's tensors exist at a time."""
    shards = plan_shards(names_in_order, max_bytes)
    total = sum(n for _, n in names_in_order)
    written = []
    if len(shards) <= 1:
        tensors = {name: materialize(name) for name in (shards[0] if shards else [])}
        save_file(tensors, str(folder / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    weight_map = {}
    for i, names in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: materialize(name) for name in names}
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
        weight_map.update({name: file for name in names})
        written.append(file)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return written + [INDEX_FILE]
