"""Reading safetensors files without holding the weights twice: checked headers, memory-mapped
tensors, and reads straight into a model's own tensors (cast on the way when the dtypes differ).

A leaf module (torch only). Both checkpoint loaders use it: `models/io.py` for moekit checkpoints
and `hf/` for Hugging Face folders.

safetensors layout (https://github.com/huggingface/safetensors, "Format"): 8 bytes little-endian
header length N, N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, and
optionally "__metadata__"}, then the data; offsets are relative to the end of the header.

Why not `safetensors.torch.load_file` + `load_state_dict`: that holds a full copy of the state
besides the model's own tensors (peak twice the weight bytes). And why not a safetensors
`safe_open` per file: its memory map stays open while the file is read, so every page of the
file that was touched counts as resident until the file is closed (peak twice the weight bytes
again, for a one-file checkpoint). Here a tensor is either

  - mapped (`map_tensors`): the model's tensor *is* a private copy-on-write view of the file;
    nothing is copied, pages come in from the page cache as they are first read, and writing to
    the tensor (training) copies that page and never touches the file; or
  - read (`read_into`): read from the file into the model's tensor in chunks of at most
    `CHUNK_BYTES`, cast to the tensor's dtype chunk by chunk; the peak is the model plus one
    chunk.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from moekit.checkfiles import CheckpointError

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 2**20  # the safetensors library's own limit on the JSON header
CHUNK_BYTES = 1 * 2**20  # the most read at once when a tensor is cast or scattered on the way in


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str  # file name inside the folder
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # byte offset of its data in the file (reading in this order is sequential)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_header(path: Path, label: str | None = None) -> dict[str, TensorInfo]:
    """Parse and check one safetensors file's header (every tensor's dtype, shape and byte range
    against the file size) without reading its data. Errors name the file as `label` (default:
    its name)."""
    path = Path(path)
    size = path.stat().st_size
    name = label or path.name
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
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: corrupt safetensors header (not a JSON object)")
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
            if not all(type(d) is int and d >= 0 for d in (*shape, begin, end)) or begin > end:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name}: tensor {key!r} has a malformed header entry {meta!r}") from None
        if dtype_name not in DTYPES:
            raise CheckpointError(f"{name}: tensor {key!r} has dtype {dtype_name}, not one torch can load")
        info = TensorInfo(key, path.name, DTYPES[dtype_name], shape, 8 + n + begin)
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"{name}: tensor {key!r} declares shape {list(shape)} {dtype_name} but {end - begin} bytes of data"
            )
        if 8 + n + end > size:
            raise CheckpointError(
                f"{name}: truncated safetensors file: tensor {key!r} ends at byte {8 + n + end} "
                f"but the file has {size} bytes"
            )
        out[key] = info
    # Two tensors sharing bytes would alias each other (the safetensors library refuses such files).
    spans = sorted((i.offset, i.offset + i.nbytes, k) for k, i in out.items() if i.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{name}: tensors {first!r} and {second!r} overlap in the file (corrupt header)")
    return out


def _readinto_exact(fh: BinaryIO, offset: int, view: memoryview, what: str) -> None:
    fh.seek(offset)
    done = 0
    while done < len(view):
        got = fh.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{what}: the file ended {len(view) - done} bytes early (changed while reading?)")
        done += got


def scratch_buffer(chunk_bytes: int = CHUNK_BYTES) -> Tensor:
    """One reusable staging buffer for `read_into` (a fresh one per tensor would let the heap
    grow by fragments)."""
    return torch.empty(chunk_bytes, dtype=torch.uint8)


def read_into(
    fh: BinaryIO, info: TensorInfo, dest: Tensor, chunk_bytes: int = CHUNK_BYTES, scratch: Tensor | None = None
) -> None:
    """Fill `dest` (any device and dtype, the shape of `info`, possibly a strided view) with the
    tensor `info` of the open file `fh`. A contiguous CPU `dest` of the same dtype is read into
    directly; otherwise at most `chunk_bytes` are read at a time into `scratch` (a uint8 buffer,
    see `scratch_buffer`; made here if not given) and copied in with a cast: pieces of the
    flattened tensor when `dest` is contiguous, else whole rows of the first dimension (a row
    larger than a chunk is split the same way, one dimension down)."""
    what = f"{info.file}: tensor {info.name!r}"
    if tuple(dest.shape) != info.shape:
        raise ValueError(f"{what} has shape {list(info.shape)}, the destination {list(dest.shape)}")
    if info.numel == 0:
        return
    if dest.device.type == "cpu" and dest.dtype == info.dtype and dest.is_contiguous():
        raw = dest.detach().reshape(-1).view(torch.uint8).numpy()
        _readinto_exact(fh, info.offset, memoryview(raw).cast("B"), what)
        return
    chunk_bytes = max(chunk_bytes, info.dtype.itemsize)
    if scratch is None or scratch.numel() < chunk_bytes:
        scratch = torch.empty(chunk_bytes, dtype=torch.uint8)
    with torch.no_grad():
        _copy_in(fh, info.offset, info.dtype, dest.detach(), scratch, chunk_bytes, what)


def _copy_in(fh: BinaryIO, offset: int, dtype: torch.dtype, dest: Tensor, scratch: Tensor, chunk: int, what: str):
    """Copy the bytes at `offset` (a C-ordered tensor of `dest`'s shape in `dtype`) into `dest`,
    through `scratch`, at most `chunk` bytes at a time."""
    size = dtype.itemsize
    if dest.is_contiguous() or dest.dim() <= 1:
        flat = dest.reshape(-1) if dest.is_contiguous() else dest  # a strided 1-d view stays one
        step = chunk // size
        for start in range(0, flat.numel(), step):
            k = min(step, flat.numel() - start)
            part = scratch[: k * size]
            _readinto_exact(fh, offset + start * size, memoryview(part.numpy()).cast("B"), what)
            flat[start : start + k].copy_(part.view(dtype))
        return
    row_bytes = dest[0].numel() * size
    if row_bytes > chunk:
        for i in range(dest.shape[0]):
            _copy_in(fh, offset + i * row_bytes, dtype, dest[i], scratch, chunk, what)
        return
    step = chunk // row_bytes
    for start in range(0, dest.shape[0], step):
        k = min(step, dest.shape[0] - start)
        part = scratch[: k * row_bytes]
        _readinto_exact(fh, offset + start * row_bytes, memoryview(part.numpy()).cast("B"), what)
        dest[start : start + k].copy_(part.view(dtype).view(k, *dest.shape[1:]))


class MappedFile:
    """A private copy-on-write memory map of one file, from which tensors are viewed without a
    copy. The tensors keep the map alive; closing this object early is not needed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self.path.open("rb") as fh:
            size = self.path.stat().st_size
            self.map = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY) if size else None

    def tensor(self, info: TensorInfo) -> Tensor | None:
        """The tensor `info` as a view of the file, or None where it cannot be one (its bytes are
        not aligned to its dtype, or it is empty)."""
        if info.numel == 0 or self.map is None or info.offset % info.dtype.itemsize:
            return None
        raw = torch.frombuffer(self.map, dtype=torch.uint8, count=info.nbytes, offset=info.offset)
        return raw.view(info.dtype).view(info.shape)
