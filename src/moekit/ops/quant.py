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

A second 4-bit code, `code="nf4"` (4-bit NormalFloat, Dettmers et al. 2023, "QLoRA", section 3:
the 16 quantiles of a standard normal scaled to [-1, 1], with an exact zero), stores per block
scale = absmax and per value the index of the nearest of the 16 levels (nibble = index, same
packing); w' = NF4[index] * scale. Normally distributed weights lose less to it than to the
evenly spaced int4 levels. QLoRA's frozen base uses it (moekit/finetune); the checkpoint record
says `"code": "nf4"` (no `code` means the integer code).

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
CODES = ("int", "nf4")
# The NF4 levels of the QLoRA paper (Dettmers et al. 2023, Appendix E; the table bitsandbytes ships).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
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


def check_code(code, bits: int, owner: str = "quantize") -> str:
    where = owner + ": " if owner else ""
    if code not in CODES:
        raise ValueError(f"{where}code must be one of {list(CODES)}, got {code!r}")
    if code == "nf4" and bits != 4:
        raise ValueError(f"{where}code 'nf4' is a 4-bit code; use bits=4 with it (got bits={bits})")
    return code


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
    code: str = "int"  # "int" (q * scale) or "nf4" (NF4_LEVELS[q + 8] * scale)

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.data.shape[:-1], self.width)

    def __getitem__(self, e: int) -> QTensor:
        """One expert of a stacked (E, O, I) weight."""
        return QTensor(self.data[e], self.scales[e], self.bits, self.block, self.width, self.code)


def quantize(w: Tensor, bits: int, block: int = 32, code: str = "int") -> QTensor:
    """Quantize a floating-point weight (..., O, I) block-wise along its last (input) dim."""
    bits, block = check_bits(bits), check_block(block)
    code = check_code(code, bits)
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
    if code == "nf4":
        return _quantize_nf4(blocks, block, width)
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


def _nf4_index(x: Tensor) -> Tensor:
    """Index (0..15, uint8) of the nearest NF4 level to each x in [-1, 1]: the levels are sorted,
    so it is the count of midpoints below x (a tie goes to the upper level)."""
    levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=x.device)
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, mids, right=True).to(torch.uint8)


def _quantize_nf4(blocks: Tensor, block: int, width: int) -> QTensor:
    scales = blocks.abs().amax(dim=-1)  # (..., O, B): absmax, so every value lands in [-1, 1]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    # one block row at a time would be slower; the (.., O, B, block) float temporary is the input's size
    u = _nf4_index(blocks / safe.unsqueeze(-1)).flatten(-2)  # (..., O, P)
    data = u[..., 0::2] | (u[..., 1::2] << 4)
    return QTensor(data.contiguous(), scales.to(SCALE_DTYPE).contiguous(), 4, block, width, "nf4")


def unpack(q: QTensor) -> Tensor:
    """The integer values (..., O, P) as int8, padding included."""
    if q.bits == 8:
        return q.data
    low = (q.data & 0x0F).to(torch.int8) - 8
    high = (q.data >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)  # interleave back: columns 2j, 2j+1


def dequantize(q: QTensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """w' (..., O, I) in `dtype`: q * scale in float32, padding cut off."""
    if q.code == "nf4":
        levels = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=q.data.device)
        values = levels[(unpack(q) + 8).long()].unflatten(-1, (-1, q.block))  # (..., O, B, block)
    else:
        values = unpack(q).to(torch.float32).unflatten(-1, (-1, q.block))  # (..., O, B, block)
    w = (values * q.scales.to(torch.float32).unsqueeze(-1)).flatten(-2)[..., : q.width]
    return w if dtype == torch.float32 else w.to(dtype)


def _check_x(x: Tensor, q: QTensor, name: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"{name}: x must be a floating-point tensor")
    if x.dim() == 0 or x.shape[-1] != q.width:
        raise ValueError(f"{name}: x must end in the weight's input width {q.width}, got shape {tuple(x.shape)}")


def _chunk(q: QTensor, r: int, step: int) -> QTensor:
    return QTensor(q.data[r:r + step], q.scales[r:r + step], q.bits, q.block, q.width, q.code)


