"""Grouped GEMM: rows of `x` sorted by expert, each group multiplied by its own weight.

Shape legend: N routed rows, I input features, O output features, E experts (groups),
C rows per group when every group has the same number of rows (padded layouts).

`torch.nn.functional.grouped_mm` (torch >= 2.9 on CPU and on CUDA sm80+) does this in one call
with group boundaries `offs` (int32 cumulative row counts, offs[-1] == N). It has constraints we
route around rather than expose:

- strides must be multiples of 16 bytes, so I and O must be multiples of 4 (fp32) or 8 (bf16);
- float32 / bfloat16 only (no float64, so gradcheck needs the fallback);
- its backward rejects an expanded (stride-0) output gradient, as `out.sum().backward()` gives;
  our backward makes the gradient contiguous first;
- its fake (meta) kernel only accepts bfloat16, so `torch.compile` cannot trace a float32 call.
  `grouped_mm` below is therefore a `torch.library` custom op: opaque to the compiler, with its
  own shape function and backward, so a compiled graph keeps it whole in every dtype.

The fallback loops over experts with host-side offsets: correct everywhere, slower, and it syncs,
so it is never chosen for aligned float32/bfloat16 shapes. On CPU the native kernel itself reads
the offsets on the host (a no-op there); on CUDA it does not sync.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_NATIVE_DTYPES = (torch.float32, torch.bfloat16)


def _native_kernel_ok(a: Tensor, b: Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or a.dtype not in _NATIVE_DTYPES or b.dtype != a.dtype:
        return False
    if a.device.type == "cuda":
        return torch.cuda.get_device_capability(a.device)[0] >= 8
    return a.device.type == "cpu"


def native_grouped_mm_ok(x: Tensor, w: Tensor) -> bool:
    """Whether the native kernel accepts x (N, I) @ w (E, I, O) (shape, dtype and device)."""
    align = 16 // x.element_size()
    return _native_kernel_ok(x, w) and all(size % align == 0 for size in (x.shape[-1], w.shape[-1], w.shape[-2]))


def gmm(x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor, rows_per_group: int = 0) -> Tensor:
    """out[rows of group e] = x[rows of group e] @ w[e], no autograd. `w` may be a transposed view.

    `rows_per_group` > 0 says every group has exactly that many rows (a padded layout): then one
    `bmm` over the (E, C, I) view does it, for any dtype and alignment.
    """
    if rows_per_group > 0:
        num_groups = w_EIO.shape[0]
        x_ECI = x_NI.view(num_groups, rows_per_group, x_NI.shape[-1])  # (E, C, I)
        return torch.bmm(x_ECI, w_EIO).view(x_NI.shape[0], w_EIO.shape[-1])
    if x_NI.shape[0] == 0:  # no rows: the native kernel rejects the strides of an empty operand
        return x_NI.new_zeros(0, w_EIO.shape[-1])
    if native_grouped_mm_ok(x_NI, w_EIO):
        return F.grouped_mm(x_NI.contiguous(), w_EIO, offs=offs_E)
    return grouped_mm_loop(x_NI, w_EIO, offs_E)


def gmm_wgrad(a_NI: Tensor, b_NO: Tensor, offs_E: Tensor, rows_per_group: int = 0) -> Tensor:
    """Per-group a[rows of e]^T @ b[rows of e] -> (E, I, O): the weight gradient of `gmm`.

    A group with no rows gets zeros.
    """
    num_groups = offs_E.shape[0]
    if rows_per_group > 0:
        a_ECI = a_NI.view(num_groups, rows_per_group, a_NI.shape[-1])  # (E, C, I)
        b_ECO = b_NO.view(num_groups, rows_per_group, b_NO.shape[-1])  # (E, C, O)
        return torch.bmm(a_ECI.transpose(1, 2), b_ECO)
    align = 16 // a_NI.element_size()
    if a_NI.shape[0] == 0:
        return a_NI.new_zeros(num_groups, a_NI.shape[-1], b_NO.shape[-1])
    if _native_kernel_ok(a_NI, b_NO) and a_NI.shape[1] % align == 0 and b_NO.shape[1] % align == 0:
        # (I, N) @ (N, O) with groups along N; the row count N needs no alignment.
        return F.grouped_mm(a_NI.contiguous().t(), b_NO.contiguous(), offs=offs_E)
    bounds = [0] + offs_E.tolist()
    out_EIO = a_NI.new_zeros(num_groups, a_NI.shape[-1], b_NO.shape[-1])
    for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end > start:
            torch.mm(a_NI[start:end].t(), b_NO[start:end], out=out_EIO[e])
    return out_EIO


def gmm_into(out_NO: Tensor, x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor, rows_per_group: int = 0) -> Tensor:
    """`gmm` written into `out` (a reused workspace buffer, so no fresh pages): on CPU one `mm`
    per group into its rows (what the native CPU kernel runs too); elsewhere `gmm` then a copy."""
    if rows_per_group > 0:
        num_groups = w_EIO.shape[0]
        torch.bmm(x_NI.view(num_groups, rows_per_group, x_NI.shape[-1]), w_EIO,
                  out=out_NO.view(num_groups, rows_per_group, out_NO.shape[-1]))
        return out_NO
    if x_NI.device.type != "cpu":
        return out_NO.copy_(gmm(x_NI, w_EIO, offs_E))
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            torch.mm(x_NI[start:end], w_EIO[e], out=out_NO[start:end])
        start = end
    if start < x_NI.shape[0]:  # rows past offs[-1] belong to no group
        out_NO[start:].zero_()
    return out_NO


def gmm_accumulate(out_NO: Tensor, x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor, alpha: float = 1.0,
                   rows_per_group: int = 0) -> Tensor:
    """out[rows of group e] += alpha * x[rows of group e] @ w[e], in place; returns out.

    For thin products added onto a wide result (a LoRA delta onto the hidden rows): on CPU one
    `addmm_` per group writes into `out` directly, where `gmm` then `add_` would first fill a
    fresh (N, O) buffer, and a fresh buffer of tens of MiB costs more in page faults than the
    product itself (measured: 24 ms against 4 ms for the (8192, 16) @ (16, 2048) rows of
    bench_lora's coarse shape). Elsewhere (no host read of the offsets): `gmm` then `add_`.
    """
    if rows_per_group > 0:
        num_groups = w_EIO.shape[0]
        out_ECO = out_NO.view(num_groups, rows_per_group, out_NO.shape[-1])  # (E, C, O)
        out_ECO.baddbmm_(x_NI.view(num_groups, rows_per_group, x_NI.shape[-1]), w_EIO, alpha=alpha)
        return out_NO
    if x_NI.device.type != "cpu":
        return out_NO.add_(gmm(x_NI, w_EIO, offs_E), alpha=alpha)
    start = 0
    for e, end in enumerate(offs_E.tolist()):
        if end > start:
            out_NO[start:end].addmm_(x_NI[start:end], w_EIO[e], alpha=alpha)
        start = end
    return out_NO


def grouped_mm_loop(x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """Fallback: one matmul per non-empty group (syncs to read the offsets)."""
    bounds = [0] + offs_E.tolist()
    out_NO = x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])
    for e, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
        if end > start:
            torch.mm(x_NI[start:end], w_EIO[e], out=out_NO[start:end])
    if bounds[-1] < x_NI.shape[0]:  # rows past offs[-1] belong to no group
        out_NO[bounds[-1]:].zero_()
    return out_NO


@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def _grouped_mm_op(x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    return gmm(x_NI, w_EIO, offs_E)


@_grouped_mm_op.register_fake
def _(x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    return x_NI.new_empty(x_NI.shape[0], w_EIO.shape[-1])


@torch.library.custom_op("moekit::grouped_mm_backward", mutates_args=())
def _grouped_mm_backward_op(grad_NO: Tensor, x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor, need_x: bool,
                            need_w: bool) -> tuple[Tensor, Tensor]:
    """(grad_x, grad_w); one not needed (a frozen weight under LoRA, an input that needs none)
    comes back empty and is not computed."""
    grad_NO = grad_NO.contiguous()  # an expanded (stride-0) gradient is rejected by the kernel
    grad_x = gmm(grad_NO, w_EIO.transpose(1, 2), offs_E) if need_x else x_NI.new_empty(0)
    grad_w = gmm_wgrad(x_NI, grad_NO, offs_E) if need_w else w_EIO.new_empty(0)
    return grad_x, grad_w


@_grouped_mm_backward_op.register_fake
def _(grad_NO: Tensor, x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor, need_x: bool,
      need_w: bool) -> tuple[Tensor, Tensor]:
    return (x_NI.new_empty(x_NI.shape if need_x else (0,)), w_EIO.new_empty(w_EIO.shape if need_w else (0,)))


def _grouped_mm_setup(ctx, inputs, output) -> None:
    x_NI, w_EIO, offs_E = inputs
    ctx.save_for_backward(x_NI, w_EIO, offs_E)


def _grouped_mm_grad(ctx, grad_NO: Tensor):
    x_NI, w_EIO, offs_E = ctx.saved_tensors
    need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_w = _grouped_mm_backward_op(grad_NO, x_NI, w_EIO, offs_E, need_x, need_w)
    return (grad_x if need_x else None), (grad_w if need_w else None), None


_grouped_mm_op.register_autograd(_grouped_mm_grad, setup_context=_grouped_mm_setup)


def grouped_mm(x_NI: Tensor, w_EIO: Tensor, offs_E: Tensor) -> Tensor:
    """out[rows of group e] = x[rows of group e] @ w[e], differentiable; `w` may be a transposed view."""
    return _grouped_mm_op(x_NI, w_EIO, offs_E.to(torch.int32))
