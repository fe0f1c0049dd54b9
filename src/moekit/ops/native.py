"""moekit's native kernels: the CPU decode path (a few tokens, no gradient).

- `grouped_gemv(x_NI, w_EOI, ends_E)` computes `y[n] = w[e] @ x[n]` for the rows of each expert
  (rows sorted by expert, `ends_E` the cumulative row counts), reading each touched expert's
  weight once at the machine's read bandwidth (docs/performance.md). PyTorch has no such op:
  MKL's one-row product runs on one core, and a few rows go through GEMM packing.
- `decode_ffn` is the whole dropless routed FFN of a few tokens in one call (sort by expert,
  both grouped products, activation, gate, combine), and `route_softmax_topk` the softmax top-k
  router with its losses. At decode sizes the time outside the weight reads is the fixed cost
  of each torch call whose code has gone cold in the caches while the rest of a model ran,
  tens of microseconds each, so one call instead of thirty is what brings a one-token step
  near the bytes floor (docs/performance.md).

The C source (grouped_gemv.c, beside this file) is compiled on first use with the system C
compiler (`$CC`, else `cc`; `-O3 -march=native -fopenmp`, well under a second) into a cache
folder (`$MOEKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/moekit`, else `~/.cache/moekit`) and loaded
with ctypes, which releases the GIL during the call. The library is named by a hash of the
source, the compiler, its flags and the CPU's feature flags, so a new CPU or a new source builds
a new one. Torch has loaded its libgomp before this library is loaded, and the dynamic loader
reuses a loaded library of the same soname, so the kernel runs on torch's OpenMP threads.

Where compiling or loading fails the kernel is off for the process, with one warning, and
callers take their pure-torch path; `MOEKIT_NATIVE=0` turns it off. `reference_grouped_gemv` is
the slow reference the tests hold it to.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shlex
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch
from torch import Tensor

from moekit.ops.activations import ACTIVATIONS, GATED

SOURCE = Path(__file__).with_name("grouped_gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm")
# weight rows per work item (flat from 4 to 64: docs/performance.md, "Numbers behind the code")
BLOCK_ROWS = 16
_STATE: dict = {"lib": None, "failed": os.environ.get("MOEKIT_NATIVE", "1") == "0", "why": None}
_FUNCS = {torch.float32: "moekit_grouped_gemv_f32", torch.bfloat16: "moekit_grouped_gemv_bf16"}
_DECODE_FUNCS = {torch.float32: "moekit_decode_ffn_f32", torch.bfloat16: "moekit_decode_ffn_bf16"}
# activation codes of grouped_gemv.c: the position in ops/activations.ACTIVATIONS
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def cache_dir() -> Path:
    if os.environ.get("MOEKIT_CACHE_DIR"):
        return Path(os.environ["MOEKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "moekit"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return ""


def _build() -> Path:
    cc = shlex.split(os.environ.get("CC") or "cc")  # CC may carry flags: "gcc -m64"
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *cc, version, *FLAGS, _cpu_flags()]).encode()).hexdigest()
    out = cache_dir() / f"grouped_gemv-{key[:16]}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes (torchrun ranks) never load a
    # half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed: {proc.stderr.strip()[:300]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _load():
    lib = ctypes.CDLL(str(_build()))
    for name in _FUNCS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_int]
        fn.restype = ctypes.c_int
    for name in _DECODE_FUNCS.values():
        fn = getattr(lib, name)
        fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 6 + [ctypes.c_int] + [ctypes.c_void_p] * 4 + [
            ctypes.c_int64, ctypes.c_int]
        fn.restype = ctypes.c_int
    lib.moekit_route_softmax_topk.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 4 + [ctypes.c_int] + [
        ctypes.c_float] * 2 + [ctypes.c_void_p] * 8 + [ctypes.c_int]
    lib.moekit_route_softmax_topk.restype = ctypes.c_int
    return lib


def library():
    """The loaded kernel library, or None where it cannot be built here (warns once)."""
    if _STATE["lib"] is None and not _STATE["failed"]:
        try:
            _STATE["lib"] = _load()
        except Exception as err:  # noqa: BLE001 - no compiler, no OpenMP, read-only cache: fall back
            _STATE["failed"], _STATE["why"] = True, f"{type(err).__name__}: {str(err)[:300]}"
            warnings.warn(f"moekit: the native decode kernel is unavailable ({_STATE['why']}); the decode path "
                          "uses torch's matrix products instead", RuntimeWarning, stacklevel=2)
    return _STATE["lib"]


def supports(w_EOI: Tensor) -> bool:
    return w_EOI.device.type == "cpu" and w_EOI.dtype in _FUNCS


def grouped_gemv(x_NI: Tensor, w_EOI: Tensor, ends_E: Tensor, x_rows: Tensor | None = None) -> Tensor | None:
    """`y[n] = w_EOI[e] @ x_NI[n]` for expert e's rows `ends_E[e-1]:ends_E[e]`; float32 (N, O).

    With `x_rows` (int64 (N,)), row n reads `x_NI[x_rows[n]]` instead (the gather is fused).
    x is cast to float32; w is float32 or bfloat16 on CPU. None where the kernel is unavailable.
    """
    lib = library()
    if lib is None:
        return None
    if not supports(w_EOI):
        raise ValueError(f"grouped_gemv: weights must be float32 or bfloat16 on CPU, got {w_EOI.dtype} on "
                         f"{w_EOI.device}")
    num_experts, out_dim, in_dim = w_EOI.shape
    rows = x_NI.shape[0] if x_rows is None else x_rows.shape[0]
    if x_NI.dim() != 2 or x_NI.shape[1] != in_dim or ends_E.shape != (num_experts,):
        raise ValueError(f"grouped_gemv: x {tuple(x_NI.shape)}, w {tuple(w_EOI.shape)} and ends "
                         f"{tuple(ends_E.shape)} do not fit (N, I), (E, O, I), (E,)")
    x_NI = x_NI.to(torch.float32).contiguous()
    w_EOI = w_EOI.contiguous()
    ends_E = ends_E.to(torch.int32).contiguous()
    if x_rows is not None:
        x_rows = x_rows.to(torch.int64).contiguous()
    y_NO = torch.empty(rows, out_dim, dtype=torch.float32)
    status = getattr(lib, _FUNCS[w_EOI.dtype])(
        x_NI.data_ptr(), None if x_rows is None else x_rows.data_ptr(), w_EOI.data_ptr(), y_NO.data_ptr(),
        ends_E.data_ptr(), rows, x_NI.shape[0], num_experts, out_dim, in_dim, BLOCK_ROWS, torch.get_num_threads(),
    )
    if status == 3:
        raise ValueError(f"grouped_gemv: x_rows must index the {x_NI.shape[0]} rows of x")
    if status == 2:
        raise ValueError(f"grouped_gemv: ends must be non-decreasing row counts ending at the {rows} rows "
                         f"of x, got {ends_E.tolist()}")
    if status != 0:
        raise MemoryError("grouped_gemv: the native kernel could not allocate its expert list")
    return y_NO


def _ready(t: Tensor, dtype: torch.dtype) -> Tensor:
    """t in dtype and contiguous, without a call where it already is (at decode sizes every torch
    call costs tens of microseconds when its code is cold, docs/performance.md)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    return t if t.is_contiguous() else t.contiguous()


