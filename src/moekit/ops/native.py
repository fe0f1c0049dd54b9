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

The cache is checked before anything is loaded from it: each build appends a trailer to the
library (a marker, the full build key and the SHA-256 of the bytes before it; the dynamic loader
ignores bytes past the ELF segments) and a cached file is loaded only when its trailer verifies.
Checking before loading matters: `dlopen` of a truncated library dies with SIGBUS, and a wrong
one runs its constructors, so a check that the loaded library reports its version would come
too late. A file that does not verify (truncated, corrupt, another build's) is rebuilt once. One
file carries both the library and its checksum, so the build-then-rename stays one atomic step
for concurrent builders (torchrun ranks); a sidecar checksum would be a second file that a
concurrent build could pair with another build's library. A build's temporary file carries its
host and pid, and temporaries of processes that no longer exist on this host (a killed build)
are removed by the next load.

Where compiling or loading fails the kernel is off for the process, with one warning, and
callers take their pure-torch path; `MOEKIT_NATIVE=0` turns it off, and `MOEKIT_NATIVE=require`
(set by CI) makes a failure an error instead, so tests cannot pass by skipping the kernel.

The kernel functions check every argument before its pointer reaches C (a CPU tensor with real
storage, its dtype, its dims and sizes; a meta or CUDA tensor would hand C a pointer it cannot
read), and the C functions check their sizes again and answer with a status.
`reference_grouped_gemv` is the slow reference the tests hold them to.
"""

from __future__ import annotations

import ctypes
import hashlib
import operator
import os
import re
import secrets
import shlex
import socket
import subprocess
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from moekit.ops.activations import ACTIVATIONS, GATED

SOURCE = Path(__file__).with_name("grouped_gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-lm")
# weight rows per work item (flat from 4 to 64: docs/performance.md, "Numbers behind the code")
BLOCK_ROWS = 16
# a build that takes longer has failed; a temporary twice as old is no build in progress
BUILD_TIMEOUT_S = 120
# MOEKIT_NATIVE: 0 off, 1 (default) on with a warning and the torch fallback where the build
# fails, require: a failed build or load is an error (CI: tests must not skip the kernel)
_MODES = {"0": "off", "1": "on", "": "on", "require": "require"}
_STATE: dict = {"lib": None, "failed": os.environ.get("MOEKIT_NATIVE", "1") == "0", "why": None,
                "required": False}
_FUNCS = {torch.float32: "moekit_grouped_gemv_f32", torch.bfloat16: "moekit_grouped_gemv_bf16"}
_DECODE_FUNCS = {torch.float32: "moekit_decode_ffn_f32", torch.bfloat16: "moekit_decode_ffn_bf16"}
# activation codes of grouped_gemv.c: the position in ops/activations.ACTIVATIONS
ACTIVATION_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
# the trailer each build appends to its library: marker, full build key (64 hex), SHA-256 of the
# bytes before the trailer
_MARKER = b"moekit-native-v1"
_TRAILER_BYTES = len(_MARKER) + 64 + 32
_INT32_MAX = 2**31 - 1
_FLOATS = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))
_INTS = frozenset((torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64))
_WEIGHTS = frozenset((torch.float32, torch.bfloat16))
_F32 = frozenset((torch.float32,))
_PLAIN = (torch.Tensor, torch.nn.Parameter)


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


def native_mode() -> str:
    """`MOEKIT_NATIVE` read: "off", "on" (the default) or "require"."""
    value = os.environ.get("MOEKIT_NATIVE", "1").strip().lower()
    if value not in _MODES:
        raise ValueError(f"MOEKIT_NATIVE must be 0 (kernel off), 1 (on, the default: fall back to torch with a "
                         f"warning where it cannot be built) or require (an error where it cannot), got {value!r}")
    return _MODES[value]


def _target() -> tuple[list[str], str, Path]:
    """The compiler command, the build key and the library's path in the cache."""
    cc = shlex.split(os.environ.get("CC") or "cc")  # CC may carry flags: "gcc -m64"
    if not cc:
        raise RuntimeError("CC is set but holds no command: unset it or name a C compiler")
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    except FileNotFoundError as err:
        raise RuntimeError(f"no C compiler {cc[0]!r} ({'$CC' if os.environ.get('CC') else 'cc, as $CC is unset'}): "
                           f"install gcc or clang with OpenMP, or point CC at one ({err.strerror})") from err
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        raise RuntimeError(f"the C compiler {' '.join(cc)!r} does not run: {err}") from err
    key = hashlib.sha256("\0".join([SOURCE.read_text(), *cc, version, *FLAGS, _cpu_flags()]).encode()).hexdigest()
    return cc, key, cache_dir() / f"grouped_gemv-{key[:16]}.so"


def _verify(path: Path, key: str) -> str | None:
    """None where path holds a library that `_build` wrote for this key, intact; else what is
    wrong with it. Reads the file (tens of KiB) and never loads it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return "not built yet"
    except OSError as err:
        return f"unreadable ({err})"
    trailer = data[-_TRAILER_BYTES:]
    if len(data) <= _TRAILER_BYTES or not trailer.startswith(_MARKER):
        return "truncated or not written by moekit (no build trailer)"
    if trailer[len(_MARKER):-32] != key.encode():
        return "built from another source, compiler or CPU"
    if hashlib.sha256(data[:-_TRAILER_BYTES]).digest() != trailer[-32:]:
        return "corrupt (its checksum does not match)"
    return None


def _host_tag() -> str:
    # temporaries of other hosts sharing the cache (a network home) are never removed: their
    # pids mean nothing here
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


_TEMPORARY = re.compile(r"^grouped_gemv-[0-9a-f]{16}\.so\.(?P<host>[0-9a-f]{8})\.(?P<pid>\d+)\.[0-9a-f]+\.tmp$")


def _temporary_name(out: Path) -> Path:
    return out.with_name(f"{out.name}.{_host_tag()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _pid_alive(pid: int) -> bool:
    if os.name != "posix":
        return True  # no cheap check that is safe (os.kill(pid, 0) sends CTRL_C on Windows): keep
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def _remove_stale_temporaries(folder: Path) -> list[Path]:
    """Removes the build temporaries in folder whose process (on this host) is gone and which are
    older than any build can take: a build killed between compiling and renaming. A live
    process's temporary is its build in progress; the age also spares a live build whose pid
    this process cannot see (another pid namespace on the same host and cache)."""
    removed = []
    host = _host_tag()
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        match = _TEMPORARY.match(name)
        if not match or match["host"] != host or _pid_alive(int(match["pid"])):
            continue
        try:
            if time.time() - (folder / name).stat().st_mtime > 2 * BUILD_TIMEOUT_S:
                (folder / name).unlink()
                removed.append(folder / name)
        except OSError:  # removed by another process first, or not ours to remove
            pass
    return removed


def _build() -> Path:
    """The verified library for this source, compiler and CPU: the cached one where its trailer
    verifies, else built once (missing, truncated, corrupt or another build's file)."""
    cc, key, out = _target()
    _remove_stale_temporaries(out.parent)
    problem = _verify(out, key)
    if problem is None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename: concurrent processes (torchrun ranks) never load a
    # half-written library, and the last rename wins with a library as good as the others
    tmp = _temporary_name(out)
    try:
        proc = subprocess.run([*cc, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True,
                              timeout=BUILD_TIMEOUT_S)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cc)} failed: {proc.stderr.strip()[:300]}")
        body = tmp.read_bytes()
        with open(tmp, "ab") as f:
            f.write(_MARKER + key.encode() + hashlib.sha256(body).digest())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    problem_after = _verify(out, key)
    if problem_after is not None:  # only where something else writes the cache folder
        raise RuntimeError(f"the library at {out} ({problem}) was rebuilt and still does not verify: "
                           f"{problem_after}")
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
    """The loaded kernel library, or None where it cannot be built here (warns once); with
    `MOEKIT_NATIVE=require` a RuntimeError instead, at every call."""
    if _STATE["lib"] is None and not _STATE["failed"]:
        mode = native_mode()
        if mode == "off":  # " 0 " and the like; plain "0" is read at import
            _STATE["failed"] = True
            return None
        required = mode == "require"
        try:
            _STATE["lib"] = _load()
        except Exception as err:  # noqa: BLE001 - no compiler, no OpenMP, read-only cache: fall back
            _STATE["failed"], _STATE["why"] = True, f"{type(err).__name__}: {str(err)[:300]}"
            _STATE["required"] = required
            if not required:
                warnings.warn(f"moekit: the native decode kernel is unavailable ({_STATE['why']}); the decode path "
                              "uses torch's matrix products instead", RuntimeWarning, stacklevel=2)
    if _STATE["required"] and _STATE["lib"] is None and _STATE["why"] is not None:
        raise RuntimeError(f"moekit: the native kernel cannot be built or loaded and MOEKIT_NATIVE=require: "
                           f"{_STATE['why']}. Install a C compiler with OpenMP (or set CC), or unset "
                           "MOEKIT_NATIVE to fall back to torch")
    return _STATE["lib"]


def _loaded(fn: str):
    lib = library()
    if lib is None:
        raise RuntimeError(f"{fn}: the native kernel is not loaded here "
                           f"({_STATE['why'] or 'turned off with MOEKIT_NATIVE=0'}); check native.library() first")
    return lib


def _subclass_in_cpu_memory(t: Tensor) -> bool:
    """Whether a tensor subclass's data lies in CPU memory: a FakeTensor says cpu over a meta
    storage, and a wrapper subclass may have no storage of its own."""
    try:
        return t.untyped_storage().device.type == "cpu"
    except Exception:  # noqa: BLE001 - no storage to read
        return False


def _check(fn: str, name: str, t, letters: str, dtypes: frozenset | None, kind: str = "") -> None:
    """A tensor argument fit to hand to C: a torch.Tensor in CPU memory (a strided CPU tensor with
    real storage: a meta, CUDA or fake tensor would hand C a pointer it cannot read), one of
    dtypes (None: any), with one dim per shape letter ("NI" for (N, I)). Cheap: about a
    microsecond a tensor, on a path where a whole decode step takes a few hundred."""
    if type(t) not in _PLAIN and not (isinstance(t, Tensor) and _subclass_in_cpu_memory(t)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor {_shape(letters)}, got {type(t).__name__}")
        raise ValueError(f"{fn}: {name} must be a tensor in CPU memory (the native kernels run on the CPU), got a "
                         f"{type(t).__name__} on {t.device} without CPU storage")
    if not t.is_cpu or t.layout != torch.strided or t.is_nested:
        raise ValueError(f"{fn}: {name} must be a dense tensor in CPU memory (the native kernels run on the CPU), "
                         f"got one on {t.device} with layout {t.layout}{' (nested)' if t.is_nested else ''}; "
                         "move it with .cpu() or .to_dense()")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{fn}: {name} must be {kind}, got {t.dtype}")
    if t.dim() != len(letters):
        raise ValueError(f"{fn}: {name} must be {len(letters)}-D {_shape(letters)}, got shape {tuple(t.shape)}")


def _shape(letters: str) -> str:
    return f"({', '.join(letters)}{',' if len(letters) == 1 else ''})"


def supports(w_EOI: Tensor) -> bool:
    return w_EOI.device.type == "cpu" and w_EOI.dtype in _FUNCS


def grouped_gemv(x_NI: Tensor, w_EOI: Tensor, ends_E: Tensor, x_rows: Tensor | None = None) -> Tensor | None:
    """`y[n] = w_EOI[e] @ x_NI[n]` for expert e's rows `ends_E[e-1]:ends_E[e]`; float32 (N, O).

    With `x_rows` (integer (N,)), row n reads `x_NI[x_rows[n]]` instead (the gather is fused).
    x is cast to float32; w is float32 or bfloat16; all on CPU. ends_E holds integers (int32
    passes as it is). None where the kernel is unavailable (after the arguments are checked).
    """
    fn = "grouped_gemv"
    _check(fn, "x_NI", x_NI, "NI", _FLOATS, "a floating-point tensor")
    _check(fn, "w_EOI", w_EOI, "EOI", _WEIGHTS, "float32 or bfloat16")
    _check(fn, "ends_E", ends_E, "E", _INTS, "an integer tensor (cumulative row counts)")
    if x_rows is not None:
        _check(fn, "x_rows", x_rows, "N", _INTS, "an integer tensor (row indices into x_NI)")
    num_experts, out_dim, in_dim = w_EOI.shape
    rows = x_NI.shape[0] if x_rows is None else x_rows.shape[0]
    if x_NI.shape[1] != in_dim or ends_E.shape[0] != num_experts:
        raise ValueError(f"grouped_gemv: x {tuple(x_NI.shape)}, w {tuple(w_EOI.shape)} and ends "
                         f"{tuple(ends_E.shape)} do not fit (N, I), (E, O, I), (E,)")
    if rows > _INT32_MAX:
        raise ValueError(f"grouped_gemv: {rows} rows do not fit the int32 row counts of ends_E (at most 2**31 - 1)")
    if num_experts == 0 and rows > 0:
        raise ValueError(f"grouped_gemv: w_EOI has no expert (E = 0) for the {rows} rows; give at least one")
    lib = library()
    if lib is None:
        return None
    x_NI = _ready(x_NI, torch.float32)
    w_EOI = _ready(w_EOI, w_EOI.dtype)
    if ends_E.dtype != torch.int32:
        # a wider integer would wrap in the cast, so a wrong count could pass as a right one
        if ends_E.numel() and (int(ends_E.min()) < 0 or int(ends_E.max()) > rows):
            raise ValueError(f"grouped_gemv: ends must be non-decreasing row counts ending at the {rows} rows "
                             f"of x, got {ends_E.tolist()}")
        ends_E = ends_E.to(torch.int32)
    ends_E = _ready(ends_E, torch.int32)
    if x_rows is not None:
        x_rows = _ready(x_rows, torch.int64)
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
    if status == 4:
        raise ValueError(f"grouped_gemv: the native kernel refused the sizes N={rows}, E={num_experts}, "
                         f"O={out_dim}, I={in_dim}")
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
    assignments as 0-d tensors), all float32. x and weight_TK are cast to float32, expert_TK to
    int64; weights float32 or bfloat16; all on CPU. T = 0 and K = 0 give zeros.
    """
    fn = "decode_ffn"
    if not isinstance(activation, str) or activation not in ACTIVATION_CODES:
        raise ValueError(f"decode_ffn: unknown activation {activation!r}; allowed: {list(ACTIVATION_CODES)}")
    _check(fn, "x_TD", x_TD, "TD", _FLOATS, "a floating-point tensor")
    _check(fn, "expert_TK", expert_TK, "TK", _INTS, "an integer tensor (expert ids)")
    _check(fn, "weight_TK", weight_TK, "TK", _FLOATS, "a floating-point tensor (combine weights)")
    _check(fn, "w_in_EHD", w_in_EHD, "EHD", None)
    _check(fn, "w_out_EDF", w_out_EDF, "EDF", None)
    if w_out_EDF.dtype != w_in_EHD.dtype or w_in_EHD.dtype not in _DECODE_FUNCS:
        raise ValueError(f"decode_ffn: weights must share float32 or bfloat16, got {w_in_EHD.dtype} and "
                         f"{w_out_EDF.dtype}")
    num_experts, hidden, d_model = w_in_EHD.shape
    width = w_out_EDF.shape[2]
    gated = activation in GATED  # H = 2F, gate columns first
    if x_TD.shape[1] != d_model or w_out_EDF.shape[:2] != (num_experts, d_model) or (
            expert_TK.shape != weight_TK.shape or expert_TK.shape[0] != x_TD.shape[0]) or (
            hidden != (2 if gated else 1) * width):
        raise ValueError(f"decode_ffn: x {tuple(x_TD.shape)}, experts {tuple(expert_TK.shape)}, weights "
                         f"{tuple(weight_TK.shape)}, w_in {tuple(w_in_EHD.shape)} and w_out "
                         f"{tuple(w_out_EDF.shape)} do not fit (T, D), (T, K), (T, K), (E, H, D), (E, D, F) "
                         f"with H = {'2F' if gated else 'F'} for {activation!r}")
    if expert_TK.numel() > _INT32_MAX or max(num_experts, d_model, width) > _INT32_MAX:
        raise ValueError(f"decode_ffn: T*K = {expert_TK.numel()}, E, D and F must each fit int32 (at most 2**31 - 1)")
    lib = _loaded(fn)
    x_TD, expert_TK, weight_TK = _ready(x_TD, torch.float32), _ready(expert_TK, torch.int64), _ready(
        weight_TK, torch.float32)
    w_in_EHD, w_out_EDF = _ready(w_in_EHD, w_in_EHD.dtype), _ready(w_out_EDF, w_out_EDF.dtype)
    out_TD = torch.empty(x_TD.shape, dtype=torch.float32)
    counts_E = torch.empty(num_experts, dtype=torch.float32)
    dropped, offered = torch.empty((), dtype=torch.float32), torch.empty((), dtype=torch.float32)
    status = getattr(lib, _DECODE_FUNCS[w_in_EHD.dtype])(
        x_TD.data_ptr(), expert_TK.data_ptr(), weight_TK.data_ptr(), w_in_EHD.data_ptr(), w_out_EDF.data_ptr(),
        x_TD.shape[0], expert_TK.shape[1], num_experts, d_model, hidden, width, ACTIVATION_CODES[activation],
        out_TD.data_ptr(), counts_E.data_ptr(), dropped.data_ptr(), offered.data_ptr(), BLOCK_ROWS,
        torch.get_num_threads(),
    )
    if status == 2:
        raise ValueError(f"decode_ffn: expert ids must lie in [0, {num_experts})")
    if status == 4:
        raise ValueError(f"decode_ffn: the native kernel refused the sizes T={x_TD.shape[0]}, "
                         f"K={expert_TK.shape[1]}, E={num_experts}, D={d_model}, H={hidden}, F={width}")
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
    With no token (T = 0) the outputs are empty and the losses 0 (the MoE layer's value for an
    empty batch; the torch means over no token are nan). x is cast to float32; w is float32.
    """
    fn = "route_softmax_topk"
    _check(fn, "x_TD", x_TD, "TD", _FLOATS, "a floating-point tensor")
    _check(fn, "w_ED", w_ED, "ED", _F32, "float32 (the router's weight)")
    if isinstance(k, bool):
        raise TypeError(f"route_softmax_topk: k must be an int, got {k!r}")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"route_softmax_topk: k must be an int, got {type(k).__name__}") from None
    if not isinstance(norm, bool):
        raise TypeError(f"route_softmax_topk: norm must be True or False, got {norm!r}")
    coefs = {}
    for name, value in (("aux_coef", aux_coef), ("z_coef", z_coef)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"route_softmax_topk: {name} must be a float, got {type(value).__name__}")
        coefs[name] = float(value)
    num_experts, d_model = w_ED.shape
    if x_TD.shape[1] != d_model or not 1 <= k <= num_experts:
        raise ValueError(f"route_softmax_topk: x {tuple(x_TD.shape)} and float32 w {tuple(w_ED.shape)} "
                         f"({w_ED.dtype}) do not fit (T, D), (E, D), or k={k} is outside [1, {num_experts}]")
    if max(x_TD.shape[0], d_model, num_experts) > _INT32_MAX:
        raise ValueError(f"route_softmax_topk: T, D and E must each fit int32 (at most 2**31 - 1), got x "
                         f"{tuple(x_TD.shape)} and w {tuple(w_ED.shape)}")
    lib = _loaded(fn)
    x_TD, w_ED = _ready(x_TD, torch.float32), _ready(w_ED, torch.float32)
    num_tokens = x_TD.shape[0]
    f32 = torch.float32
    logits_TE = torch.empty(num_tokens, num_experts, dtype=f32)
    probs_TE = torch.empty(num_tokens, num_experts, dtype=f32)
    idx_TK, weight_TK = torch.empty(num_tokens, k, dtype=torch.int64), torch.empty(num_tokens, k, dtype=f32)
    priority_T = torch.empty(num_tokens, dtype=f32)
    lb, z, aux = torch.empty((), dtype=f32), torch.empty((), dtype=f32), torch.empty((), dtype=f32)
    status = lib.moekit_route_softmax_topk(
        x_TD.data_ptr(), w_ED.data_ptr(), num_tokens, d_model, num_experts, k, int(norm), coefs["aux_coef"],
        coefs["z_coef"], logits_TE.data_ptr(), probs_TE.data_ptr(), idx_TK.data_ptr(), weight_TK.data_ptr(),
        priority_T.data_ptr(), lb.data_ptr(), z.data_ptr(), aux.data_ptr(), torch.get_num_threads(),
    )
    if status == 2:
        raise ValueError(f"route_softmax_topk: k={k} is outside [1, {num_experts}]")
    if status != 0:
        raise ValueError(f"route_softmax_topk: the native kernel refused the sizes T={num_tokens}, D={d_model}, "
                         f"E={num_experts}")
    return logits_TE, probs_TE, idx_TK, weight_TK, priority_T, lb, z, aux


def reference_grouped_gemv(x_NI: Tensor, w_EOI: Tensor, ends_E: Tensor, x_rows: Tensor | None = None) -> Tensor:
    """The slow reference: one float32 matrix product per expert."""
    if x_rows is not None:
        x_NI = x_NI[x_rows]
    starts = [0, *ends_E.tolist()[:-1]]
    parts = [x_NI[s:e].float() @ w_EOI[i].float().t() for i, (s, e) in enumerate(zip(starts, ends_E.tolist()))]
    return torch.cat(parts) if parts else x_NI.new_zeros(0, w_EOI.shape[1], dtype=torch.float32)
