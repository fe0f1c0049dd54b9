"""Every fast path against its slow reference (ops/reference.py), over a table of shapes that
includes the degenerate ones: T=1, E=1, top_k=E, experts that get no row, unaligned widths
(the loop fallback), bfloat16, float64 (gradcheck), and the padded (E, C) layout."""

from __future__ import annotations

import pytest
import torch

import moekit.ops.routed as routed_mod
from moekit.ops import reference as R
from moekit.ops.grouped import gmm, gmm_wgrad, grouped_mm, grouped_mm_loop, native_grouped_mm_ok
from moekit.ops.permute import expert_counts, inverse_permutation, sort_by_expert
from moekit.ops.routed import _scatter_rows, routed_ffn

GATED = ("swiglu", "geglu")


def _tol(dtype):
    # Error relative to the reference's largest value, the worst measured over every _close of
    # this file: float32 5.2e-7 (the routed FFN's gate gradient; decode 4.7e-7), bfloat16 7.9e-3
    # (the routed FFN's w_in gradient: bf16 rounding of the rows and hidden activations),
    # float64 0 (the loop fallback sums in the reference's order).
    return {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}[dtype]


def _close(a, b, dtype, what=""):
    scale = b.abs().max().clamp_min(1e-6)
    err = (a.double() - b.double()).abs().max() / scale
    assert err <= _tol(dtype), f"{what}: relative error {err:.3g} > {_tol(dtype)}"


def _offs(counts):
    return torch.tensor(counts).cumsum(0).to(torch.int32)


def _per_group(x, w, counts):
    rows, start = [], 0
    for e, c in enumerate(counts):
        rows.append(x[start : start + c].double() @ w[e].double())
        start += c
    return torch.cat(rows)


# ---------------------------------------------------------------- grouped GEMM

GROUP_CASES = [
    # (counts per group, I, O, dtype)
    ([3, 0, 5], 8, 16, torch.float32),  # an empty group in the middle
    ([0, 0, 4], 8, 8, torch.float32),  # leading empty groups
    ([4, 0, 0], 8, 8, torch.float32),  # trailing empty groups
    ([7], 16, 8, torch.float32),  # E = 1
    ([1, 1], 8, 8, torch.bfloat16),
    ([2, 3, 1], 16, 24, torch.bfloat16),
    ([2, 0, 3], 5, 7, torch.float32),  # unaligned: loop fallback
    ([2, 0, 3], 4, 6, torch.float64),  # float64: loop fallback
]


@pytest.mark.parametrize("counts,i,o,dtype", GROUP_CASES)
def test_gmm_and_wgrad_match_per_group_matmuls(counts, i, o, dtype):
    torch.manual_seed(0)
    n, e = sum(counts), len(counts)
    x, w = torch.randn(n, i, dtype=dtype), torch.randn(e, o, i, dtype=dtype).transpose(1, 2)  # (E, I, O) view
    offs = _offs(counts)
    _close(gmm(x, w, offs), _per_group(x, w, counts), dtype, "gmm")
    g = torch.randn(n, o, dtype=dtype)
    want = torch.stack([
        x[s:t].double().t() @ g[s:t].double() for s, t in zip([0] + offs.tolist()[:-1], offs.tolist())
    ])
    _close(gmm_wgrad(x, g, offs), want, dtype, "wgrad")
    assert gmm_wgrad(x, g, offs)[[c == 0 for c in counts]].abs().sum() == 0  # empty groups: zeros


def test_padded_layout_is_bmm():
    torch.manual_seed(0)
    x, w = torch.randn(3 * 4, 8), torch.randn(3, 8, 5)
    offs = _offs([4, 4, 4])
    _close(gmm(x, w, offs, rows_per_group=4), _per_group(x, w, [4, 4, 4]), torch.float32)
    g = torch.randn(12, 5)
    _close(gmm_wgrad(x, g, offs, rows_per_group=4), gmm_wgrad(x, g, offs), torch.float32)


