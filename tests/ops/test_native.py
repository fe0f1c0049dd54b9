"""The native grouped matrix-vector kernel (ops/native.py) against its reference, its input
checks, its build cache and its fallback when it cannot be built."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from moekit.ops import native
from moekit.ops.native import grouped_gemv, reference_grouped_gemv


@pytest.fixture
def kernel():
    if native.library() is None:
        pytest.skip(f"no native kernel here: {native._STATE['why']}")


def _ends(counts):
    return torch.tensor(counts).cumsum(0)


@pytest.mark.parametrize("counts,i,o", [
    ([1, 0, 2, 3], 16, 24),  # an empty expert in the middle
    ([0, 0, 5], 7, 3),  # leading empty experts, odd widths (no vector alignment)
    ([4, 0, 0], 33, 17),  # trailing empty experts, widths across a block boundary
    ([1], 1024, 40),  # E = 1, one row
    ([9, 32, 1, 0, 2], 64, 48),  # many rows per expert
    ([3, 1, 2, 1], 20, 18),  # 1-3 rows: four weight rows per pass, then a two-row tail per item
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemv_matches_reference(kernel, counts, i, o, dtype):
    torch.manual_seed(0)
    x = torch.randn(sum(counts), i)
    w = torch.randn(len(counts), o, i).to(dtype)
    got = grouped_gemv(x, w, _ends(counts))
    want = reference_grouped_gemv(x, w, _ends(counts))
    assert got.dtype == torch.float32 and got.shape == (sum(counts), o)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * i**0.5)


def test_grouped_gemv_takes_views_and_other_row_dtypes(kernel):
    """Strided x and w views and a bfloat16 x are made contiguous float32 first."""
    torch.manual_seed(0)
    counts = [2, 0, 3]
    x = torch.randn(16, 10)[::2, 1:9].to(torch.bfloat16)[:5]  # (5, 8), strided, bf16
    w = torch.randn(3, 8, 12).transpose(1, 2)  # (3, 12, 8), not contiguous
    got = grouped_gemv(x, w, _ends(counts))
    torch.testing.assert_close(got, reference_grouped_gemv(x.float(), w, _ends(counts)), rtol=1e-5, atol=1e-5)


def test_grouped_gemv_no_rows(kernel):
    assert grouped_gemv(torch.randn(0, 8), torch.randn(2, 4, 8), torch.zeros(2, dtype=torch.long)).shape == (0, 4)


def test_grouped_gemv_rejects_bad_inputs(kernel):
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


def test_library_is_cached_by_source_compiler_and_cpu(kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path))
    first = native._build()
    assert first.parent == tmp_path and first.exists()
    mtime = first.stat().st_mtime_ns
    assert native._build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary file left behind


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
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fell back" in proc.stdout


def test_env_switch_turns_the_kernel_off():
    code = "from moekit.ops import native; assert native.library() is None and native._STATE['why'] is None"
    env = {**os.environ, "MOEKIT_NATIVE": "0"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_kernel_shares_torchs_openmp_runtime(kernel):
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


def test_grouped_gemv_gathers_rows_by_index(kernel):
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
])
def test_decode_ffn_matches_reference(kernel, activation, dtype, t, k, e, d, f):
    torch.manual_seed(t * 100 + k)
    hidden = 2 * f if activation in ("swiglu", "geglu") else f
    x = torch.randn(t, d)
    expert_TK = torch.stack([torch.randperm(e)[:k] for _ in range(t)])
    weight_TK = torch.rand(t, k)
    w_in, w_out = (torch.randn(e, hidden, d) / d**0.5).to(dtype), (torch.randn(e, d, f) / f**0.5).to(dtype)
    out, counts, dropped, offered = native.decode_ffn(x, expert_TK, weight_TK, w_in, w_out, activation)
    want = _decode_reference(x, expert_TK, weight_TK, w_in, w_out, activation)
    # bf16: both sides read the same rounded weights; the float32 sums run in other orders
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    assert torch.equal(counts, torch.bincount(expert_TK.reshape(-1), minlength=e).float())
    assert dropped.shape == offered.shape == () and (dropped.item(), offered.item()) == (0.0, t * k)


def test_decode_ffn_rejects_bad_inputs(kernel):
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
@pytest.mark.parametrize("t,k,e,d", [(1, 8, 64, 1024), (7, 2, 8, 33), (32, 1, 4, 16), (3, 5, 5, 8)])
def test_route_softmax_topk_matches_torch(kernel, norm, t, k, e, d):
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
    torch.testing.assert_close(balance, L.load_balancing_loss(want_probs, want_idx))
    torch.testing.assert_close(z_loss, L.router_z_loss(want_logits))
    torch.testing.assert_close(aux, 0.3 * balance + 0.1 * z_loss)
    assert native.route_softmax_topk(x, w, k, norm, 0.3, 0.0)[-1].item() == pytest.approx(0.3 * balance.item())
    with pytest.raises(ValueError, match=rf"k={e + 1} is outside \[1, {e}\]"):
        native.route_softmax_topk(x, w, e + 1, norm)


def test_route_softmax_topk_breaks_ties_to_the_lower_id(kernel):
    _, _, idx, weight, *_ = native.route_softmax_topk(torch.zeros(2, 4), torch.randn(6, 4), 3, True)
    assert idx.tolist() == [[0, 1, 2]] * 2
    torch.testing.assert_close(weight, torch.full((2, 3), 1 / 3))


def test_cc_may_carry_flags(kernel, tmp_path, monkeypatch):
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
