"""torch.compile(moe, fullgraph=True) on the dropless path: no graph break, same numbers as eager.

`aot_eager` traces exactly what inductor would see (Dynamo with fullgraph, then AOT autograd
through our custom ops' fake kernels and registered backward), in seconds; one inductor run
(C++ code generation) takes 25-50 s on the shared 2-core machine.
"""

from __future__ import annotations

import torch

from moekit import MoE, MoEConfig


def _run(moe, x):
    out = moe(x)
    (out.output.square().sum() + out.aux_loss).backward()
    grads = [p.grad.clone() for p in moe.parameters()] + [x.grad.clone()]
    moe.zero_grad(set_to_none=True)
    x.grad = None
    return out.output.detach(), grads


def _check(backend, cfg, dtype=torch.float32):
    torch.manual_seed(0)
    torch._dynamo.reset()
    moe = MoE(cfg).to(dtype)
    x = torch.randn(2, 5, cfg.d_model, dtype=dtype, requires_grad=True)
    compiled = torch.compile(moe, fullgraph=True, backend=backend)
    got_out, got_grads = _run(compiled, x)
    want_out, want_grads = _run(moe, x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got_out, want_out, atol=tol, rtol=tol)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def test_compile_fullgraph_dropless_aot_eager():
    _check("aot_eager", MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))


def test_compile_fullgraph_dropless_unaligned_and_bf16_aot_eager():
    # unaligned widths take the loop fallback inside the custom op; bf16 the native kernel
    _check("aot_eager", MoEConfig(d_model=10, d_ff=6, num_experts=3, top_k=2))
    _check("aot_eager", MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2), torch.bfloat16)


def test_compile_fullgraph_capacity_aot_eager():
    _check("aot_eager", MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, capacity_factor=1.0))


def test_compile_fullgraph_dropless_inductor():
    _check("inductor", MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))


def test_compile_fullgraph_decode_path_aot_eager():
    """The decode path reads counts on the host inside its custom op: no graph break."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    moe = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=8, top_k=2)).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        got = torch.compile(moe, fullgraph=True, backend="aot_eager")(x).output
        want = moe(x).output
    torch.testing.assert_close(got, want)


def test_compile_decode_path_with_the_one_row_kernel_inside(monkeypatch):
    """The compiled one-row kernel runs inside the custom op of an outer compiled graph."""
    import moekit.ops.decode as decode_mod

    monkeypatch.setattr(decode_mod, "ONE_ROW_KERNEL_MIN_BYTES", 0)
    monkeypatch.setitem(decode_mod._ONE_ROW, "failed", False)
    calls = []
    real = decode_mod._one_row_ffn
    monkeypatch.setattr(decode_mod, "_one_row_ffn", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    torch._dynamo.reset()
    moe = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=8, top_k=2)).eval()
    x = torch.randn(1, 16)
    with torch.no_grad():
        got = torch.compile(moe, fullgraph=True, backend="aot_eager")(x).output
        assert calls == [1]  # one call: both of the token's experts got one row
        monkeypatch.setitem(decode_mod._ONE_ROW, "failed", True)  # the reference: grouped GEMMs
        want = moe(x).output
    torch.testing.assert_close(got, want)
