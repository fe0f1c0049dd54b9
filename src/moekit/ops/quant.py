"""Block-wise symmetric weight-only quantization ("moekit-q/1"): int8 and 4-bit.

Shape legend: O output rows of a weight (out_features), I its input width (the reduction
dimension, in_features), P = I padded up to a multiple of the block, B = P / block blocks per
row; leading dims (experts, E) are carried through.

The format, exactly (docs/quantization.md shows it with bytes and commands):

- A weight (..., O, I) is cut along its input dimension into blocks of `block` consecutive
  values (default 32; any even integer from 2 to 4096). A width that is not a multiple of the
  block is padded with zeros up to P; the true width I is kept beside the data (by the module,
  and in the checkpoint's config through the model's shapes) and the padding is cut off again
  by `dequantize`. Zeros quantize to zero, so the padding never changes a product.
- One scale per block, float32: scale = absmax / qmax, with qmax = 127 (int8) or 7 (4-bit).
  A block of zeros has scale 0 and quantizes to zeros.
- q = round(w / scale) with round half to even (`torch.round`), clamped to [-qmax, qmax]: the
  range is symmetric, so -128 (int8) and -8 (4-bit) are never used and zero is exact. The
  division is done in float32 (w is first cast to float32).
- Stored: int8 as int8 (..., O, P); 4-bit as uint8 (..., O, P / 2) holding q + 8 (1..15), two
  values per byte, the value at even column 2j in the low nibble and column 2j + 1 in the high
  nibble (adjacent pairs, not llama.cpp Q4_0's first-half / second-half split of a block).
- Dequantized: w' = q * scale in float32, then cast to the compute dtype.

Error bound, from the math: |w - w'| <= scale / 2 for every element (round to nearest, and
|w / scale| <= qmax so the clamp never moves a value by more than rounding does), plus float32
rounding of the division and product (at most a few ulps of absmax). tests/ops/test_quant.py
measures it.

Products (`qlinear`, `qgrouped_mm`, `qbmm`) dequantize one weight, or one expert's, at a time
and multiply in the input's dtype: the whole model is never dequantized at once. Fast kernels
that multiply the packed integers directly are a separate piece of work; the slow oracle
(dequantize everything, then multiply) is `ops/reference.py`'s `qlinear_reference`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FORMAT = "moekit-q/1"
BITS = (8, 4)
QMAX = {8: 127, 4: 7}
SCALE_DTYPE = torch.float32
MAX_BLOCK = 4096
# Rows of a weight dequantized at once by `qlinear`: bounds the float copy of a large output head.
_CHUNK_ELEMENTS = 4 * 2**20


def check_bits(bits, owner: str = "quantize") -> int:
    """`owner` prefixes the error ("" for none: the model-level spec names the field alone)."""
    if isinstance(bits, bool) or bits not in BITS:
        raise ValueError(f"{owner + ': ' if owner else ''}bits must be one of {list(BITS)}, got {bits!r}")
    return int(bits)


def check_block(block, owner: str = "quantize") -> int:
    where = owner + ": " if owner else ""
    if isinstance(block, bool) or not isinstance(block, int):
        raise ValueError(f"{where}block must be an integer, got {type(block).__name__} {block!r}")
    if not 2 <= block <= MAX_BLOCK or block % 2:
        raise ValueError(f"{where}block must be an even integer from 2 to {MAX_BLOCK}, got {block}")
    return block


def padded_width(width: int, block: int) -> int:
    """P: the input width rounded up to a whole number of blocks."""
    return -(-width // block) * block


def packed_shape(shape: tuple[int, ...], bits: int, block: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(data shape, scales shape) of a (..., O, I) weight: what a module allocates before a
    checkpoint fills it (the structure is known without quantizing anything)."""
    *lead, width = shape
    p = padded_width(width, block)
    return (*lead, p if bits == 8 else p // 2), (*lead, p // block)


@dataclass(frozen=True)
class QTensor:
    """A quantized (..., O, I) weight: `data` int8 (..., O, P) or uint8 (..., O, P/2), `scales`
    float32 (..., O, B), and what it takes to read them back."""

    data: Tensor
    scales: Tensor
    bits: int
    block: int
    width: int  # I, the true input width (P - I columns of padding)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-1], self.width)

    def __getitem__(self, e: int) -> QTensor:
        """One expert of a stacked (E, O, I) weight."""
        return QTensor(self.data[e], self.scales[e], self.bits, self.block, self.width)


def quantize(w: Tensor, bits: int, block: int = 32) -> QTensor:
    """Quantize a floating-point weight (..., O, I) block-wise along its last (input) dim."""
    bits, block = check_bits(bits), check_block(block)
    if not isinstance(w, Tensor) or not w.is_floating_point():
        kind = f"dtype {w.dtype}" if isinstance(w, Tensor) else type(w).__name__
        raise ValueError(f"quantize: w must be a floating-point tensor, got {kind}")
    if w.dim() < 1 or w.shape[-1] == 0:
        raise ValueError(f"quantize: w must have a non-empty last (input) dimension, got shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("quantize: w holds inf or nan; only finite weights can be quantized")
    width = w.shape[-1]
    pad = padded_width(width, block) - width
    w32 = w.detach().to(torch.float32)
    if pad:
        w32 = torch.nn.functional.pad(w32, (0, pad))  # zeros: they quantize to zero exactly
    blocks = w32.unflatten(-1, (-1, block))  # (..., O, B, block)
    qmax = QMAX[bits]
    scales = blocks.abs().amax(dim=-1) / qmax  # (..., O, B)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # a zero block: 0 / 1 = 0
    q = torch.round(blocks / safe.unsqueeze(-1)).clamp_(-qmax, qmax).flatten(-2)  # (..., O, P)
    if bits == 8:
        data = q.to(torch.int8)
    else:
        u = (q + 8).to(torch.uint8)  # 1..15
        data = u[..., 0::2] | (u[..., 1::2] << 4)  # (..., O, P/2): even column low, odd high
    return QTensor(data.contiguous(), scales.to(SCALE_DTYPE).contiguous(), bits, block, width)


def unpack(q: QTensor) -> Tensor:
    """The integer values (..., O, P) as int8, padding included."""
    if q.bits == 8:
        return q.data
    low = (q.data & 0x0F).to(torch.int8) - 8
    high = (q.data >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)  # interleave back: columns 2j, 2j+1


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """w' (..., O, I) in `dtype`: q * scale in float32, padding cut off."""
    values = unpack(q).to(torch.float32).unflatten(-1, (-1, q.block))  # (..., O, B, block)
    w = (values * q.scales.to(torch.float32).unsqueeze(-1)).flatten(-2)[..., : q.width]
    return w if dtype == torch.float32 else w.to(dtype)


def _check_x(x: Tensor, q: QTensor, name: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name}: x must be a floating-point tensor")
    if x.dim() == 0 or x.shape[-1] != q.width:
        raise ValueError(f"{name}: x must end in the weight's input width {q.width}, got shape {tuple(x.shape)}")


def qlinear(x: Tensor, q: QTensor, bias: Tensor | None = None) -> Tensor:
    """x (..., I) @ w'^T (+ bias) -> (..., O) in x's dtype; the weight is dequantized a chunk of
    rows at a time (at most a few MiB of float copy, whatever the size of an output head)."""
    _check_x(x, q, "qlinear")
    rows = q.data.shape[-2]
    step = max(1, _CHUNK_ELEMENTS // max(q.width, 1))
    if step >= rows:
        y = torch.nn.functional.linear(x, dequantize(q, x.dtype))
    else:
        y = torch.cat([torch.nn.functional.linear(
            x, dequantize(QTensor(q.data[r:r + step], q.scales[r:r + step], q.bits, q.block, q.width), x.dtype))
            for r in range(0, rows, step)], dim=-1)
    return y if bias is None else y + bias.to(y.dtype)


def qgrouped_mm(x_NI: Tensor, q: QTensor, offs_E: Tensor) -> Tensor:
    """Rows grouped by expert (`offs_E` cumulative row counts): y[n] = x[n] @ w'[e_n]^T, (N, O).
    Only the experts that have rows are dequantized, one at a time."""
    _check_x(x_NI, q, "qgrouped_mm")
    out = x_NI.new_zeros(x_NI.shape[0], q.data.shape[-2])
    start = 0
    for e, end in enumerate(offs_E.tolist()):  # host read: the groups' bounds
        if end > start:
            out[start:end] = x_NI[start:end] @ dequantize(q[e], x_NI.dtype).t()
        start = end
    return out


def qbmm(x_ECI: Tensor, q: QTensor) -> Tensor:
    """A padded (E, C, I) buffer through each expert's weight: (E, C, O)."""
    _check_x(x_ECI, q, "qbmm")
    if x_ECI.dim() != 3 or x_ECI.shape[0] != q.data.shape[0]:
        raise ValueError(f"qbmm: x must be (E={q.data.shape[0]}, C, {q.width}), got shape {tuple(x_ECI.shape)}")
    out = x_ECI.new_empty(*x_ECI.shape[:2], q.data.shape[-2])
    for e in range(x_ECI.shape[0]):
        out[e] = x_ECI[e] @ dequantize(q[e], x_ECI.dtype).t()
    return out


def nbytes(q: QTensor) -> int:
    return q.data.numel() * q.data.element_size() + q.scales.numel() * q.scales.element_size()
