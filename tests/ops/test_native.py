"""The native grouped matrix-vector kernel (ops/native.py) against its reference, its input
checks, its build cache and its fallback when it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.ops import native
from moekit.ops.native import grouped_gemv, reference_grouped_gemv

ROOT = Path(__file__).resolve().parents[2]


def _ends(counts):
    return torch.tensor(counts, dtype=torch.long).cumsum(0)


def _run_isolated(code: str, env: dict | None = None) -> str:
    """Runs code in a fresh Python: a crash (a segfault in C) fails the test instead of killing
    pytest. Returns its stdout."""
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, f"exit {proc.returncode} (a negative code is a signal):\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.parametrize("counts,i,o", [
    ([1, 0, 2, 3], 16, 24),  # an empty expert in the middle
    ([0, 0, 5], 7, 3),  # leading empty experts, odd widths (no vector alignment)
    ([4, 0, 0], 33, 17),  # trailing empty experts, widths across a block boundary
    ([1], 1024, 40),  # E = 1, one row
    ([9, 32, 1, 0, 2], 64, 48),  # many rows per expert
    ([3, 1, 2, 1], 20, 18),  # 1-3 rows: four weight rows per pass, then a two-row tail per item
    ([0, 0, 0], 8, 4),  # no rows (T = 0)
    ([0], 8, 4),  # no rows, E = 1
    ([], 8, 4),  # no rows, no expert (E = 0)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemv_matches_reference(native_kernel, counts, i, o, dtype):
    torch.manual_seed(0)
    x = torch.randn(sum(counts), i)
    w = torch.randn(len(counts), o, i).to(dtype)
    got = grouped_gemv(x, w, _ends(counts))
    want = reference_grouped_gemv(x, w, _ends(counts))
    assert got.dtype == torch.float32 and got.shape == (sum(counts), o)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * i**0.5)


def test_grouped_gemv_takes_views_and_other_row_dtypes(native_kernel):
    """Strided x and w views and a bfloat16 x are made contiguous float32 first."""
    torch.manual_seed(0)
    counts = [2, 0, 3]
    x = torch.randn(16, 10)[::2, 1:9].to(torch.bfloat16)[:5]  # (5, 8), strided, bf16
    w = torch.randn(3, 8, 12).transpose(1, 2)  # (3, 12, 8), not contiguous
    got = grouped_gemv(x, w, _ends(counts))
    torch.testing.assert_close(got, reference_grouped_gemv(x.float(), w, _ends(counts)), rtol=1e-5, atol=1e-5)


def test_grouped_gemv_no_rows(native_kernel):
    assert grouped_gemv(torch.randn(0, 8), torch.randn(2, 4, 8), torch.zeros(2, dtype=torch.long)).shape == (0, 4)


def test_grouped_gemv_rejects_bad_inputs(native_kernel):
    w = torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        grouped_gemv(torch.randn(3, 8), w.double(), _ends([1, 2]))
    with pytest.raises(ValueError, match=r"\(N, I\), \(E, O, I\), \(E,\)"):
        grouped_gemv(torch.randn(3, 5), w, _ends([1, 2]))
    with pytest.raises(ValueError, match=r"\(N, I\), \(E, O, I\), \(E,\)"):
        grouped_gemv(torch.randn(3, 8), w, _ends([1, 1, 1]))
    with pytest.raises(ValueError, match="ending at the 3 rows of x, got \\[1, 4\\]"):
        grouped_gemv(torch.randn(3, 8), w, _ends([1, 3]))
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_gemv(torch.randn(3, 8), w, torch.tensor([3, 1]))  # would read rows 3.. backwards
    with pytest.raises(ValueError, match="non-decreasing"):
        grouped_gemv(torch.randn(3, 8), torch.randn(3, 4, 8), torch.tensor([5, 2, 3]))  # past the end


def test_library_is_cached_by_source_compiler_and_cpu(native_kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    first = native._build()
    assert first.parent == tmp_path and first.exists()
    mtime = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


# a fresh process loads the kernel from MOEKIT_CACHE_DIR and checks it against the reference
_LOAD_AND_RUN = (
    "import torch\n"
    "from moekit.ops import native\n"
    "assert native.library() is not None, native._STATE['why']\n"
    "x, w, ends = torch.randn(5, 16), torch.randn(3, 8, 16), torch.tensor([2, 2, 5])\n"
    "torch.testing.assert_close(native.grouped_gemv(x, w, ends), native.reference_grouped_gemv(x, w, ends))\n"
    "print('kernel ok')\n"
)


def _corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":  # a copy or a disk cut short: dlopen of it dies with SIGBUS
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(os.urandom(len(data)))
    elif how == "flipped byte":  # still a loadable ELF: only the checksum tells
        i = len(data) // 3
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:])
    elif how == "no trailer":  # what moekit wrote before the trailer existed
        path.write_bytes(data[: -native._TRAILER_BYTES])
    elif how == "another build":  # another source's intact library under this name
        trailer = data[-native._TRAILER_BYTES:]
        other = trailer[: len(native._MARKER)] + b"0" * 64 + trailer[-32:]
        path.write_bytes(data[: -native._TRAILER_BYTES] + other)


DAMAGES = ["truncated", "garbage", "flipped byte", "no trailer", "another build"]


def test_damaged_cached_library_is_rebuilt(native_kernel, tmp_path, monkeypatch):
    """A cached library that does not verify (each of DAMAGES, in its own cache folder) is
    rebuilt once, before anything is loaded from it, and the kernel works. One fresh process
    loads them all in turn, so loading a damaged file (SIGBUS for a truncated one) fails this
    test instead of killing pytest."""
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "good"))
    good = native._build()
    _, key, _ = native._target()
    caches = {how: tmp_path / how.replace(" ", "-") for how in DAMAGES}
    inodes = {}
    for how, cache in caches.items():
        cache.mkdir()
        lib = cache / good.name
        lib.write_bytes(good.read_bytes())
        _corrupt(lib, how)
        assert native._verify(lib, key) is not None, how
        inodes[how] = lib.stat().st_ino
    code = "import os\nimport torch\nfrom moekit.ops import native\n" + "".join(
        f"os.environ['MOEKIT_CACHE_DIR'] = {str(cache)!r}\n"
        "native._STATE.update(lib=None, failed=False, why=None)\n"
        + _LOAD_AND_RUN.split("\n", 2)[2].replace("'kernel ok'", f"'kernel ok after {how}'")
        for how, cache in caches.items())
    env = {**os.environ, "MOEKIT_NATIVE": "require"}
    out = _run_isolated(code, env)
    for how, cache in caches.items():
        lib = cache / good.name
        assert f"kernel ok after {how}" in out, out
        assert lib.stat().st_ino != inodes[how] and native._verify(lib, key) is None, how  # a good build
        assert [p.name for p in cache.iterdir()] == [good.name], how


def test_killed_build_leaves_no_temporary_behind(native_kernel, tmp_path, monkeypatch):
    """A build killed between compiling and renaming leaves its temporary file; the next load on
    this host removes it once its process is gone and it is older than a build can take, and
    keeps a live process's (a build in progress), a recent one (a live build whose pid another
    pid namespace hides) and other hosts' (their pids mean nothing here)."""
    import signal
    import time

    cache = tmp_path / "cache"
    fake_cc = tmp_path / "slow-cc"  # writes its output, then compiles for two minutes
    fake_cc.write_text('#!/bin/sh\nif [ "$1" = --version ]; then echo slow-cc 1; exit 0; fi\n'
                       'while [ $# -gt 0 ]; do [ "$1" = -o ] && out="$2"; shift; done\n: > "$out"\nexec sleep 120\n')
    fake_cc.chmod(0o755)
    env = {**os.environ, "CC": str(fake_cc), "MOEKIT_CACHE_DIR": str(cache)}
    env.pop("MOEKIT_NATIVE", None)
    child = subprocess.Popen([sys.executable, "-c", "from moekit.ops import native; native._build()"], env=env,
                             cwd=ROOT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list(cache.glob("*.tmp")) and time.monotonic() < deadline and child.poll() is None:
            time.sleep(0.1)
        killed = list(cache.glob("*.tmp"))
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the build and its compiler, as a kill -9 of a job would
        child.wait()
    assert len(killed) == 1 and native._TEMPORARY.match(killed[0].name), killed
    # a build in progress in this process (alive), and a dead pid's temporary of another host
    live = cache / f"grouped_gemv-{'0' * 16}.so.{native._host_tag()}.{os.getpid()}.abcd.tmp"
    other_host = cache / f"grouped_gemv-{'0' * 16}.so.{'f' * 8 if native._host_tag() != 'f' * 8 else 'e' * 8}." \
                         f"{child.pid}.abcd.tmp"
    unrelated = cache / "notes.tmp"
    recent = cache / f"grouped_gemv-{'0' * 16}.so.{native._host_tag()}.{child.pid}.abcd.tmp"
    old = time.time() - 2 * native.BUILD_TIMEOUT_S - 60
    for path in (killed[0], live, other_host, unrelated, recent):
        path.write_bytes(b"")
        if path != recent:
            os.utime(path, (old, old))
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(cache))
    built = native._build()
    kept = [built.name, live.name, other_host.name, unrelated.name, recent.name]
    assert sorted(p.name for p in cache.iterdir()) == sorted(kept)


