"""The routed expert FFN as one op: gather -> grouped GEMM -> act x gate -> grouped GEMM -> scatter-add.

Shape legend: T tokens, D d_model, E experts, N routed rows (assignments, or capacity slots)
sorted by expert, H hidden width of the first projection (2F for gated activations), F width
fed to the down projection. Weights: w_in (E, H, D), w_out (E, D, F), as stored by `Experts`.

    out[t] = sum over rows n with token[n] == t of gate[n] * W_out[e_n] act(W_in[e_n] x[t])

Why one hand-written op instead of autograd over the pieces (measured, docs/performance.md):

- The gate is applied inside the op, to the hidden rows (N, F) or the expert output (N, D),
  whichever is narrower: the combine is a plain scatter-add whose backward is a plain gather
  feeding the grouped GEMM directly, and the gate gradient is <g W_out, act(h)>, a row dot over
  F formed from the product the backward computes anyway (ops/activations.py).
- Only h = x W_in^T (N, H) is kept for the backward. The gathered input rows (N, D) are gathered
  again from x (which the router keeps anyway) and act(h) is recomputed: K x D and F floats per
  assignment fewer than autograd keeps.
- Weight gradients come out of the grouped GEMM directly in the (E, H, D) / (E, D, F) layouts
  of the parameters, with no transposed copy; the SwiGLU backward writes both halves into one
  buffer (ops/activations.py).
- Gather is `index_select` and scatter is `index_add_`: on CPU both are one pass over memory and
  deterministic (advanced indexing `x[idx]` backpropagates through `index_put_` with
  accumulation, several times slower there). On other devices `index_add_` uses atomics, so
  when the caller passes `inverse_N` (every token has exactly K rows) the combine is a gather
  by the inverse permutation and a sum over K instead: deterministic everywhere.
- It is a `torch.library` custom op with a registered backward, so `torch.compile(fullgraph=True)`
  keeps it whole (the native grouped GEMM has no float32 fake kernel).

`rows_per_expert` > 0 declares the padded layout of the capacity and expert-choice paths
(exactly C rows per expert): the GEMMs are then `bmm` over an (E, C, .) view.
"""

from __future__ import annotations

import math
import os
import threading

import torch
from torch import Tensor

from moekit.ops.activations import act_forward, check_activation, hidden_width, scaled_act_backward
from moekit.ops.grouped import gmm, gmm_wgrad

# On CPU the rows are processed in chunks whose (rows, H) temporaries stay under this size, so the
# temporaries' memory does not grow with T*k and the allocator recycles them instead of mapping
# fresh pages (glibc maps every allocation above 32 MiB fresh, and faulting pages in costs several
# times their fill). Chunks cut between experts where they can (`_ragged_bounds`). The size and
# the cut were measured: docs/performance.md, "Numbers behind the code".
CHUNK_BYTES = 8 * 2**20
# Temporaries of the backward that never leave it (gradient rows, dL/dh, the scaled activation)
# live on CPU in per-thread buffers that grow to the largest request and are reused from step to
# step: glibc hands every allocation above 32 MiB fresh pages from mmap, and faulting them in
# costs about as much as the arithmetic of the fine-grained backward's elementwise work
# (docs/performance.md). `MOEKIT_CPU_WORKSPACE=0` allocates them fresh; `release_workspace()`
# frees this thread's buffers.
WORKSPACE = os.environ.get("MOEKIT_CPU_WORKSPACE", "1") != "0"
_WORKSPACE = threading.local()


