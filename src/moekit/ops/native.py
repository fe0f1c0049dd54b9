"""moekit's one native kernel: the grouped matrix-vector product of the CPU decode path.

`grouped_gemv(x_NI, w_EOI, ends_E)` computes `y[n] = w[e] @ x[n]` for the rows of each expert
(rows sorted by expert, `ends_E` the cumulative row counts), reading each touched expert's
weight once at the machine's read bandwidth (docs/performance.md). PyTorch has no such op:
MKL's one-row product runs on one core, and a few rows go through GEMM packing.

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

SOURCE = Path(__file__).with_name("grouped_gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# weight rows per work item: measured flat from 4 to 64 on the benchmark machine
BLOCK_ROWS = 16
_STATE: dict = {"lib": None, "failed": os.environ.get("MOEKIT_NATIVE", "1") == "0", "why": None}
_FUNCS = {torch.float32: "moekit_grouped_gemv_f32", torch.bfloat16: "moekit_grouped_gemv_bf16"}


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
    lib.moekit_sort_by_expert.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 4
    lib.moekit_sort_by_expert.restype = ctypes.c_int
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


def sort_by_expert(expert_TK: Tensor, weight_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A stable counting sort of the T*K assignments by expert, in C; the library must be loaded.

    Returns (ends_E int32 cumulative counts, counts_E float32, token_N int64, gate_N float32): for
    each row sorted by expert, its token and its combine weight. Equals `permute.sort_by_expert`
    plus the gathers `order // K` and `weight[order]` that follow it in the dispatch.
    """
    expert_N = expert_TK.reshape(-1).to(torch.int64).contiguous()
    weight_N = weight_TK.reshape(-1).to(torch.float32).contiguous()
    n = expert_N.shape[0]
    ends_E, counts_E = torch.empty(num_experts, dtype=torch.int32), torch.empty(num_experts, dtype=torch.float32)
    token_N, gate_N = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.float32)
    status = library().moekit_sort_by_expert(
        expert_N.data_ptr(), weight_N.data_ptr(), n, expert_TK.shape[-1], num_experts,
        ends_E.data_ptr(), counts_E.data_ptr(), token_N.data_ptr(), gate_N.data_ptr(),
    )
    if status != 0:
        raise ValueError(f"sort_by_expert: expert ids must lie in [0, {num_experts})")
    return ends_E, counts_E, token_N, gate_N


def reference_grouped_gemv(x_NI: Tensor, w_EOI: Tensor, ends_E: Tensor, x_rows: Tensor | None = None) -> Tensor:
    """The slow reference: one float32 matrix product per expert."""
    if x_rows is not None:
        x_NI = x_NI[x_rows]
    starts = [0, *ends_E.tolist()[:-1]]
    parts = [x_NI[s:e].float() @ w_EOI[i].float().t() for i, (s, e) in enumerate(zip(starts, ends_E.tolist()))]
    return torch.cat(parts) if parts else x_NI.new_zeros(0, w_EOI.shape[1], dtype=torch.float32)