def _linear_raw(x: Tensor, q: QTensor, transpose: bool) -> Tensor:
    """x (..., I) @ w'^T -> (..., O); with `transpose`, g (..., O) @ w' -> (..., I) (the input
    gradient). The weight is dequantized a chunk of rows at a time."""
    rows = q.data.shape[-2]
    step = max(1, _CHUNK_ELEMENTS // max(q.width, 1))
    if step >= rows:
        w = dequantize(q, x.dtype)
        return x @ w if transpose else torch.nn.functional.linear(x, w)
    if not transpose:
        return torch.cat([torch.nn.functional.linear(x, dequantize(_chunk(q, r, step), x.dtype))
                          for r in range(0, rows, step)], dim=-1)
    out = None
    for r in range(0, rows, step):
        part = x[..., r:r + step] @ dequantize(_chunk(q, r, step), x.dtype)
        out = part if out is None else out.add_(part)
    return out


def _grouped_raw(x_NI: Tensor, q: QTensor, offs_E: Tensor, transpose: bool) -> Tensor:
    """Rows grouped by expert through each expert's w'^T (or, with `transpose`, its w')."""
    width = q.width if transpose else q.data.shape[-2]
    out = x_NI.new_zeros(x_NI.shape[0], width)
    start = 0
    for e, end in enumerate(offs_E.tolist()):  # host read: the groups' bounds
        if end > start:
            w = dequantize(q[e], x_NI.dtype)
            torch.mm(x_NI[start:end], w if transpose else w.t(), out=out[start:end])
        start = end
    return out


def _bmm_raw(x_ECI: Tensor, q: QTensor, transpose: bool) -> Tensor:
    width = q.width if transpose else q.data.shape[-2]
    out = x_ECI.new_empty(*x_ECI.shape[:2], width)
    for e in range(x_ECI.shape[0]):
        w = dequantize(q[e], x_ECI.dtype)
        torch.mm(x_ECI[e], w if transpose else w.t(), out=out[e])
    return out


def _raw(kind: str, x: Tensor, q: QTensor, offs: Tensor | None, transpose: bool) -> Tensor:
    if kind == "linear":
        return _linear_raw(x, q, transpose)
    if kind == "grouped":
        return _grouped_raw(x, q, offs, transpose)
    return _bmm_raw(x, q, transpose)


class _QProduct(torch.autograd.Function):
    """A quantized product with a gradient to its input only (the weight is frozen). The backward
    dequantizes each weight again instead of keeping the float copy the forward made: a frozen
    quantized base (QLoRA) then holds only its packed bytes between forward and backward."""

    @staticmethod
    def forward(ctx, x, data, scales, offs, meta):
        kind, bits, block, width, code = meta
        ctx.meta = meta
        ctx.save_for_backward(data, scales, offs)
        return _raw(kind, x, QTensor(data, scales, bits, block, width, code), offs, False)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        data, scales, offs = ctx.saved_tensors
        kind, bits, block, width, code = ctx.meta
        grad_x = _raw(kind, grad.contiguous(), QTensor(data, scales, bits, block, width, code), offs, True)
        return grad_x, None, None, None, None


def _product(kind: str, x: Tensor, q: QTensor, offs: Tensor | None = None) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _QProduct.apply(x, q.data, q.scales, offs, (kind, q.bits, q.block, q.width, q.code))
    return _raw(kind, x, q, offs, False)


def qlinear(x: Tensor, q: QTensor, bias: Tensor | None = None) -> Tensor:
    """x (..., I) @ w'^T (+ bias) -> (..., O) in x's dtype; the weight is dequantized a chunk of
    rows at a time (at most a few MiB of float copy, whatever the size of an output head).
    Differentiable in x (and the bias), never in the weight."""
    _check_x(x, q, "qlinear")
    y = _product("linear", x, q)
    return y if bias is None else y + bias.to(y.dtype)


def qgrouped_mm(x_NI: Tensor, q: QTensor, offs_E: Tensor) -> Tensor:
    """Rows grouped by expert (`offs_E` cumulative row counts): y[n] = x[n] @ w'[e_n]^T, (N, O).
    Only the experts that have rows are dequantized, one at a time. Differentiable in x."""
    _check_x(x_NI, q, "qgrouped_mm")
    return _product("grouped", x_NI, q, offs_E)


def qbmm(x_ECI: Tensor, q: QTensor) -> Tensor:
    """A padded (E, C, I) buffer through each expert's weight: (E, C, O). Differentiable in x."""
    _check_x(x_ECI, q, "qbmm")
    if x_ECI.dim() != 3 or x_ECI.shape[0] != q.data.shape[0]:
        raise ValueError(f"qbmm: x must be (E={q.data.shape[0]}, C, {q.width}), got shape {tuple(x_ECI.shape)}")
    return _product("bmm", x_ECI, q)


def nbytes(q: QTensor) -> int:
    return q.data.numel() * q.data.element_size() + q.scales.numel() * q.scales.element_size()
