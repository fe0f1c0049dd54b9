"""Decode path: the routed expert FFN for a few tokens (T <= 32), inference only, CPU.

Shape legend: T tokens, D d_model, E experts, N = T*K routed rows sorted by expert, H hidden
width of the first projection (2F for gated activations), F down-projection width, S rows of
experts with at most `WEIGHT_STATIONARY_MAX_ROWS` rows, L the other rows.

With a few rows per expert the layer is memory-bound: the floor is reading each touched expert's
weights once. The grouped GEMM only visits experts that got rows (an empty group is skipped
without reading its weights), one matmul per touched expert, so every weight is read once; what
is left is how fast one small matmul streams its weight. MKL's `x @ W^T` with 2-3 rows packs
the weight first, while the weight-stationary form `W @ x^T` (the same numbers, transposed
output) streams it: measured on the benchmark machine (docs/performance.md) 1.4-3.9x faster
for 2-3 rows, about equal for one row (a GEMV either way), between 0.8x and 1.4x from 4 rows
on depending on the run. So rows are
split in two stable groups: experts with 2-3 rows run `W @ x^T` through the 3d x 2d grouped
GEMM, the others `x @ W^T`.

Experts with exactly one row are the common decode case (one token, k experts) and the one MKL
serves worst: a one-row product runs on one core and streams the weight at about half the
machine's read bandwidth whatever the thread count (docs/performance.md). For them the FFN is
written as gather-multiply-sum expressions, `h[n] = sum_d W_in[e_n, :, d] * x[n, d]`, and handed
to `torch.compile`: inductor fuses the gather into the loads (nothing of weight size is ever
materialised) and emits one loop nest over (row, output) split over all threads with a vectorised
reduction over d. Measured 1.2 ms against 4.4 ms for MKL on the one-token benchmark shape. It
is compiled once per process on first use (seconds), only when the rows' weights are large
enough for it to pay (`ONE_ROW_KERNEL_MIN_BYTES`), and if compiling fails (no C++ compiler)
the path falls back to the grouped GEMM for good, with a warning. `MOEKIT_DECODE_COMPILE=0` in
the environment turns the kernel off.

Choosing these splits reads the per-expert counts on the host. On CPU that is free (the data is
already there), so this path is used on CPU only; on CUDA the regular routed op runs (the
grouped kernel takes small groups well and nothing syncs). A `torch.library` custom op, so a
compiled graph keeps it whole despite the host read.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.ops.activations import act_forward
from moekit.ops.grouped import gmm
from moekit.ops.routed import gated_down_projection

DECODE_MAX_TOKENS = 32
WEIGHT_STATIONARY_MIN_ROWS, WEIGHT_STATIONARY_MAX_ROWS = 2, 3
# The compiled one-row kernel runs when the one-row experts' weights add up to at least this many
# bytes (below it the grouped GEMM is fast enough and the first call's compile would not pay).
ONE_ROW_KERNEL_MIN_BYTES = 8 * 2**20
_ONE_ROW = {"fn": None, "failed": os.environ.get("MOEKIT_DECODE_COMPILE", "1") == "0"}


def _one_row_ffn_expr(x_ND: Tensor, expert_N: Tensor, gate_N: Tensor, w_in_EHD: Tensor, w_out_EDF: Tensor,
                      activation: str) -> Tensor:
    """Each row through its own expert as gather-multiply-sums; only sensible compiled (eager
    would copy every row's weights)."""
    h_NH = (w_in_EHD[expert_N] * x_ND.unsqueeze(1)).sum(-1, dtype=torch.float32)
    a_NF = act_forward(h_NH, activation) * gate_N.unsqueeze(1)
    return (w_out_EDF[expert_N] * a_NF.to(w_out_EDF.dtype).unsqueeze(1)).sum(-1, dtype=torch.float32)


def _one_row_kernel():
    """The compiled one-row FFN, or None where torch.compile does not work here."""
    if _ONE_ROW["failed"]:
        return None
    if _ONE_ROW["fn"] is None:
        _ONE_ROW["fn"] = torch.compile(_one_row_ffn_expr, dynamic=True, fullgraph=True)
    return _ONE_ROW["fn"]


def _one_row_ffn(x_ND, expert_N, gate_N, w_in_EHD, w_out_EDF, activation) -> Tensor | None:
    fn = _one_row_kernel()
    if fn is None:
        return None
    try:
        return fn(x_ND, expert_N, gate_N, w_in_EHD, w_out_EDF, activation)
    except Exception as err:  # noqa: BLE001 - any compiler failure: fall back for good
        _ONE_ROW["failed"] = True
        warnings.warn(f"moekit: the compiled one-row decode kernel is unavailable ({type(err).__name__}: "
                      f"{str(err)[:200]}); using the grouped GEMM instead", RuntimeWarning, stacklevel=2)
        return None


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
    num_experts = offs_E.shape[0]
    counts_E = torch.diff(offs_E.long(), prepend=offs_E.new_zeros(1).long())
    expert_N = torch.repeat_interleave(torch.arange(num_experts, device=x_TD.device), counts_E)
    # Each expert's rows take one form by its row count: 0 the compiled one-row kernel, 1 the
    # weight-stationary GEMM (2-3 rows), 2 the row GEMM. Rows are ordered by form (stably, so
    # still by expert within a form) and each form runs on its slice with its own offsets.
    one_E = counts_E == 1
    row_bytes = w_in_EHD[0].numel() * w_in_EHD.element_size() + w_out_EDF[0].numel() * w_out_EDF.element_size()
    form_E = torch.full_like(counts_E, 2)
    form_E[(counts_E >= WEIGHT_STATIONARY_MIN_ROWS) & (counts_E <= WEIGHT_STATIONARY_MAX_ROWS)] = 1
    # host reads: free on CPU, the reason this path is CPU only
    if int(one_E.sum()) * row_bytes >= ONE_ROW_KERNEL_MIN_BYTES and _one_row_kernel() is not None:
        form_E[one_E] = 0
    rows_F = [int(n) for n in torch.zeros(3, dtype=torch.long).index_add_(0, form_E, counts_E)]
    if max(rows_F) < token_N.shape[0]:  # more than one form: group the rows by form
        order_N = torch.argsort(form_E.index_select(0, expert_N), stable=True)
        token_N, gate_N, expert_N = token_N[order_N], gate_N[order_N], expert_N[order_N]
    x_ND = x_TD.index_select(0, token_N)
    parts, start = [], 0
    for form, n in enumerate(rows_F):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        y_nD = None
        if form == 0:
            y_nD = _one_row_ffn(x_ND[rows], expert_N[rows], gate_N[rows], w_in_EHD, w_out_EDF, activation)
        if y_nD is None:  # forms 1 and 2, or the kernel failed to compile: a grouped GEMM form
            offs_form_E = torch.cumsum(counts_E * (form_E == form), 0).to(torch.int32)
            ffn = _weight_stationary_ffn if form == 1 else _rows_ffn
            y_nD = ffn(x_ND[rows], gate_N[rows], offs_form_E, w_in_EHD, w_out_EDF, activation)
        parts.append(y_nD.to(torch.promote_types(x_TD.dtype, torch.float32)))
    out_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.promote_types(x_TD.dtype, torch.float32))
    return out_TD.index_add_(0, token_N, torch.cat(parts) if len(parts) > 1 else parts[0])


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
