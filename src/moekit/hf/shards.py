"""Reading and writing Hugging Face safetensors weights, one tensor at a time.

A Hugging Face folder holds either one `model.safetensors` or shards listed by
`model.safetensors.index.json` ({"weight_map": {tensor name: file name}}). Before any tensor is
read, every file's header is parsed and checked against the file size, so a missing shard, a
truncated file or an index that disagrees with a file is reported with the file and the tensor
it concerns, and nothing is loaded at all.

safetensors layout (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian
header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, and
optionally "__metadata__"}, then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# One error type for every checkpoint loader; here: a Hugging Face folder that cannot be read as it
# stands, the message naming file and tensor.
from moekit.checkfiles import CheckpointError, read_json

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on the JSON header


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # file name inside the folder
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # start of its data in the file: reading in this order is sequential


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header without reading its data."""
    size = path.stat().st_size
    name = path.name
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{name}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{name}: truncated or corrupt safetensors file: header of {n} bytes, file of {size} bytes"
            )
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{name}: corrupt safetensors header ({err})") from None
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name}: tensor {key!r} has a malformed header entry {meta!r}") from None
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{name}: tensor {key!r} has dtype {dtype_name}, not one torch can load")
        dtype = DTYPES[dtype_name]
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * dtype.itemsize:
            raise CheckpointError(
                f"{name}: tensor {key!r} declares shape {list(shape)} {dtype_name} but {end - begin} bytes of data"
            )
        if 8 + n + end > size:
            raise CheckpointError(
                f"{name}: truncated safetensors file: tensor {key!r} ends at byte {8 + n + end} "
                f"but the file has {size} bytes"
            )
        out[key] = TensorInfo(key, name, dtype, shape, begin)
    return out


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

    def read(self, keys: list[str] | None = None) -> Iterator[tuple[TensorInfo, torch.Tensor]]:
        """Yield (info, tensor) file by file; one tensor is alive at a time (plus the caller's)."""
        wanted = set(self.tensors if keys is None else keys)
        by_file: dict[str, list[TensorInfo]] = {}
        for key in wanted:
            info = self.tensors[key]
            by_file.setdefault(info.file, []).append(info)
        for f in self.files:
            names = [info.name for info in sorted(by_file.get(f, []), key=lambda i: i.offset)]
            if not names:
                continue
            with safe_open(str(self.folder / f), framework="pt", device="cpu") as fh:
                for key in names:
                    try:
                        tensor = fh.get_tensor(key)
                    except Exception as err:  # the library's errors do not name our file
                        raise CheckpointError(f"{f}: cannot read tensor {key!r}: {err}") from err
                    yield self.tensors[key], tensor


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