def test_native_kernel_is_chosen_for_aligned_float32_and_bfloat16():
    for dtype in (torch.float32, torch.bfloat16):
        assert native_grouped_mm_ok(torch.empty(4, 16, dtype=dtype), torch.empty(2, 16, 32, dtype=dtype))
    assert not native_grouped_mm_ok(torch.empty(4, 6), torch.empty(2, 6, 8))  # 24-byte rows
    assert not native_grouped_mm_ok(torch.empty(4, 8, dtype=torch.float64), torch.empty(2, 8, 8, dtype=torch.float64))


def test_grouped_mm_gradcheck_float64():
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 3, 2, dtype=torch.float64, requires_grad=True)
    offs = _offs([2, 0, 4])
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, offs), (x, w))


def test_grouped_mm_accepts_expanded_gradient():
    """out.sum().backward() hands grouped_mm a stride-0 gradient, which the kernel rejects."""
    x = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(2, 16, 8, requires_grad=True)
    grouped_mm(x, w.transpose(1, 2), _offs([2, 4])).sum().backward()
    ref_w = w.detach().clone().requires_grad_()
    _per_group_out = torch.cat([x[:2] @ ref_w[0].t(), x[2:] @ ref_w[1].t()])
    _per_group_out.sum().backward()
    _close(w.grad, ref_w.grad, torch.float32)


def test_loop_fallback_matches_native():
    torch.manual_seed(0)
    x, w = torch.randn(9, 8), torch.randn(3, 8, 4)
    offs = _offs([4, 0, 5])
    torch.testing.assert_close(grouped_mm_loop(x, w, offs), gmm(x, w, offs))


# ---------------------------------------------------------------- permutation helpers


def test_sort_counts_and_inverse():
    expert = torch.tensor([2, 0, 2, 1, 0, 2])
    order, counts, offs = sort_by_expert(expert, 4)
    assert expert[order].tolist() == sorted(expert.tolist())
    assert counts.tolist() == [2, 1, 3, 0] and offs.tolist() == [2, 3, 6, 6]
    inv = inverse_permutation(order)
    assert order[inv].tolist() == list(range(6))
    assert expert_counts(expert, 4, torch.tensor([1.0, 0, 1, 1, 1, 0])).tolist() == [1.0, 1.0, 2.0, 0.0]


def test_inverse_gather_combine_equals_index_add():
    """The deterministic combine used off CPU sums the same rows as index_add_."""
    torch.manual_seed(0)
    t, k, d = 5, 3, 4
    expert = torch.randint(0, 4, (t * k,))
    order, _, _ = sort_by_expert(expert, 4)
    rows = torch.randn(t * k, d)
    token = order // k
    by_index_add = _scatter_rows(rows, token, t, None, torch.float32)
    by_inverse = rows.index_select(0, inverse_permutation(order)).view(t, k, d).sum(1)
    torch.testing.assert_close(by_inverse, by_index_add)


# ---------------------------------------------------------------- routed expert FFN


