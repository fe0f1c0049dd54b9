"""Grouped GEMM: rows of `x` sorted by expert, each group multiplied by its own weight.

Shape legend: N routed rows, I input features, O output features, E experts.

`torch.nn.functional.grouped_mm` (torch >= 2.9 on CPU and on CUDA sm80+) does this in one call
with group boundaries `offs` (int32 cumulative row counts, offs[-1] == N). It has constraints we
route around rather than expose:

- strides must be multiples of 16 bytes, so I and O must be multiples of 4 (fp32) or 8 (bf16);
- float32 / bfloat16 only (no float64, so gradcheck needs the fallback);
- its backward rejects an expanded (stride-0) output gradient, as `out.sum().backward()` gives
  when the grouped output is reduced directly; `_contiguous_grad` materialises it.

The fallback loops over experts with host-side offsets: correct everywhere, slower, and it syncs,
so it is never chosen for aligned float32/bfloat16 shapes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def native_grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    """Whether the native kernel accepts these operands (shape, dtype and device)."""
    if not hasattr(F, "grouped_mm") or x.dtype not in _NATIVE_DTYPES or w.dtype != x.dtype:
        return False
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device)[0] < 8:
            return False
    elif x.device.type != "cpu":
        return False
    align = 16 // x.element_size()
    return x.shape[-1] % align == 0 and w.shape[-1] % align == 0 and w.shape[-2] % align == 0


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient (see module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad.contiguous()


def grouped_mm(x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """out[rows of group e] = x[rows of group e] @ w[e]; `w` may be a transposed view."""
    if native_grouped_mm_ok(x_NI, w_EIO):
        out = F.grouped_mm(x_NI, w_EIO, offs=offs_E.to(torch.int32))
        return _ContiguousGrad.apply(out) if out.requires_grad else out
    return grouped_mm_loop(x_NI, w_EIO, offs_E)


def grouped_mm_loop(x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """Fallback: one matmul per non-empty group (syncs to read the offsets)."""
    bounds = [0] + offs_E.tolist()
    pieces = [
        x_NI[start:end] @ w_EIO[e] for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])) if end > start
    ]
    if not pieces:
        return x_NI.new_zeros(x_NI.shape[0], w_EIO.shape[-1])
    return torch.cat(pieces, dim=0)
