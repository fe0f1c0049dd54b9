"""Decode path: the routed expert FFN for a few tokens (T <= 32), inference only, CPU.

Shape legend: T tokens, D d_model, E experts, N = T*K routed rows sorted by expert, H hidden
width of the first projection (2F for gated activations), F down-projection width.

With a few rows per expert the layer is memory-bound: the floor is reading each touched expert's
weights once. The native grouped matrix-vector kernel (ops/native.py) does exactly that for both
projections, split over all threads, at the machine's read bandwidth: on the benchmark machine
1.8 ms for the 8 experts of one token (48 MiB, as fast as `sum()` reads them) and 12.8 ms for the
58 experts of 16 tokens, where the torch forms below take about 4 and 20 ms (docs/performance.md).
In the sorted custom op the activation and the gate scaling run in torch between the two calls.

Two entries: `routed_ffn_decode` takes rows already sorted by expert (a custom op, the one a
compiled graph or expert parallelism calls), and `routed_ffn_decode_native` takes the router's
choices and runs the whole dispatch (sort, gather, both products, activation, gate, combine) in
one native call (`native.decode_ffn`; the eager single-process dispatch calls it first,
layers/dispatch.py). `route_softmax_topk_decode` does the same for the softmax top-k router.
Together they replace some forty small torch ops per one-token step by two C calls.

Where the native kernel is unavailable (no C compiler, `MOEKIT_NATIVE=0`) the torch forms run.
The grouped GEMM only visits experts that got rows (an empty group is skipped without reading
its weights), one matmul per touched expert, so every weight is still read once; what is left is
how fast one small matmul streams its weight. MKL's `x @ W^T` with 2-3 rows packs the weight
first, while the weight-stationary form `W @ x^T` (the same numbers, transposed output) streams
it: measured on the benchmark machine 1.4-3.9x faster for 2-3 rows, about equal for one row (a
GEMV either way, on one core), between 0.8x and 1.5x from 4 rows on depending on the run. So
rows are split in two stable groups: experts with 2-3 rows run `W @ x^T` through the 3d x 2d
grouped GEMM, the others `x @ W^T`.

Choosing the split reads the per-expert counts on the host. On CPU that is free (the data is
already there), so this path is used on CPU only; on CUDA the regular routed op runs (the
grouped kernel takes small groups well and nothing syncs). A `torch.library` custom op, so a
compiled graph keeps it whole despite the host read and the foreign call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.ops import native
from moekit.ops.activations import act_forward
from moekit.ops.grouped import gmm
from moekit.ops.routed import gated_down_projection

DECODE_MAX_TOKENS = 32
WEIGHT_STATIONARY_MIN_ROWS, WEIGHT_STATIONARY_MAX_ROWS = 2, 3


def _native_ok(w_in_EHD: Tensor, w_out_EDF: Tensor) -> bool:
    """Whether the native kernel is built here and takes these weights (warns once where not built)."""
    return native.supports(w_in_EHD) and w_in_EHD.dtype == w_out_EDF.dtype and native.library() is not None


def _native_rows_ffn(x, gate_N, ends_E, w_in_EHD, w_out_EDF, activation, x_rows=None) -> Tensor:
    """gate[n] * W_out[e] act(W_in[e] x_n) per row sorted by expert, (N, D) float32, through the
    native kernel; x_n is x[x_rows[n]] when x_rows is given (the gather fused), else x[n]."""
    h_NH = native.grouped_gemv(x, w_in_EHD, ends_E, x_rows)
    a_NF = act_forward(h_NH, activation).mul_(gate_N.to(torch.float32).unsqueeze(1))
    return native.grouped_gemv(a_NF, w_out_EDF, ends_E)


def _weight_stationary_ffn(x_SD, gate_S, offs_E, w_in_EHD, w_out_EDF, activation) -> Tensor:
    """y = act(x W_in^T) * gate @ W_out^T computed as W @ x^T per expert; returns (S, D)."""

    h_HS = F.grouped_mm(w_in_EHD, x_SD.t(), offs=offs_E)  # (H, S)
    a_SF = act_forward(h_HS.t(), activation)
    a_SF = a_SF.contiguous().mul_(gate_S.to(a_SF.dtype).unsqueeze(1))  # (S, F), rows contiguous
    return F.grouped_mm(w_out_EDF, a_SF.t(), offs=offs_E).t()  # (D, S) -> (S, D)


def _rows_ffn(x_LD, gate_L, offs_E, w_in_EHD, w_out_EDF, activation) -> Tensor:
    h_LH = gmm(x_LD, w_in_EHD.transpose(1, 2), offs_E)
    return gated_down_projection(act_forward(h_LH, activation), gate_L, w_out_EDF, offs_E, 0)


@torch.library.custom_op("moekit::routed_ffn_decode", mutates_args=())
def _routed_ffn_decode_op(
    x_TD: Tensor,
    token_N: Tensor,
    gate_N: Tensor,
    offs_E: Tensor,
    w_in_EHD: Tensor,
    w_out_EDF: Tensor,
    activation: str,
) -> Tensor:
    out_dtype = torch.promote_types(x_TD.dtype, torch.float32)
    out_TD = x_TD.new_zeros(x_TD.shape, dtype=out_dtype)
    if _native_ok(w_in_EHD, w_out_EDF):
        y_ND = _native_rows_ffn(x_TD.index_select(0, token_N), gate_N, offs_E, w_in_EHD, w_out_EDF, activation)
        return out_TD.index_add_(0, token_N, y_ND.to(out_dtype))
    # torch forms: each expert's rows go weight-stationary (form 0, 2-3 rows) or through the row
    # GEMM (form 1). Rows are ordered by form (stably, so still by expert within a form) and each
    # form runs on its slice with its own offsets.
    counts_E = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1).long())
    form_E = ((counts_E < WEIGHT_STATIONARY_MIN_ROWS) | (counts_E > WEIGHT_STATIONARY_MAX_ROWS)).long()
    rows_F = [int(n) for n in torch.zeros(2, dtype=torch.long).index_add_(0, form_E, counts_E)]  # host read
    if max(rows_F) < token_N.shape[0]:  # both forms: group the rows by form
        expert_N = torch.repeat_interleave(torch.arange(offs_E.shape[0], device=x_TD.device), counts_E)
        order_N = torch.argsort(form_E.index_select(0, expert_N), stable=True)
        token_N, gate_N = token_N[order_N], gate_N[order_N]
    x_ND = x_TD.index_select(0, token_N)
    parts, start = [], 0
    for form, n in enumerate(rows_F):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        offs_form_E = torch.cumsum(counts_E * (form_E == form), 0).to(torch.int32)
        ffn = _weight_stationary_ffn if form == 0 else _rows_ffn
        parts.append(ffn(x_ND[rows], gate_N[rows], offs_form_E, w_in_EHD, w_out_EDF, activation).to(out_dtype))
    return out_TD.index_add_(0, token_N, torch.cat(parts) if len(parts) > 1 else parts[0])


def routed_ffn_decode_native(x_TD: Tensor, expert_TK: Tensor, weight_TK: Tensor, w_in_EHD: Tensor,
                             w_out_EDF: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    """The whole dropless decode dispatch in one native call, from the router's choices.

    Sorting the assignments, gathering the rows, both grouped products, the activation, the gate
    weights and the combine all run inside `native.decode_ffn`, so a one-token step costs one C
    call and two allocations instead of some thirty torch ops (argsort, counts, gathers, casts,
    the activation); at decode sizes each op costs tens of microseconds when its code is not in
    cache, which it is not after the rest of a model ran (docs/performance.md). Eager only (the
    C call would break a compiled graph; compiled graphs take the custom op above). Returns
    (out_TD float32, tokens_per_expert, dropped, offered; float32) or None where the native
    kernel is unavailable.
    """
    if not _native_ok(w_in_EHD, w_out_EDF):
        return None
    return native.decode_ffn(x_TD, expert_TK, weight_TK, w_in_EHD, w_out_EDF, activation)


def route_softmax_topk_decode(x_TD: Tensor, w_ED: Tensor, k: int, norm: bool, aux_coef: float, z_coef: float):
    """Softmax top-k routing of a few tokens without gradient on CPU in one native call.

    The router half of the decode step: the gate product, softmax, top-k, renormalisation and
    the router losses in C (`native.route_softmax_topk`) instead of about fifteen torch ops.
    Returns its tuple, or None where it does not apply (GPU, many tokens, gradients, compiling,
    float64, no native kernel).
    """
    if x_TD.device.type != "cpu" or not 0 < x_TD.shape[0] <= DECODE_MAX_TOKENS or torch.compiler.is_compiling():
        return None
    if x_TD.dtype not in (torch.float32, torch.bfloat16) or w_ED.dtype != torch.float32 or w_ED.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and (x_TD.requires_grad or w_ED.requires_grad):
        return None
    if native.library() is None:
        return None
    return native.route_softmax_topk(x_TD, w_ED, k, norm, aux_coef, z_coef)


@_routed_ffn_decode_op.register_fake
def _(x_TD, token_N, gate_N, offs_E, w_in_EHD, w_out_EDF, activation):
    return x_TD.new_empty(x_TD.shape, dtype=torch.promote_types(x_TD.dtype, torch.float32))


def decode_path_ok(x_TD: Tensor, w_in_EHD: Tensor, w_out_EDF: Tensor, *tensors: Tensor) -> bool:
    """Whether `routed_ffn_decode` applies: CPU, few tokens, no gradient wanted, aligned shapes."""
    if x_TD.device.type != "cpu" or x_TD.shape[0] > DECODE_MAX_TOKENS or x_TD.shape[0] == 0:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, w_in_EHD, w_out_EDF, *tensors)):
        return False
    # native grouped GEMM in both forms: D, H and F aligned to 16 bytes, float32 or bfloat16
    align = 16 // x_TD.element_size()
    widths = (x_TD.shape[1], w_in_EHD.shape[1], w_out_EDF.shape[2])
    return x_TD.dtype in (torch.float32, torch.bfloat16) and all(w % align == 0 for w in widths) and (
        w_in_EHD.dtype == w_out_EDF.dtype == x_TD.dtype
    )


def routed_ffn_decode(x_TD, token_N, gate_N, offs_E, w_in_EHD, w_out_EDF, activation: str) -> Tensor:
    """Inference-only `routed_ffn` for a few tokens on CPU; same arguments and result (float32)."""
    args = (x_TD, token_N, gate_N, offs_E.to(torch.int32), w_in_EHD, w_out_EDF, activation)
    if torch.compiler.is_compiling():
        return _routed_ffn_decode_op(*args)
    # Eager: call the implementation itself. The custom-op dispatch exists for the compiler and
    # costs about 0.3 ms a call here (measured), a tenth of a one-token decode step.
    return _routed_ffn_decode_op._init_fn(*args)