def _scratch(slot: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised (shape) tensor of like's dtype for a temporary that does not outlive the op."""
    if like.device.type != "cpu" or not WORKSPACE:
        return like.new_empty(shape)
    buffers = _WORKSPACE.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    buf = buffers.get((slot, like.dtype))
    if buf is None or buf.numel() < numel:
        buf = buffers[(slot, like.dtype)] = like.new_empty(numel)
    return buf[:numel].view(shape)


# The hidden rows h (N, H) the forward keeps for the backward come on CPU from a per-thread pool
# too, for the same reason (a fresh h is tens of MiB at training shapes; docs/performance.md,
# "Numbers behind the code"). A pooled buffer is handed out again only when nothing but
# the pool references its storage, i.e. the backward that read it has run or its graph was freed,
# so any number of layers and graphs can be in flight. The pool keeps what one step needed at
# once, as the CUDA caching allocator does; `release_workspace()` frees it. Off with
# MOEKIT_CPU_WORKSPACE=0.
KEEP_POOL = WORKSPACE and hasattr(torch._C, "_storage_Use_Count")


def _storage_refs(t: Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_UNSHARED_REFS = _storage_refs(torch.empty(1)) if KEEP_POOL else 0  # a tensor nobody else holds


def _kept(shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised (shape) tensor of like's dtype that the op returns to be kept for the backward."""
    if like.device.type != "cpu" or not KEEP_POOL:
        return like.new_empty(shape)
    pool = _WORKSPACE.__dict__.setdefault("kept", [])
    numel = math.prod(shape)
    free = [buf for buf in pool if _storage_refs(buf) == _UNSHARED_REFS]
    for buf in free:
        if buf.dtype == like.dtype and buf.numel() >= numel:
            return buf[:numel].view(shape)
    # too small or another dtype: drop rather than hold them forever (by identity: `list.remove`
    # would compare tensors with ==, elementwise, and fail on a pool of several sizes)
    dropped = {id(buf) for buf in free}
    pool[:] = [buf for buf in pool if id(buf) not in dropped]
    buf = like.new_empty(numel)
    pool.append(buf)
    return buf.view(shape)


def release_workspace() -> None:
    """Free the calling thread's reusable CPU buffers of the routed FFN (in use ones live on until freed)."""
    _WORKSPACE.__dict__.pop("buffers", None)
    _WORKSPACE.__dict__.pop("kept", None)


def _scatter_rows(rows_ND: Tensor, token_N: Tensor, num_tokens: int, inverse_N: Tensor | None, dtype) -> Tensor:
    """Sum rows into their tokens: out[t] = sum of rows_ND[n] with token_N[n] == t."""
    rows_ND = rows_ND.to(dtype)
    if inverse_N is not None and rows_ND.device.type != "cpu":
        k = inverse_N.numel() // max(num_tokens, 1)
        # (T, K, D) -> (T, D)
        return rows_ND.index_select(0, inverse_N).view(num_tokens, k, rows_ND.shape[1]).sum(dim=1)
    return rows_ND.new_zeros(num_tokens, rows_ND.shape[1]).index_add_(0, token_N, rows_ND)


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Token sums are accumulated in float32 (float64 stays float64, for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _ragged_bounds(ends: list[int], num_rows: int, target: int) -> list[tuple[int, int]]:
    """Row ranges of at most `target` rows that cut between experts where they can.

    Whole experts are packed into a range while they fit; an expert with more rows than
    `target` is cut into `target`-row pieces, its rest packed with the next experts. A matrix
    product per (range, expert) then runs on all of a small expert's rows at once: cut at fixed
    row counts instead, a range boundary halves an expert's product about once per range.
    """
    bounds, start, prev = [], 0, 0
    for end in [*ends, num_rows]:  # rows past the last offset (none in the dropless path) ride along
        end = min(end, num_rows)  # (offsets past the rows would be invalid; never cut past them)
        if end - start > target:
            if prev > start:  # close the range before this expert
                bounds.append((start, prev))
                start = prev
            while end - start > target:
                bounds.append((start, start + target))
                start += target
        prev = end
    if num_rows > start:
        bounds.append((start, num_rows))
    return bounds


def _chunks(num_rows: int, width: int, like: Tensor, offs_E: Tensor, rows_per_expert: int):
    """(start, end, offs of the chunk, expert slice) for each chunk of consecutive rows.

    A ragged chunk keeps every expert with clamped offsets (experts outside it get no rows and
    are skipped without reading their weights); a padded chunk holds whole experts. Chunks exist
    on CPU only, where reading the offsets costs nothing.
    """
    target = num_rows
    if like.device.type == "cpu":
        target = max(1, CHUNK_BYTES // (width * like.element_size()))
        if rows_per_expert > 0:
            target = rows_per_expert * max(1, target // rows_per_expert)
    if target >= num_rows:
        yield 0, num_rows, offs_E, slice(None)
        return
    if rows_per_expert > 0:
        for start in range(0, num_rows, target):
            end = min(num_rows, start + target)
            yield start, end, offs_E, slice(start // rows_per_expert, end // rows_per_expert)
        return
    for start, end in _ragged_bounds(offs_E.tolist(), num_rows, target):
        yield start, end, (offs_E - start).clamp_(0, end - start), slice(None)


def gated_down_projection(a_NF: Tensor, gate_N: Tensor, w_out_EDF: Tensor, offs_E: Tensor,
                          rows_per_expert: int) -> Tensor:
    """gate * (a W_out^T) per row, scaling whichever of a (N, F) and the output (N, D) is narrower.

    Both orders are the same product; the backward does not depend on the choice.
    """
    gate_N1 = gate_N.to(a_NF.dtype).unsqueeze(1)
    if w_out_EDF.shape[1] < a_NF.shape[1]:  # D < F: scale the output rows
        return gmm(a_NF, w_out_EDF.transpose(1, 2), offs_E, rows_per_expert).mul_(gate_N1)
    return gmm(a_NF.mul_(gate_N1), w_out_EDF.transpose(1, 2), offs_E, rows_per_expert)


@torch.library.custom_op("moekit::routed_ffn", mutates_args=())
def _routed_ffn_op(
    x_TD: Tensor,
    token_N: Tensor,
    gate_N: Tensor,
    offs_E: Tensor,
    w_in_EHD: Tensor,
    w_out_EDF: Tensor,
    inverse_N: Tensor | None,
    activation: str,
    rows_per_expert: int,
    keep_hidden: bool,
) -> tuple[Tensor, Tensor]:
    num_rows, hidden = token_N.shape[0], w_in_EHD.shape[1]
    chunks = list(_chunks(num_rows, hidden, x_TD, offs_E, rows_per_expert))
    if len(chunks) == 1 and inverse_N is not None and x_TD.device.type != "cpu":
        # one pass with the deterministic combine through the inverse permutation
        x_ND = x_TD.index_select(0, token_N)  # (N, D) rows grouped by expert
        h_NH = gmm(x_ND, w_in_EHD.transpose(1, 2), offs_E, rows_per_expert)
        del x_ND
        y_ND = gated_down_projection(act_forward(h_NH, activation), gate_N, w_out_EDF, offs_E, rows_per_expert)
        out_TD = _scatter_rows(y_ND, token_N, x_TD.shape[0], inverse_N, _out_dtype(x_TD.dtype))
        return out_TD, (h_NH if keep_hidden else h_NH.new_empty(0, hidden))
    out_TD = x_TD.new_zeros(x_TD.shape, dtype=_out_dtype(x_TD.dtype))
    whole = keep_hidden and len(chunks) > 1
    h_NH = _kept((num_rows, hidden), x_TD) if whole else x_TD.new_empty(0, hidden)
    for start, end, offs_c, experts in chunks:
        x_cD = x_TD.index_select(0, token_N[start:end])  # (rows, D) grouped by expert
        h_cH = gmm(x_cD, w_in_EHD[experts].transpose(1, 2), offs_c, rows_per_expert)
        if whole:
            h_NH[start:end] = h_cH
        elif keep_hidden:
            h_NH = h_cH
        a_cF = act_forward(h_cH, activation)
        y_cD = gated_down_projection(a_cF, gate_N[start:end], w_out_EDF[experts], offs_c, rows_per_expert)
        out_TD.index_add_(0, token_N[start:end], y_cD.to(out_TD.dtype))
    return out_TD, h_NH


@_routed_ffn_op.register_fake
def _(x_TD, token_N, gate_N, offs_E, w_in_EHD, w_out_EDF, inverse_N, activation, rows_per_expert, keep_hidden):
    out_TD = x_TD.new_empty(x_TD.shape, dtype=_out_dtype(x_TD.dtype))
    return out_TD, x_TD.new_empty(token_N.shape[0] if keep_hidden else 0, w_in_EHD.shape[1])


@torch.library.custom_op("moekit::routed_ffn_backward", mutates_args=())
def _routed_ffn_backward_op(
    grad_TD: Tensor,
    x_TD: Tensor,
    token_N: Tensor,
    gate_N: Tensor,
    offs_E: Tensor,
    w_in_EHD: Tensor,
    w_out_EDF: Tensor,
    h_NH: Tensor,
    inverse_N: Tensor | None,
    activation: str,
    rows_per_expert: int,
    need_w: bool = True,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_gate, grad_w_in, grad_w_out); without `need_w` (frozen experts: LoRA
    elsewhere, fine-tuning attention only) the weight gradients are not computed and come back
    empty."""
    rpe = rows_per_expert
    num_rows, hidden = h_NH.shape
    chunks = list(_chunks(num_rows, hidden, h_NH, offs_E, rpe))
    # index_select reads an expanded (stride-0) gradient fine and writes contiguous rows.
    # (N, D), whole: the W_out gradient needs it
    g_ND = torch.index_select(grad_TD.to(h_NH.dtype), 0, token_N, out=_scratch("rows", (num_rows, x_TD.shape[1]), h_NH))
    gate_N1 = gate_N.to(h_NH.dtype).unsqueeze(1)
    dh_NH = _scratch("dh", tuple(h_NH.shape), h_NH)
    ga_NF = _scratch("ga", (num_rows, w_out_EDF.shape[2]), h_NH)
    if len(chunks) == 1:
        dga_NF = gmm(g_ND, w_out_EDF, offs_E, rpe)  # d(gate * a), (N, F)
        dh_NH, grad_gate_N, ga_NF = scaled_act_backward(dga_NF, h_NH, gate_N1, activation, dh_out=dh_NH,
                                                        ga_out=ga_NF)
        del dga_NF
    else:
        grad_gate_N = h_NH.new_empty(num_rows)
        for start, end, offs_c, experts in chunks:
            rows = slice(start, end)
            dga_cF = gmm(g_ND[rows], w_out_EDF[experts], offs_c, rpe)
            _, grad_gate_N[rows], _ = scaled_act_backward(
                dga_cF, h_NH[rows], gate_N1[rows], activation, dh_out=dh_NH[rows], ga_out=ga_NF[rows]
            )
    grad_w_out_EDF = gmm_wgrad(g_ND, ga_NF, offs_E, rpe) if need_w else w_out_EDF.new_empty(0)
    del ga_NF
    # The input rows are gathered again rather than kept from the forward, into the buffer of
    # the gradient rows (same shape, now dead): a fresh allocation this large page-faults.
    x_ND = torch.index_select(x_TD, 0, token_N, out=g_ND)  # both in the compute dtype
    del g_ND
    grad_w_in_EHD = gmm_wgrad(dh_NH, x_ND, offs_E, rpe) if need_w else w_in_EHD.new_empty(0)
    del x_ND
    if len(chunks) == 1:
        dx_ND = gmm(dh_NH, w_in_EHD, offs_E, rpe)
        grad_x_TD = _scatter_rows(dx_ND, token_N, x_TD.shape[0], inverse_N, x_TD.dtype)
    else:
        grad_x_TD = torch.zeros_like(x_TD)
        for start, end, offs_c, experts in chunks:
            dx_cD = gmm(dh_NH[start:end], w_in_EHD[experts], offs_c, rpe)
            grad_x_TD.index_add_(0, token_N[start:end], dx_cD)
    return grad_x_TD, grad_gate_N.to(gate_N.dtype), grad_w_in_EHD, grad_w_out_EDF


@_routed_ffn_backward_op.register_fake
def _(grad_TD, x_TD, token_N, gate_N, offs_E, w_in_EHD, w_out_EDF, h_NH, inverse_N, activation, rows_per_expert,
      need_w=True):
    return (x_TD.new_empty(x_TD.shape), gate_N.new_empty(gate_N.shape),
            w_in_EHD.new_empty(w_in_EHD.shape if need_w else (0,)),
            w_out_EDF.new_empty(w_out_EDF.shape if need_w else (0,)))


def _setup(ctx, inputs, output) -> None:
    x_TD, token_N, gate_N, offs_E, w_in_EHD, w_out_EDF, inverse_N, activation, rows_per_expert, _ = inputs
    ctx.activation, ctx.rows_per_expert = activation, rows_per_expert
    ctx.has_inverse = inverse_N is not None
    saved = [x_TD, token_N, gate_N, offs_E, w_in_EHD, w_out_EDF, output[1]]
    ctx.save_for_backward(*saved, *([inverse_N] if inverse_N is not None else []))


def _backward(ctx, grad_TD: Tensor, grad_h: Tensor):
    x_TD, token_N, gate_N, offs_E, w_in_EHD, w_out_EDF, h_NH, *rest = ctx.saved_tensors
    inverse_N = rest[0] if ctx.has_inverse else None
    need_w = ctx.needs_input_grad[4] or ctx.needs_input_grad[5]
    grad_x, grad_gate, grad_w_in, grad_w_out = _routed_ffn_backward_op(
        grad_TD, x_TD, token_N, gate_N, offs_E, w_in_EHD, w_out_EDF, h_NH, inverse_N, ctx.activation,
        ctx.rows_per_expert, need_w,
    )
    if not need_w:
        grad_w_in = grad_w_out = None
    return grad_x, None, grad_gate, None, grad_w_in, grad_w_out, None, None, None, None


_routed_ffn_op.register_autograd(_backward, setup_context=_setup)


def routed_ffn(
    x_TD: Tensor,
    token_N: Tensor,
    gate_N: Tensor,
    offs_E: Tensor,
    w_in_EHD: Tensor,
    w_out_EDF: Tensor,
    activation: str,
    rows_per_expert: int = 0,
    inverse_N: Tensor | None = None,
) -> Tensor:
    """sum_n gate[n] * expert_{e_n}(x[token[n]]) per token, (T, D) in float32 (float64 for float64 x).

    token_N (N,) int64: token of each row, rows grouped by expert; gate_N (N,) float32;
    offs_E (E,) cumulative rows per expert (offs[-1] == N); weights in the compute dtype of x.
    """
    check_activation(activation)
    if w_in_EHD.shape[1] != hidden_width(w_out_EDF.shape[2], activation):
        raise ValueError(
            f"w_in (E, H, D) {tuple(w_in_EHD.shape)} and w_out (E, D, F) {tuple(w_out_EDF.shape)} do not fit "
            f"activation {activation!r}"
        )
    gate_N = gate_N.to(_out_dtype(x_TD.dtype))
    # h is kept for the backward only when there will be one
    keep_hidden = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, gate_N, w_in_EHD, w_out_EDF))
    out_TD, _ = _routed_ffn_op(
        x_TD, token_N, gate_N, offs_E.to(torch.int32), w_in_EHD, w_out_EDF, inverse_N, activation, rows_per_expert,
        keep_hidden,
    )
    return out_TD
