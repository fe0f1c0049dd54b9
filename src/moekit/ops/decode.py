"""Decode path: the routed expert FFN for a few tokens (T <= 32), inference only, CPU.

Shape legend: T tokens, D d_model, E experts, N = T*K routed rows sorted by expert, H hidden
width of the first projection (2F for gated activations), F down-projection width.

With a few rows per expert the layer is memory-bound: the floor is reading each touched expert's
weights once, which the native grouped matrix-vector kernel (ops/native.py) does at the machine's
read bandwidth; at these sizes the fixed cost of each torch call is what is left, so the fewer
calls the better (measurements in docs/performance.md, "Decode").

`decode_applies` is the one condition of this path, which the MoE layer's plan
(layers/plan.py) asks once per forward. Two entries then:

- `routed_ffn_decode_native` takes the router's choices and runs the whole dispatch (sort,
  gather, both products, activation, gate, combine) in one native call (`native.decode_ffn`);
- `routed_ffn_decode` takes rows already sorted by expert: a `torch.library` custom op, so a
  compiled graph keeps it whole despite its host read and foreign call. Inside, the native
  kernel runs both projections when it is built; otherwise torch's matrix products, each expert
  in the faster of two forms for its row count (the weight-stationary `W @ x^T` for 2-3 rows,
  where MKL's `x @ W^T` packs the weight first; the row GEMM otherwise).

On CUDA the regular routed op runs: its grouped kernel takes small groups well and nothing syncs.
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
_DECODE_DTYPES = (torch.float32, torch.bfloat16)


def decode_applies(x_TD: Tensor, dtype: torch.dtype, widths: tuple[int, ...], wants_grad: bool) -> bool:
    """Whether the decode path takes this call: CPU, 1 to 32 tokens, no gradient wanted, a
    float32 or bfloat16 compute dtype, and widths (D, H, F) aligned to 16 bytes in it (the torch
    forms' grouped GEMM needs them)."""
    if x_TD.device.type != "cpu" or not 0 < x_TD.shape[0] <= DECODE_MAX_TOKENS or wants_grad:
        return False
    if dtype not in _DECODE_DTYPES:
        return False
    align = 16 // dtype.itemsize
    return all(w % align == 0 for w in widths)


def decode_path_ok(x_TD: Tensor, w_in_EHD: Tensor, w_out_EDF: Tensor, *tensors: Tensor) -> bool:
    """`decode_applies` for the tensors of one `routed_ffn_decode` call (weights in x's dtype)."""
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x_TD, w_in_EHD, w_out_EDF, *tensors))
    if not w_in_EHD.dtype == w_out_EDF.dtype == x_TD.dtype:
        return False
    return decode_applies(x_TD, x_TD.dtype, (x_TD.shape[1], w_in_EHD.shape[1], w_out_EDF.shape[2]), wants_grad)


def native_ready() -> bool:
    """Whether the native kernels are built and loaded here (builds them on first call; warns
    once where they cannot be)."""
    return native.library() is not None


def _native_rows_ffn(x, gate_N, ends_E, w_in_EHD, w_out_EDF, activation, x_rows=None) -> Tensor:
    """gate[n] * W_out[e] act(W_in[e] x_n) per row sorted by expert, (N, D) float32, through the
    native kernel; x_n is x[x_rows[n]] when x_rows is given (the gather fused), else x[n]."""
    h_NH = native.grouped_gemv(x, w_in_EHD, ends_E, x_rows)
    a_NF = act_forward(h_NH, activation).mul_(gate_N.to(torch.float32).unsqueeze(1))
    return native.grouped_gemv(a_NF, w_out_EDF, ends_E)


def _weight_stationary_ffn(x_ND, gate_N, offs_E, w_in_EHD, w_out_EDF, activation) -> Tensor:
    """y = act(x W_in^T) * gate @ W_out^T computed as W @ x^T per expert; returns (N, D)."""
    h_HN = F.grouped_mm(w_in_EHD, x_ND.t(), offs=offs_E)  # (H, N)
    a_NF = act_forward(h_HN.t(), activation)
    a_NF = a_NF.contiguous().mul_(gate_N.to(a_NF.dtype).unsqueeze(1))  # (N, F), rows contiguous
    return F.grouped_mm(w_out_EDF, a_NF.t(), offs=offs_E).t()  # (D, N) -> (N, D)


def _rows_ffn(x_ND, gate_N, offs_E, w_in_EHD, w_out_EDF, activation) -> Tensor:
    h_NH = gmm(x_ND, w_in_EHD.transpose(1, 2), offs_E)
    return gated_down_projection(act_forward(h_NH, activation), gate_N, w_out_EDF, offs_E, 0)


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
    # Decided here, at run time: a compiled graph holding this op cannot know at trace time.
    if native.supports(w_in_EHD) and w_in_EHD.dtype == w_out_EDF.dtype and native_ready():
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
                             w_out_EDF: Tensor, activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The whole dropless decode dispatch in one native call, from the router's choices: sorting
    the assignments, gathering the rows, both grouped products, the activation, the gate weights
    and the combine run inside `native.decode_ffn`. Eager only (a compiled graph takes the custom
    op above); the caller has checked `decode_applies` and `native_ready`. Returns (out_TD,
    tokens_per_expert, dropped, offered), float32."""
    return native.decode_ffn(x_TD, expert_TK, weight_TK, w_in_EHD, w_out_EDF, activation)


@_routed_ffn_decode_op.register_fake
def _(x_TD, token_N, gate_N, offs_E, w_in_EHD, w_out_EDF, activation):
    return x_TD.new_empty(x_TD.shape, dtype=torch.promote_types(x_TD.dtype, torch.float32))


def routed_ffn_decode(x_TD, token_N, gate_N, offs_E, w_in_EHD, w_out_EDF, activation: str) -> Tensor:
    """Inference-only `routed_ffn` for a few tokens on CPU; same arguments and result (float32)."""
    args = (x_TD, token_N, gate_N, offs_E.to(torch.int32), w_in_EHD, w_out_EDF, activation)
    if torch.compiler.is_compiling():
        return _routed_ffn_decode_op(*args)
    # Eager: call the implementation itself; the custom-op dispatch exists for the compiler and
    # costs a tenth of a one-token step (docs/performance.md, "Decode").
    return _routed_ffn_decode_op._init_fn(*args)
