"""moekit.tensorfile: reads into any destination equal what safetensors itself loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit.checkfiles import CheckpointError
from moekit.tensorfile import MappedFile, read_header, read_into

SHAPES = [(), (0,), (1,), (7,), (3, 5), (4, 3, 6), (2, 1, 9)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8]


def _tensor(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(0, 100, shape, generator=g).to(dtype)


@pytest.fixture
def stored(tmp_path):
    tensors = {f"t{i}_{j}": _tensor(shape, dtype, 10 * i + j)
               for i, shape in enumerate(SHAPES) for j, dtype in enumerate(DTYPES)}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    return path, load_file(str(path))


@pytest.mark.parametrize("chunk", [1, 3, 8, 40, 1 << 20])
def test_read_into_every_kind_of_destination(stored, chunk):
    path, want = stored
    infos = read_header(path)
    with path.open("rb") as fh:
        for name, info in infos.items():
            ref = want[name]
            targets = {
                "same": torch.empty(info.shape, dtype=info.dtype),
                "cast": torch.empty(info.shape, dtype=torch.float64),
            }
            if len(info.shape) >= 2:  # a strided view: the transpose of a buffer, viewed back
                base = torch.zeros(tuple(reversed(info.shape)), dtype=torch.float32)
                targets["strided"] = base.permute(*reversed(range(len(info.shape))))
                assert not targets["strided"].is_contiguous() or ref.numel() <= 1
            for kind, dest in targets.items():
                read_into(fh, info, dest, chunk_bytes=chunk)
                assert torch.equal(dest, ref.to(dest.dtype)), (name, kind, chunk)


def test_read_into_checks_the_shape(stored):
    path, _ = stored
    info = read_header(path)["t4_0"]
    with path.open("rb") as fh, pytest.raises(ValueError, match=r"t4_0.*shape \[3, 5\]"):
        read_into(fh, info, torch.empty(5, 3))


def test_file_cut_while_reading_is_named(stored, tmp_path):
    path, _ = stored
    infos = read_header(path)
    last = max(infos.values(), key=lambda i: i.offset + i.nbytes)
    path.write_bytes(path.read_bytes()[: last.offset + 1])  # cut after the header was read
    with path.open("rb") as fh, pytest.raises(CheckpointError, match=rf"{last.name}.*ended .* bytes early"):
        read_into(fh, last, torch.empty(last.shape, dtype=last.dtype))


def test_mapped_views_equal_the_stored_tensors(stored):
    path, want = stored
    mapped = MappedFile(path)
    for name, info in read_header(path).items():
        view = mapped.tensor(info)
        if info.numel == 0 or info.offset % info.dtype.itemsize:
            assert view is None
        else:
            assert torch.equal(view, want[name])


def test_overlapping_tensors_are_refused(tmp_path):
    """Two tensors over the same bytes would alias each other once mapped; safetensors refuses
    such a header and so does read_header. Offsets must be integers."""
    import json
    import struct

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.ones(4), "b": torch.zeros(4)}, str(path))
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, data = json.loads(raw[8 : 8 + n]), raw[8 + n :]

    def write(header):
        text = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data)

    header["b"]["data_offsets"] = list(header["a"]["data_offsets"])
    write(header)
    with pytest.raises(CheckpointError, match=r"tensors '(a|b)' and '(a|b)' overlap"):
        read_header(path)
    header["b"]["data_offsets"] = [16.0, 32.0]
    write(header)
    with pytest.raises(CheckpointError, match=r"'b' has a malformed header entry"):
        read_header(path)