def test_concurrent_builds_both_get_a_working_library(native_kernel, tmp_path, monkeypatch):
    """Two processes (torchrun ranks) build the same library into one empty cache at once. The
    compiler wrapper makes the overlap certain: the second build starts once the first's
    temporary exists, and the first waits, compiled but not renamed, until the second has
    compiled. The second must neither remove nor overwrite the first's live temporary; both load
    a working kernel, one library remains and no temporary."""
    cache = tmp_path / "cache"
    slow_cc = tmp_path / "slow-cc"
    cc = os.environ.get("CC") or "cc"
    compiles, second_done = tmp_path / "compiles", tmp_path / "second-compiled"
    slow_cc.write_text(
        f'#!/bin/sh\n[ "$1" = --version ] && exec {cc} "$@"\n'
        f'echo $$ >> {compiles}\n{cc} "$@" || exit $?\n'
        f'if [ "$(head -n 1 {compiles})" = $$ ]; then\n'  # the first build: wait for the second (2 min at most)
        f'  i=0; while [ ! -e {second_done} ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i + 1)); done\n'
        f'else touch {second_done}; fi\n')
    slow_cc.chmod(0o755)
    env = {**os.environ, "CC": str(slow_cc), "MOEKIT_CACHE_DIR": str(cache), "MOEKIT_NATIVE": "require"}
    wait_for_first = (  # the second process starts its build once the first's temporary exists
        "import glob, time\n"
        "from moekit.ops import native\n"
        f"while not glob.glob({str(cache / '*.tmp')!r}): time.sleep(0.01)\n"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for code in (_LOAD_AND_RUN, wait_for_first + _LOAD_AND_RUN)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "kernel ok" in out, err[-2000:]
    assert len(compiles.read_text().split()) == 2 and second_done.exists()  # the builds overlapped
    libs = list(cache.iterdir())
    assert len(libs) == 1 and libs[0].suffix == ".so", libs
    monkeypatch.setenv("CC", str(slow_cc))  # the compiler command is part of the key
    assert native._verify(libs[0], native._target()[1]) is None


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    """In a fresh process with a compiler that does not exist: one warning, correct results from
    the torch forms, and the kernel is not retried."""
    code = (
        "import warnings, torch\n"
        "from moekit.ops import native\n"
        "from moekit.ops.decode import routed_ffn_decode\n"
        "from moekit.ops.reference import routed_rows\n"
        "x, w_in, w_out = torch.randn(2, 16), torch.randn(3, 16, 16), torch.randn(3, 16, 8)\n"
        "token, gate = torch.tensor([0, 1, 1]), torch.rand(3)\n"
        "expert, offs = torch.tensor([0, 0, 2]), torch.tensor([2, 2, 3], dtype=torch.int32)\n"
        "with warnings.catch_warnings(record=True) as caught, torch.no_grad():\n"
        "    warnings.simplefilter('always')\n"
        "    got = [routed_ffn_decode(x, token, gate, offs, w_in, w_out, 'swiglu') for _ in range(3)]\n"
        "want = routed_rows(x, token, gate, expert, w_in, w_out, 'swiglu')\n"
        "assert all(torch.allclose(g, want, atol=1e-5) for g in got)\n"
        "msgs = [str(w.message) for w in caught]\n"
        "assert len(msgs) == 1 and 'native decode kernel is unavailable' in msgs[0], msgs\n"
        "assert native.library() is None and native._STATE['failed']\n"
        "print('fell back:', msgs[0][:80])\n"
    )
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "MOEKIT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("MOEKIT_NATIVE", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fell back" in proc.stdout


def test_require_makes_a_failed_build_an_error(tmp_path):
    """MOEKIT_NATIVE=require (CI): with a compiler that does not exist, loading the kernel raises
    an error naming the compiler, at every call, with no warning and no torch fallback, and so
    does a decode step that would have fallen back."""
    code = (
        "import warnings, torch\n"
        "warnings.simplefilter('error')\n"  # a warning would raise too: there must be none
        "from moekit import MoE, MoEConfig\n"
        "from moekit.ops import native\n"
        "for _ in range(2):\n"
        "    try:\n"
        "        native.library()\n"
        "    except RuntimeError as err:\n"
        "        print('refused:', err)\n"
        "moe = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2)).eval()\n"
        "try:\n"
        "    with torch.no_grad():\n"
        "        moe(torch.randn(2, 16))\n"
        "except RuntimeError as err:\n"
        "    print('forward refused:', err)\n"
    )
    env = {**os.environ, "CC": "/nonexistent", "MOEKIT_CACHE_DIR": str(tmp_path), "MOEKIT_NATIVE": "require"}
    lines = _run_isolated(code, env).splitlines()
    assert len(lines) == 3 and lines[0].startswith("refused:") and lines[1] == lines[0], lines
    assert "no C compiler '/nonexistent' ($CC)" in lines[0] and "MOEKIT_NATIVE=require" in lines[0], lines
    assert lines[2].startswith("forward refused:") and "/nonexistent" in lines[2], lines


@pytest.mark.parametrize("mode,outcome", [("require", "1 error"), ("1", "1 skipped")])
def test_native_tests_fail_instead_of_skipping_under_require(tmp_path, mode, outcome):
    """The `native_kernel` fixture (tests/conftest.py) that guards every test of the kernel: without
    a compiler it skips by default, and under MOEKIT_NATIVE=require (.ci/run) the test errors, so
    CI cannot pass with the kernel's tests skipped."""
    env = {**os.environ, "CC": "/nonexistent", "MOEKIT_CACHE_DIR": str(tmp_path), "MOEKIT_NATIVE": mode}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/ops/test_native.py::test_grouped_gemv_no_rows"],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert outcome in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
    assert (proc.returncode == 0) == (mode != "require")


def test_native_switch_refuses_unknown_values(monkeypatch):
    monkeypatch.setenv("MOEKIT_NATIVE", "yes")
    monkeypatch.setitem(native._STATE, "lib", None)
    monkeypatch.setitem(native._STATE, "failed", False)
    with pytest.raises(ValueError, match=r"MOEKIT_NATIVE must be 0 .*, 1 .* or require .*, got 'yes'"):
        native.library()
    for value, mode in (("0", "off"), ("1", "on"), ("", "on"), ("require", "require"), (" Require ", "require")):
        monkeypatch.setenv("MOEKIT_NATIVE", value)
        assert native.native_mode() == mode
    monkeypatch.setenv("MOEKIT_NATIVE", " 0")
    assert native.library() is None and native._STATE["why"] is None  # off, not a failure


def test_env_switch_turns_the_kernel_off():
    code = "from moekit.ops import native; assert native.library() is None and native._STATE['why'] is None"
    env = {**os.environ, "MOEKIT_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_kernel_shares_torchs_openmp_runtime(native_kernel):
    """In a fresh process that loads the kernel, one libgomp is mapped, torch's: the kernel runs on
    torch's OpenMP threads rather than a second pool (other packages may bundle their own)."""
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("no /proc/self/maps")
    code = (
        "import torch\n"
        "from moekit.ops import native\n"
        "assert native.library() is not None\n"
        "native.grouped_gemv(torch.randn(2, 8), torch.randn(1, 4, 8), torch.tensor([2]))\n"
        "print(sorted({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    gomps = eval(proc.stdout.strip().splitlines()[-1])  # noqa: S307 - our own printed list
    assert len(gomps) == 1, gomps  # with the torch wheel: torch/lib/libgomp.so.1


def test_grouped_gemv_gathers_rows_by_index(native_kernel):
    torch.manual_seed(0)
    x, w = torch.randn(5, 16), torch.randn(3, 8, 16)
    rows, ends = torch.tensor([4, 0, 0, 2, 3, 1]), _ends([2, 0, 4])
    torch.testing.assert_close(grouped_gemv(x, w, ends, x_rows=rows), reference_grouped_gemv(x, w, ends, rows))
    with pytest.raises(ValueError, match="x_rows must index the 5 rows of x"):
        grouped_gemv(x, w, ends, x_rows=torch.tensor([0, 1, 5, 0, 0, 0]))
    with pytest.raises(ValueError, match="x_rows must index the 5 rows of x"):
        grouped_gemv(x, w, ends, x_rows=torch.tensor([0, -1, 2, 0, 0, 0]))


def _decode_reference(x, expert_TK, weight_TK, w_in, w_out, activation):
    """The slow reference (ops/reference.py): one plain FFN per (token, choice), in float32."""
    from moekit.ops.reference import routed_rows

    t, k = expert_TK.shape
    token_N = torch.arange(t).repeat_interleave(k)  # token-major rows: n = t*K + k
    return routed_rows(x.float(), token_N, weight_TK.reshape(-1), expert_TK.reshape(-1), w_in.float(),
                       w_out.float(), activation)


@pytest.mark.parametrize("activation", list(native.ACTIVATION_CODES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,k,e,d,f", [
    (1, 8, 64, 32, 16),  # one token, 8 of 64 experts
    (5, 2, 4, 24, 8),  # every expert several rows
    (16, 3, 3, 16, 40),  # k = E: all experts
    (4, 2, 6, 200, 24),  # d_model across the combine's 64-column blocks
    (3, 1, 7, 7, 5),  # top-1, odd widths
    (0, 2, 4, 16, 8),  # no token (T = 0)
    (3, 1, 1, 16, 8),  # E = 1
    (2, 0, 3, 16, 8),  # no choice (K = 0): zeros
])
def test_decode_ffn_matches_reference(native_kernel, activation, dtype, t, k, e, d, f):
    torch.manual_seed(t * 100 + k)
    hidden = 2 * f if activation in ("swiglu", "geglu") else f
    x = torch.randn(t, d)
    expert_TK = torch.stack([torch.randperm(e)[:k] for _ in range(t)]) if t else torch.zeros(0, k, dtype=torch.long)
    weight_TK = torch.rand(t, k)
    w_in, w_out = (torch.randn(e, hidden, d) / d**0.5).to(dtype), (torch.randn(e, d, f) / f**0.5).to(dtype)
    out, counts, dropped, offered = native.decode_ffn(x, expert_TK, weight_TK, w_in, w_out, activation)
    want = _decode_reference(x, expert_TK, weight_TK, w_in, w_out, activation)
    # bf16: both sides read the same rounded weights and sum in float32, in other orders, so both
    # dtypes get float32 summation error: at most 1.2e-6 (bf16) and 8.3e-7 (float32) measured
    # over this table, on outputs of order 1
    torch.testing.assert_close(out, want, rtol=5e-6, atol=5e-6)
    assert torch.equal(counts, torch.bincount(expert_TK.reshape(-1), minlength=e).float())
    assert dropped.shape == offered.shape == () and (dropped.item(), offered.item()) == (0.0, t * k)


def test_decode_ffn_rejects_bad_inputs(native_kernel):
    x, w_in, w_out = torch.randn(2, 8), torch.randn(3, 8, 8), torch.randn(3, 8, 4)
    expert, weight = torch.tensor([[0, 1], [2, 0]]), torch.rand(2, 2)
    with pytest.raises(ValueError, match=r"expert ids must lie in \[0, 3\)"):
        native.decode_ffn(x, torch.tensor([[0, 3], [1, 0]]), weight, w_in, w_out, "swiglu")
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        native.decode_ffn(x, expert, weight, w_in, w_out, "tanh")
    with pytest.raises(ValueError, match="do not fit"):
        native.decode_ffn(torch.randn(2, 6), expert, weight, w_in, w_out, "swiglu")
    with pytest.raises(ValueError, match="weights must share"):
        native.decode_ffn(x, expert, weight, w_in, w_out.double(), "swiglu")
    with pytest.raises(ValueError, match="H = 2F for 'swiglu'"):  # a gated activation needs H = 2F
        native.decode_ffn(x, expert, weight, torch.randn(3, 4, 8), w_out, "swiglu")
    with pytest.raises(ValueError, match="H = F for 'relu'"):
        native.decode_ffn(x, expert, weight, w_in, w_out, "relu")


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("t,k,e,d", [
    (1, 8, 64, 1024), (7, 2, 8, 33), (32, 1, 4, 16), (3, 5, 5, 8),
    (0, 2, 4, 16),  # no token (T = 0): empty outputs, losses 0
    (5, 1, 1, 8),  # E = 1
])
def test_route_softmax_topk_matches_torch(native_kernel, norm, t, k, e, d):
    from moekit.layers import losses as L

    torch.manual_seed(t + k + e)
    x, w = torch.randn(t, d), torch.randn(e, d) / d**0.5
    logits, probs, idx, weight, priority, balance, z_loss, aux = native.route_softmax_topk(x, w, k, norm, 0.3, 0.1)
    want_logits = x @ w.t()
    want_probs = want_logits.softmax(-1)
    want_weight, want_idx = want_probs.topk(k, dim=-1)
    if norm:
        want_weight = want_weight / want_weight.sum(-1, keepdim=True)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(probs, want_probs)
    assert idx.dtype == torch.int64 and torch.equal(idx, want_idx)
    torch.testing.assert_close(weight, want_weight)
    assert torch.equal(priority, weight[:, 0])
    if t == 0:  # the MoE layer's losses of an empty batch; torch's means over no token are nan
        assert (balance.item(), z_loss.item(), aux.item()) == (0.0, 0.0, 0.0)
        assert logits.shape == probs.shape == (0, e) and idx.shape == weight.shape == (0, k)
        return
    torch.testing.assert_close(balance, L.load_balancing_loss(want_probs, want_idx))
    torch.testing.assert_close(z_loss, L.router_z_loss(want_logits))
    torch.testing.assert_close(aux, 0.3 * balance + 0.1 * z_loss)
    assert native.route_softmax_topk(x, w, k, norm, 0.3, 0.0)[-1].item() == pytest.approx(0.3 * balance.item())
    with pytest.raises(ValueError, match=rf"k={e + 1} is outside \[1, {e}\]"):
        native.route_softmax_topk(x, w, e + 1, norm)


def test_route_softmax_topk_breaks_ties_to_the_lower_id(native_kernel):
    _, _, idx, weight, *_ = native.route_softmax_topk(torch.zeros(2, 4), torch.randn(6, 4), 3, True)
    assert idx.tolist() == [[0, 1, 2]] * 2
    torch.testing.assert_close(weight, torch.full((2, 3), 1 / 3))


def test_cc_may_carry_flags(native_kernel, tmp_path, monkeypatch):
    """`CC="gcc -O1"`-style values are split like a shell would; the flags go into the cache key."""
    import shutil

    cc = os.environ.get("CC") or "cc"
    if shutil.which(cc.split()[0]) is None:
        pytest.skip(f"{cc} not on PATH")
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", f"{cc} -DMOEKIT_TEST_FLAG=1")
    with_flag = native._build()
    monkeypatch.setenv("CC", cc)
    assert with_flag.exists() and native._build() != with_flag


# ---------------------------------------------------------------- argument checks

def _good_args():
    """One valid call of each public kernel function: (function, keyword arguments)."""
    return {
        "grouped_gemv": dict(x_NI=torch.randn(3, 8), w_EOI=torch.randn(2, 4, 8), ends_E=_ends([1, 2]),
                             x_rows=torch.tensor([2, 0, 1])),
        "decode_ffn": dict(x_TD=torch.randn(2, 8), expert_TK=torch.tensor([[0, 1], [2, 0]]), weight_TK=torch.rand(2, 2),
                           w_in_EHD=torch.randn(3, 8, 8), w_out_EDF=torch.randn(3, 8, 4), activation="swiglu"),
        "route_softmax_topk": dict(x_TD=torch.randn(2, 8), w_ED=torch.randn(4, 8), k=2, norm=True, aux_coef=0.1,
                                   z_coef=0.0),
    }


BAD_ARGUMENTS = [
    # (function, argument, bad value, exception, message that names the argument)
    ("grouped_gemv", "x_NI", [[1.0] * 8] * 3, TypeError, "x_NI must be a torch.Tensor"),
    ("grouped_gemv", "x_NI", torch.ones(3, 8, dtype=torch.long), ValueError, "x_NI must be a floating-point"),
    ("grouped_gemv", "x_NI", torch.randn(3, 8, 1), ValueError, r"x_NI must be 2-D \(N, I\)"),
    ("grouped_gemv", "w_EOI", torch.randn(2, 4, 8).double(), ValueError, "w_EOI must be float32 or bfloat16"),
    ("grouped_gemv", "w_EOI", torch.randn(8, 8), ValueError, r"w_EOI must be 3-D \(E, O, I\)"),
    ("grouped_gemv", "ends_E", torch.tensor([1.0, 3.0]), ValueError, "ends_E must be an integer tensor"),
    ("grouped_gemv", "ends_E", _ends([1, 2]).reshape(2, 1), ValueError, r"ends_E must be 1-D \(E,\)"),
    ("grouped_gemv", "ends_E", torch.tensor([2**32 + 1, 3]), ValueError, "non-decreasing row counts"),  # wraps to 1
    ("grouped_gemv", "ends_E", torch.tensor([-(2**32) + 1, 3]), ValueError, "non-decreasing row counts"),
    ("grouped_gemv", "x_rows", torch.tensor([2.0, 0.0, 1.0]), ValueError, "x_rows must be an integer tensor"),
    ("grouped_gemv", "x_rows", torch.tensor([[2, 0, 1]]), ValueError, r"x_rows must be 1-D \(N,\)"),
    ("decode_ffn", "x_TD", torch.ones(2, 8, dtype=torch.int32), ValueError, "x_TD must be a floating-point"),
    ("decode_ffn", "x_TD", torch.randn(8), ValueError, r"x_TD must be 2-D \(T, D\)"),
    ("decode_ffn", "expert_TK", torch.tensor([[0.0, 1.0], [2.0, 0.0]]), ValueError, "expert_TK must be an integer"),
    ("decode_ffn", "expert_TK", torch.tensor([0, 1, 2, 0]), ValueError, r"expert_TK must be 2-D \(T, K\)"),
    ("decode_ffn", "expert_TK", torch.tensor([[0, 1]]), ValueError, "do not fit"),
    ("decode_ffn", "weight_TK", torch.ones(2, 2, dtype=torch.long), ValueError, "weight_TK must be a floating-point"),
    ("decode_ffn", "weight_TK", torch.rand(2, 3), ValueError, "do not fit"),
    ("decode_ffn", "w_in_EHD", "weights", TypeError, "w_in_EHD must be a torch.Tensor"),
    ("decode_ffn", "w_in_EHD", torch.randn(3, 8), ValueError, r"w_in_EHD must be 3-D \(E, H, D\)"),
    ("decode_ffn", "w_out_EDF", torch.randn(3, 8, 4).half(), ValueError, "weights must share float32 or bfloat16"),
    ("decode_ffn", "w_out_EDF", torch.randn(4, 8, 4), ValueError, "do not fit"),
    ("decode_ffn", "w_in_EHD", torch.randn(0, 8, 8), ValueError, "do not fit"),
    ("decode_ffn", "activation", ["swiglu"], ValueError, "unknown activation"),
    ("route_softmax_topk", "x_TD", torch.ones(2, 8, dtype=torch.long), ValueError, "x_TD must be a floating-point"),
    ("route_softmax_topk", "x_TD", torch.randn(2, 4), ValueError, "do not fit"),
    ("route_softmax_topk", "w_ED", torch.randn(4, 8).bfloat16(), ValueError, "w_ED must be float32"),
    ("route_softmax_topk", "w_ED", torch.randn(4, 8, 1), ValueError, r"w_ED must be 2-D \(E, D\)"),
    ("route_softmax_topk", "k", 0, ValueError, r"k=0 is outside \[1, 4\]"),
    ("route_softmax_topk", "k", 5, ValueError, r"k=5 is outside \[1, 4\]"),
    ("route_softmax_topk", "k", 2.0, TypeError, "k must be an int"),
    ("route_softmax_topk", "k", True, TypeError, "k must be an int"),
    ("route_softmax_topk", "norm", 1, TypeError, "norm must be True or False"),
    ("route_softmax_topk", "aux_coef", "0.1", TypeError, "aux_coef must be a float"),
    ("route_softmax_topk", "z_coef", None, TypeError, "z_coef must be a float"),
    ("route_softmax_topk", "w_ED", torch.randn(0, 8), ValueError, r"k=2 is outside \[1, 0\]"),
]


@pytest.mark.parametrize("fn,arg,value,error,message", BAD_ARGUMENTS,
                         ids=[f"{fn}-{arg}-{i}" for i, (fn, arg, *_) in enumerate(BAD_ARGUMENTS)])
def test_kernels_check_every_argument(native_kernel, fn, arg, value, error, message):
    args = _good_args()[fn]
    getattr(native, fn)(**args)  # the valid call runs
    with pytest.raises(error, match=message):
        getattr(native, fn)(**{**args, arg: value})


def test_kernels_take_views_and_other_dtypes_like_contiguous_inputs(native_kernel):
    """Strided views and the other accepted dtypes (float64 rows, int32/int16 ids) give exactly
    what contiguous float32 / int64 inputs give: they are made contiguous and cast inside."""
    def view(t):  # the same values, not contiguous
        return t.transpose(0, -1).contiguous().transpose(0, -1)

    for fn, args in _good_args().items():
        want = getattr(native, fn)(**args)
        other = {name: view(a) if isinstance(a, torch.Tensor) and a.dim() > 1 else a for name, a in args.items()}
        assert any(isinstance(a, torch.Tensor) and not a.is_contiguous() for a in other.values())
        for name in ("x_NI", "x_TD"):
            if name in other:
                other[name] = other[name].double()
        for name in ("ends_E", "x_rows", "expert_TK"):
            if name in other:
                other[name] = other[name].to(torch.int16 if name == "ends_E" else torch.int32)
        got = getattr(native, fn)(**other)
        for a, b in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_grouped_gemv_refuses_rows_without_experts(native_kernel):
    """E = 0 with rows: nothing would write y; it used to come back as uninitialised memory."""
    with pytest.raises(ValueError, match=r"no expert \(E = 0\) for the 3 rows"):
        grouped_gemv(torch.randn(3, 8), torch.randn(0, 4, 8), torch.zeros(0, dtype=torch.long))
    assert grouped_gemv(torch.randn(0, 8), torch.randn(0, 4, 8), torch.zeros(0, dtype=torch.long)).shape == (0, 4)


def test_kernels_refuse_tensors_outside_cpu_memory():
    """Every tensor argument of every kernel function, on the meta device, as a fake CUDA tensor,
    as a fake CPU tensor (cpu device, meta storage) and on CUDA where there is one, is refused
    with a ValueError naming it; their pointers used to reach C (address 0: a segfault). In a
    fresh process, so a crash fails this test rather than killing pytest."""
    code = '''
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from moekit.ops import native
from tests.ops.test_native import _good_args

fake = FakeTensorMode(allow_non_fake_inputs=True)
def fake_on(device):
    def move(t):
        with fake:
            return torch.empty(t.shape, dtype=t.dtype, device=device)
    return move
moves = {"meta": lambda t: t.to("meta"), "fake cuda": fake_on("cuda"), "fake cpu": fake_on("cpu")}
if torch.cuda.is_available():
    moves["cuda"] = lambda t: t.cuda()
refused = 0
for fn, args in _good_args().items():
    for name, value in args.items():
        if not isinstance(value, torch.Tensor):
            continue
        for where, move in moves.items():
            try:
                getattr(native, fn)(**{**args, name: move(value)})
            except ValueError as err:
                assert name in str(err) and "CPU memory" in str(err), (fn, name, where, str(err))
                refused += 1
            else:
                raise AssertionError(f"{fn} took {name} as a {where} tensor")
print("refused", refused)
'''
    out = _run_isolated(code)  # run from the repository root: `tests.ops.test_native` imports
    tensors = sum(isinstance(a, torch.Tensor) for args in _good_args().values() for a in args.values())
    assert f"refused {tensors * (4 if torch.cuda.is_available() else 3)}" in out, out


def test_c_functions_answer_bad_sizes_with_a_status(native_kernel):
    """Defense in depth: the C functions themselves, called with what the Python checks refuse,
    answer with a status instead of reading past a buffer or dividing by zero. In a fresh
    process, so a crash fails this test rather than killing pytest."""
    code = '''
import ctypes
import torch
from moekit.ops import native

lib = native.library()
gemv, ffn, route = lib.moekit_grouped_gemv_f32, lib.moekit_decode_ffn_f32, lib.moekit_route_softmax_topk
p = lambda t: t.data_ptr()
x, w, y = torch.randn(3, 8), torch.randn(2, 4, 8), torch.full((3, 4), 7.0)
ends = torch.tensor([1, 3], dtype=torch.int32)
# grouped_gemv: x, xrow, w, y, ends, N, XN, E, O, I, block, nthreads
print("gemv ok", gemv(p(x), None, p(w), p(y), p(ends), 3, 3, 2, 4, 8, 16, 1))
print("gemv rows without experts", gemv(p(x), None, p(w), p(y), None, 3, 3, 0, 4, 8, 16, 1))
print("gemv negative rows", gemv(p(x), None, p(w), p(y), p(ends), -1, 3, 2, 4, 8, 16, 1))
print("gemv rows past int32", gemv(p(x), None, p(w), p(y), p(ends), 2**31, 3, 2, 4, 8, 16, 1))
print("gemv block 0", gemv(p(x), None, p(w), p(y), p(ends), 3, 3, 2, 4, 8, 0, 1))
print("gemv null y", gemv(p(x), None, p(w), None, p(ends), 3, 3, 2, 4, 8, 16, 1))
print("gemv null ends", gemv(p(x), None, p(w), p(y), None, 3, 3, 2, 4, 8, 16, 1))
print("gemv no rows, null buffers", gemv(None, None, None, None, None, 0, 0, 0, 4, 8, 16, 0))
# decode_ffn: x, expert, weight, w_in, w_out, T, K, E, D, H, F, act, out, counts, dropped, offered, block, nthreads
xt, ex, wt = torch.randn(2, 8), torch.tensor([[0, 1], [1, 0]]), torch.rand(2, 2)
w_in, w_out = torch.randn(2, 8, 8), torch.randn(2, 8, 4)
out, counts, d, o = torch.empty(2, 8), torch.empty(2), torch.empty(()), torch.empty(())
args = lambda **kw: [kw.get(k, v) for k, v in dict(
    x=p(xt), expert=p(ex), weight=p(wt), w_in=p(w_in), w_out=p(w_out), T=2, K=2, E=2, D=8, H=8, F=4, act=0,
    out=p(out), counts=p(counts), dropped=p(d), offered=p(o), block=16, nthreads=1).items()]
print("ffn ok", ffn(*args()))
print("ffn act code 9", ffn(*args(act=9)))
print("ffn gated H != 2F", ffn(*args(H=4)))
print("ffn relu H != F", ffn(*args(act=3)))
print("ffn negative T", ffn(*args(T=-2)))
print("ffn T*K past int32", ffn(*args(T=2**31 - 1, K=2)))
print("ffn temporaries past int64", ffn(*args(T=2**30, K=1, D=2**31 - 1, H=2**31 - 2, F=2**30 - 1)))
print("ffn expert ids without experts", ffn(*args(E=0, counts=None)))
print("ffn null out", ffn(*args(out=None)))
print("ffn null dropped", ffn(*args(dropped=None)))
print("ffn no tokens, null buffers", ffn(*args(x=None, expert=None, weight=None, out=None, T=0)))
# route_softmax_topk: x, w, T, D, E, K, norm, aux, z, logits, probs, idx, weight, priority, lb, z, aux, nthreads
lg, pr, ix = torch.empty(2, 4), torch.empty(2, 4), torch.empty(2, 2, dtype=torch.long)
wk, pt = torch.empty(2, 2), torch.empty(2)
losses = [torch.full((), 5.0) for _ in range(3)]
rargs = lambda **kw: [kw.get(k, v) for k, v in dict(
    x=p(xt), w=p(torch.randn(4, 8)), T=2, D=8, E=4, K=2, norm=1, aux=1.0, z=0.1, logits=p(lg), probs=p(pr),
    idx=p(ix), weight=p(wk), priority=p(pt), lb=p(losses[0]), zl=p(losses[1]), al=p(losses[2]), nthreads=1).items()]
print("route ok", route(*rargs()))
print("route k 0", route(*rargs(K=0)))
print("route negative T", route(*rargs(T=-1)))
print("route null logits", route(*rargs(logits=None)))
print("route null loss", route(*rargs(lb=None)))
print("route no tokens", route(*rargs(T=0, x=None, logits=None, probs=None, idx=None, weight=None, priority=None)),
      [t.item() for t in losses])
'''
    lines = _run_isolated(code).splitlines()
    got = dict(line.rsplit(" ", 1) for line in lines[:-1])
    assert got == {
        "gemv ok": "0", "gemv rows without experts": "2", "gemv negative rows": "4", "gemv rows past int32": "4",
        "gemv block 0": "4", "gemv null y": "4", "gemv null ends": "4", "gemv no rows, null buffers": "0",
        "ffn ok": "0", "ffn act code 9": "4", "ffn gated H != 2F": "4", "ffn relu H != F": "4",
        "ffn negative T": "4", "ffn T*K past int32": "4", "ffn temporaries past int64": "1",
        "ffn expert ids without experts": "2", "ffn null out": "4", "ffn null dropped": "4",
        "ffn no tokens, null buffers": "0",
        "route ok": "0", "route k 0": "2", "route negative T": "4", "route null logits": "4", "route null loss": "4",
    }, got
    assert lines[-1] == "route no tokens 0 [0.0, 0.0, 0.0]"  # not 0/0 = nan