def decode_ffn(x_TD: Tensor, expert_TK: Tensor, weight_TK: Tensor, w_in_EHD: Tensor, w_out_EDF: Tensor,
               activation: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The dropless routed FFN of a few tokens in one native call; the library must be loaded.

    out[t] = sum_k weight[t, k] * W_out[e] act(W_in[e] x[t]) with e = expert[t, k]: the stable
    sort by expert, the row gather, both grouped products, the activation and gate, and the
    combine in row order. Returns (out_TD, rows per expert (E,), dropped (0) and offered (T*K)
    assignments as 0-d tensors), all float32. x is cast to float32; weights float32 or bfloat16.
    """
    num_experts, hidden, d_model = w_in_EHD.shape
    width = w_out_EDF.shape[2]
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"decode_ffn: unknown activation {activation!r}; allowed: {list(ACTIVATION_CODES)}")
    if w_out_EDF.dtype != w_in_EHD.dtype or w_in_EHD.dtype not in _DECODE_FUNCS:
        raise ValueError(f"decode_ffn: weights must share float32 or bfloat16, got {w_in_EHD.dtype} and "
                         f"{w_out_EDF.dtype}")
    gated = activation in GATED  # H = 2F, gate columns first
    if x_TD.dim() != 2 or x_TD.shape[1] != d_model or w_out_EDF.shape[:2] != (num_experts, d_model) or (
            expert_TK.shape != weight_TK.shape or expert_TK.shape[0] != x_TD.shape[0]) or (
            hidden != (2 if gated else 1) * width):
        raise ValueError(f"decode_ffn: x {tuple(x_TD.shape)}, experts {tuple(expert_TK.shape)}, weights "
                         f"{tuple(weight_TK.shape)}, w_in {tuple(w_in_EHD.shape)} and w_out "
                         f"{tuple(w_out_EDF.shape)} do not fit (T, D), (T, K), (T, K), (E, H, D), (E, D, F) "
                         f"with H = {'2F' if gated else 'F'} for {activation!r}")
    x_TD, expert_TK, weight_TK = _ready(x_TD, torch.float32), _ready(expert_TK, torch.int64), _ready(
        weight_TK, torch.float32)
    w_in_EHD, w_out_EDF = _ready(w_in_EHD, w_in_EHD.dtype), _ready(w_out_EDF, w_out_EDF.dtype)
    out_TD = torch.empty(x_TD.shape, dtype=torch.float32)
    counts_E = torch.empty(num_experts, dtype=torch.float32)
    dropped, offered = torch.empty((), dtype=torch.float32), torch.empty((), dtype=torch.float32)
    status = getattr(library(), _DECODE_FUNCS[w_in_EHD.dtype])(
        x_TD.data_ptr(), expert_TK.data_ptr(), weight_TK.data_ptr(), w_in_EHD.data_ptr(), w_out_EDF.data_ptr(),
        x_TD.shape[0], expert_TK.shape[1], num_experts, d_model, hidden, width, ACTIVATION_CODES[activation],
        out_TD.data_ptr(), counts_E.data_ptr(), dropped.data_ptr(), offered.data_ptr(), BLOCK_ROWS,
        torch.get_num_threads(),
    )
    if status == 2:
        raise ValueError(f"decode_ffn: expert ids must lie in [0, {num_experts})")
    if status != 0:
        raise MemoryError("decode_ffn: the native kernel could not allocate its temporaries")
    return out_TD, counts_E, dropped, offered


def route_softmax_topk(x_TD: Tensor, w_ED: Tensor, k: int, norm: bool, aux_coef: float = 1.0,
                       z_coef: float = 0.0) -> tuple[Tensor, ...]:
    """Softmax top-k routing of a few tokens in one native call; the library must be loaded.

    Returns (logits_TE, probs_TE, expert_idx_TK int64, weight_TK, priority_T, load-balancing loss,
    z-loss, aux loss), all float32 but the ids: the K largest probabilities in descending order
    (ties to the lower id, where torch.topk leaves the order of ties unspecified and on CPU often
    picks the higher id), their weights (renormalised when `norm`), each token's first weight,
    the Switch load-balancing loss, the ST-MoE z-loss and aux_coef * lb (+ z_coef * z if > 0).
    """
    num_experts, d_model = w_ED.shape
    if x_TD.dim() != 2 or x_TD.shape[1] != d_model or w_ED.dtype != torch.float32 or not 1 <= k <= num_experts:
        raise ValueError(f"route_softmax_topk: x {tuple(x_TD.shape)} and float32 w {tuple(w_ED.shape)} "
                         f"({w_ED.dtype}) do not fit (T, D), (E, D), or k={k} is outside [1, {num_experts}]")
    x_TD, w_ED = _ready(x_TD, torch.float32), _ready(w_ED, torch.float32)
    num_tokens = x_TD.shape[0]
    f32 = torch.float32
    logits_TE = torch.empty(num_tokens, num_experts, dtype=f32)
    probs_TE = torch.empty(num_tokens, num_experts, dtype=f32)
    idx_TK, weight_TK = torch.empty(num_tokens, k, dtype=torch.int64), torch.empty(num_tokens, k, dtype=f32)
    priority_T = torch.empty(num_tokens, dtype=f32)
    lb, z, aux = torch.empty((), dtype=f32), torch.empty((), dtype=f32), torch.empty((), dtype=f32)
    status = library().moekit_route_softmax_topk(
        x_TD.data_ptr(), w_ED.data_ptr(), num_tokens, d_model, num_experts, k, int(norm), aux_coef, z_coef,
        logits_TE.data_ptr(), probs_TE.data_ptr(), idx_TK.data_ptr(), weight_TK.data_ptr(), priority_T.data_ptr(),
        lb.data_ptr(), z.data_ptr(), aux.data_ptr(), torch.get_num_threads(),
    )
    if status != 0:
        raise ValueError(f"route_softmax_topk: k={k} is outside [1, {num_experts}]")
    return logits_TE, probs_TE, idx_TK, weight_TK, priority_T, lb, z, aux


def reference_grouped_gemv(x_NI: Tensor, w_EOI: Tensor, ends_E: Tensor, x_rows: Tensor | None = None) -> Tensor:
    """The slow reference: one float32 matrix product per expert."""
    if x_rows is not None:
        x_NI = x_NI[x_rows]
    starts = [0, *ends_E.tolist()[:-1]]
    parts = [x_NI[s:e].float() @ w_EOI[i].float().t() for i, (s, e) in enumerate(zip(starts, ends_E.tolist()))]
    return torch.cat(parts) if parts else x_NI.new_zeros(0, w_EOI.shape[1], dtype=torch.float32)