def _routing_case(t, e, k, seed, empty=()):
    """Random distinct top-k experts per token avoiding `empty`; rows sorted by expert."""
    g = torch.Generator().manual_seed(seed)
    allowed = [i for i in range(e) if i not in empty]
    idx = torch.stack([torch.tensor(allowed)[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(t)])
    expert_N = idx.reshape(-1)
    order, counts, offs = sort_by_expert(expert_N, e)
    return order // k, expert_N[order], offs, order


ROUTED_CASES = [
    # (T, E, K, D, F, activation, dtype, empty experts)
    (7, 4, 2, 16, 8, "swiglu", torch.float32, ()),
    (1, 4, 2, 16, 8, "swiglu", torch.float32, ()),  # T = 1
    (5, 1, 1, 16, 8, "swiglu", torch.float32, ()),  # E = 1
    (6, 4, 4, 16, 8, "swiglu", torch.float32, ()),  # top_k = E
    (9, 6, 2, 16, 8, "swiglu", torch.float32, (0, 3, 5)),  # experts with no rows
    (7, 4, 2, 16, 8, "geglu", torch.float32, ()),
    (7, 4, 2, 16, 8, "gelu", torch.float32, ()),
    (7, 4, 2, 16, 8, "relu", torch.float32, ()),
    (7, 4, 2, 16, 8, "silu", torch.float32, ()),
    (8, 4, 2, 16, 8, "swiglu", torch.bfloat16, (1,)),
    (7, 4, 2, 10, 6, "swiglu", torch.float32, (2,)),  # unaligned widths: loop fallback
    (7, 4, 2, 8, 16, "swiglu", torch.float32, ()),  # d_model < d_ff: the gate scales the output rows
    (7, 4, 2, 8, 16, "gelu", torch.bfloat16, (0,)),
]


def _weights(e, d, f, activation, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    h = 2 * f if activation in GATED else f
    w_in = (torch.randn(e, h, d, generator=g) / d**0.5).to(dtype).requires_grad_()
    w_out = (torch.randn(e, d, f, generator=g) / f**0.5).to(dtype).requires_grad_()
    return w_in, w_out


@pytest.fixture(params=["whole", "chunked"])
def chunking(request, monkeypatch):
    """Run once as one chunk and once cut into chunks of a few rows (CPU's cache-sized chunks)."""
    if request.param == "chunked":
        monkeypatch.setattr(routed_mod, "CHUNK_BYTES", 48 * 4)  # 3 rows of a (rows, 16) fp32 hidden
    return request.param


@pytest.mark.parametrize("ends,num_rows,target,want", [
    ([2, 3, 7, 9], 9, 4, [(0, 3), (3, 7), (7, 9)]),  # whole experts packed while they fit
    ([10, 12], 12, 4, [(0, 4), (4, 8), (8, 12)]),  # a big expert cut, its rest packed with the next
    ([0, 5, 5, 6], 6, 5, [(0, 5), (5, 6)]),  # empty experts cut nothing
    ([3, 4], 6, 4, [(0, 4), (4, 6)]),  # rows past the last offset ride along at the end
    ([2, 4], 4, 8, [(0, 4)]),
    ([10], 6, 4, [(0, 4), (4, 6)]),  # an offset past the rows never makes a range past them
])
def test_chunks_cut_between_experts(ends, num_rows, target, want):
    got = routed_mod._ragged_bounds(ends, num_rows, target)
    assert got == want
    assert all(0 < end - start <= target for start, end in got)


@pytest.mark.parametrize("t,e,k,d,f,activation,dtype,empty", ROUTED_CASES)
def test_routed_ffn_matches_reference_forward_and_backward(t, e, k, d, f, activation, dtype, empty, chunking):
    torch.manual_seed(0)
    token, expert, offs, _ = _routing_case(t, e, k, seed=t + e, empty=empty)
    x = torch.randn(t, d).to(dtype).requires_grad_()
    gate = torch.rand(token.numel(), requires_grad=True)
    w_in, w_out = _weights(e, d, f, activation, dtype)
    out = routed_ffn(x, token, gate, offs, w_in, w_out, activation)
    assert out.dtype == torch.float32 and out.shape == (t, d)
    # The oracle runs in float32 from the same (possibly bf16-rounded) values.
    xs, wi, wo = (v.detach().float().requires_grad_() for v in (x, w_in, w_out))
    gs = gate.detach().clone().requires_grad_()
    ref = R.routed_rows(xs, token, gs, expert, wi, wo, activation)
    _close(out, ref, dtype, "forward")
    grad = torch.randn(t, d)
    got = torch.autograd.grad(out, (x, gate, w_in, w_out), grad)
    want = torch.autograd.grad(ref, (xs, gs, wi, wo), grad)
    for name, a, b in zip(("x", "gate", "w_in", "w_out"), got, want):
        assert a.dtype == {"gate": torch.float32}.get(name, dtype)
        _close(a, b, dtype, f"grad {name}")
    for e_ in empty:  # an expert with no row gets an exactly zero gradient
        assert got[2][e_].abs().sum() == 0 and got[3][e_].abs().sum() == 0


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu"])
def test_routed_ffn_gradcheck_float64(activation, chunking):
    torch.manual_seed(0)
    t, e, k, d, f = 3, 3, 2, 4, 2
    token, expert, offs, _ = _routing_case(t, e, k, seed=3)
    x = torch.randn(t, d, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(token.numel(), dtype=torch.float64, requires_grad=True)
    w_in, w_out = (w.detach().double().requires_grad_() for w in _weights(e, d, f, activation, torch.float32))
    if activation == "relu":  # keep pre-activations away from the kink for finite differences
        with torch.no_grad():
            w_in.add_(torch.sign(w_in) * 0.1)
    fn = lambda a, b, c, w: routed_ffn(a, token, b, offs, c, w, activation)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, gate, w_in, w_out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_routed_ffn_padded_layout(dtype, chunking):
    """Capacity / expert-choice layout: exactly C rows per expert, empty slots with gate 0."""
    torch.manual_seed(0)
    t, e, c, d, f = 6, 3, 4, 16, 8
    token = torch.randint(0, t, (e * c,))
    gate = torch.rand(e * c)
    gate[[1, 7]] = 0.0  # empty slots
    gate.requires_grad_()
    expert = torch.arange(e).repeat_interleave(c)
    offs = _offs([c] * e)
    x = torch.randn(t, d).to(dtype).requires_grad_()
    w_in, w_out = _weights(e, d, f, "swiglu", dtype)
    padded = routed_ffn(x, token, gate, offs, w_in, w_out, "swiglu", rows_per_expert=c)
    ragged = routed_ffn(x, token, gate, offs, w_in, w_out, "swiglu")
    ref = R.routed_rows(x.detach().float(), token, gate.detach(), expert, w_in.detach().float(),
                        w_out.detach().float(), "swiglu")
    _close(padded, ref, dtype, "padded")
    _close(ragged, ref, dtype, "ragged")
    grad = torch.randn(t, d)
    for a, b in zip(torch.autograd.grad(padded, (x, gate, w_in, w_out), grad),
                    torch.autograd.grad(ragged, (x, gate, w_in, w_out), grad)):
        _close(a, b, dtype)


def test_routed_ffn_expanded_gradient_and_no_grad(chunking):
    torch.manual_seed(0)
    token, expert, offs, _ = _routing_case(5, 4, 2, seed=0)
    x = torch.randn(5, 16, requires_grad=True)
    w_in, w_out = _weights(4, 16, 8, "swiglu", torch.float32)
    gate = torch.rand(token.numel())
    routed_ffn(x, token, gate, offs, w_in, w_out, "swiglu").sum().backward()  # stride-0 gradient
    assert torch.isfinite(x.grad).all() and torch.isfinite(w_in.grad).all()
    with torch.no_grad():
        y = routed_ffn(x, token, gate, offs, w_in, w_out, "swiglu")
    assert not y.requires_grad


def test_routed_ffn_rejects_mismatched_weights():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="activation"):
        routed_ffn(x, torch.zeros(2, dtype=torch.long), torch.ones(2), _offs([2]), torch.randn(1, 8, 8),
                   torch.randn(1, 8, 8), "swiglu")
    with pytest.raises(ValueError, match="allowed"):
        routed_ffn(x, torch.zeros(2, dtype=torch.long), torch.ones(2), _offs([2]), torch.randn(1, 8, 8),
                   torch.randn(1, 8, 8), "tanh")


# ---------------------------------------------------------------- decode path

from moekit.ops import decode as decode_mod  # noqa: E402
from moekit.ops.decode import decode_path_ok, routed_ffn_decode  # noqa: E402


def _decode_case(counts, t, seed=0):
    """Rows sorted by expert with the given per-expert counts, tokens drawn among t."""
    g = torch.Generator().manual_seed(seed)
    expert = torch.arange(len(counts)).repeat_interleave(torch.tensor(counts))
    token = torch.randint(0, t, (expert.numel(),), generator=g)
    return token, expert, _offs(counts)


DECODE_CASES = [
    # per-expert row counts (mixes of 1 row, 2-3 rows (weight-stationary) and more), tokens
    ([1, 0, 1, 1], 3),  # one row each: the GEMV form only
    ([2, 3, 0, 2], 4),  # weight-stationary form only
    ([1, 2, 0, 5, 3, 1], 6),  # both, with an empty expert
    ([0, 0, 7], 7),  # one expert has everything
    ([4], 4),  # E = 1
]


@pytest.fixture(params=["native", "torch"])
def decode_kernel(request, monkeypatch):
    """The decode path with the native kernel (ops/native.py), or with it off (the torch forms)."""
    from moekit.ops import native

    calls = []
    if request.param == "native":
        request.getfixturevalue("native_kernel")  # skips without it, fails under MOEKIT_NATIVE=require
        real = native.grouped_gemv
        monkeypatch.setattr(native, "grouped_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    else:
        monkeypatch.setitem(native._STATE, "failed", True)
        monkeypatch.setitem(native._STATE, "lib", None)
    return request.param, calls


@pytest.mark.parametrize("d,f,activation", [(16, 8, "swiglu"), (8, 16, "swiglu"), (16, 8, "gelu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("counts,t", DECODE_CASES)
def test_decode_matches_reference(decode_kernel, counts, t, dtype, d, f, activation):
    torch.manual_seed(0)
    token, expert, offs = _decode_case(counts, t)
    x = torch.randn(t, d).to(dtype)
    gate = torch.rand(token.numel())
    w_in, w_out = (w.detach() for w in _weights(len(counts), d, f, activation, dtype))
    with torch.no_grad():
        got = routed_ffn_decode(x, token, gate, offs, w_in, w_out, activation)
    ref = R.routed_rows(x.float(), token, gate, expert, w_in.float(), w_out.float(), activation)
    assert got.dtype == torch.float32
    _close(got, ref, dtype, "decode")
    path, calls = decode_kernel
    # the native kernel ran both projections over all rows; with it off nothing called it
    assert calls == ([sum(counts)] * 2 if path == "native" else [])


def test_decode_path_is_chosen_only_for_few_tokens_without_grad():
    x, w_in, w_out = torch.randn(4, 16), torch.randn(2, 16, 16), torch.randn(2, 16, 8)
    with torch.no_grad():
        assert decode_path_ok(x, w_in, w_out)
        assert not decode_path_ok(torch.randn(decode_mod.DECODE_MAX_TOKENS + 1, 16), w_in, w_out)
        assert not decode_path_ok(torch.randn(4, 10), torch.randn(2, 16, 10), torch.randn(2, 10, 8))  # unaligned
    assert decode_path_ok(x, w_in, w_out)  # grad mode on, but nothing requires grad
    assert not decode_path_ok(x, w_in.requires_grad_(), w_out)


# ---------------------------------------------------------------- CPU workspace of the backward


def _fwd_bwd_grads(moe, x):
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = moe(x).output
    out.backward(torch.randn_like(out, generator=torch.Generator().manual_seed(1)))
    return [x.grad, *(p.grad for p in moe.parameters())]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_backward_workspace_gives_the_same_gradients_and_never_escapes(monkeypatch, activation):
    """Reused per-thread buffers (grow, shrink, chunked and whole) give bit-identical gradients
    to fresh allocations, and no returned gradient lives in them."""
    from moekit import MoE, MoEConfig

    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2, activation=activation))
    monkeypatch.setattr(routed_mod, "CHUNK_BYTES", 2048)  # several chunks at T=40
    routed_mod.release_workspace()
    for t in (40, 8, 40, 3):  # grow, shrink (a prefix view), grow again
        x = torch.randn(t, 32)
        got = _fwd_bwd_grads(moe, x)
        buffers = list(routed_mod._WORKSPACE.buffers.values())
        spans = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in buffers]
        for g in got:
            assert not any(lo <= g.data_ptr() < hi for lo, hi in spans), "a gradient aliases the workspace"
        monkeypatch.setattr(routed_mod, "WORKSPACE", False)
        monkeypatch.setattr(routed_mod, "KEEP_POOL", False)
        want = _fwd_bwd_grads(moe, x)
        monkeypatch.setattr(routed_mod, "WORKSPACE", True)
        monkeypatch.setattr(routed_mod, "KEEP_POOL", True)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
    assert {slot for slot, _ in routed_mod._WORKSPACE.buffers} == {"rows", "dh", "ga"}
    routed_mod.release_workspace()
    assert not getattr(routed_mod._WORKSPACE, "buffers", None)


def test_kept_hidden_rows_reuse_a_buffer_only_once_it_is_free(monkeypatch):
    """The hidden rows kept from forward to backward come from a pool: graphs in flight each
    hold their own buffer, a buffer is handed out again only after its backward ran, a larger
    request replaces the free smaller ones, and gradients equal those of fresh allocations."""
    from moekit import MoE, MoEConfig

    if not routed_mod.KEEP_POOL:
        pytest.skip("this torch has no storage use count")
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2))
    monkeypatch.setattr(routed_mod, "CHUNK_BYTES", 2048)  # several chunks: h is kept whole
    routed_mod.release_workspace()
    x1, x2, grad = torch.randn(40, 32), torch.randn(40, 32), torch.randn(40, 32)
    out1, out2 = moe(x1).output, moe(x2).output  # two graphs in flight
    pool = routed_mod._WORKSPACE.kept
    assert len(pool) == 2 and pool[0].data_ptr() != pool[1].data_ptr()
    out1.backward(grad)
    moe.zero_grad(set_to_none=True)
    ptrs = [buf.data_ptr() for buf in pool]
    out3 = moe(x1).output  # out2's buffer is still held by its graph: out1's is reused
    assert [buf.data_ptr() for buf in pool] == ptrs
    out3.backward(grad)
    got = [p.grad.clone() for p in moe.parameters()]
    moe.zero_grad(set_to_none=True)
    out2.backward(grad)  # its kept rows were not overwritten by out3's forward
    got2 = [p.grad.clone() for p in moe.parameters()]
    monkeypatch.setattr(routed_mod, "KEEP_POOL", False)
    for x, grads in ((x1, got), (x2, got2)):
        moe.zero_grad(set_to_none=True)
        moe(x).output.backward(grad)
        for a, b in zip(grads, (p.grad for p in moe.parameters())):
            assert torch.equal(a, b)
    monkeypatch.setattr(routed_mod, "KEEP_POOL", True)
    moe(torch.randn(80, 32)).output.sum().backward()  # larger: both free buffers are replaced
    assert len(pool) == 1 and pool[0].numel() == 160 * 32  # N = 80 * 2 rows of H = 2 * 16
    moe.double()(torch.randn(40, 32, dtype=torch.float64)).output.sum().backward()
    assert len(pool) == 1 and pool[0].dtype == torch.float64  # the free float32 buffer is dropped
    routed_mod.release_workspace()
    assert not getattr(routed_mod._WORKSPACE, "kept", None)


def test_backward_workspace_is_per_thread():
    """Two threads running backward at once each get their own buffers and correct gradients."""
    import threading

    from moekit import MoE, MoEConfig

    torch.manual_seed(0)
    moes = [MoE(MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2)) for _ in range(2)]
    xs = [torch.randn(64, 32), torch.randn(48, 32)]
    want = [_fwd_bwd_grads(m, x) for m, x in zip(moes, xs)]
    got, buffer_ptrs = [None, None], [None, None]

    def work(i):
        for _ in range(5):
            got[i] = _fwd_bwd_grads(moes[i], xs[i])
        buffer_ptrs[i] = {b.data_ptr() for b in routed_mod._WORKSPACE.buffers.values()}

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not buffer_ptrs[0] & buffer_ptrs[1]
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b)


def test_kept_pool_drops_a_free_buffer_behind_a_held_one_of_another_size():
    """A free buffer that cannot serve is dropped by identity: `list.remove` compared the held
    buffer before it with ==, elementwise, and failed on two sizes (found by the LoRA job)."""
    if not routed_mod.KEEP_POOL:
        pytest.skip("this torch has no storage use count")
    routed_mod.release_workspace()
    like = torch.empty(0)
    held = routed_mod._kept((4, 8), like)  # stays referenced: not free
    small = routed_mod._kept((2, 3), like)
    del small  # free, but too small for the next request
    big = routed_mod._kept((16, 8), like)
    pool = routed_mod._WORKSPACE.kept
    assert len(pool) == 2 and pool[0].data_ptr() == held.data_ptr() and pool[1].data_ptr() == big.data_ptr()
    routed_mod.release_workspace()
