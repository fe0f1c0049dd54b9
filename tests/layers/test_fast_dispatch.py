"""Properties of the fast dispatch paths that parity alone does not show."""

from __future__ import annotations

import pytest
import torch

import moekit.ops.grouped as grouped
from moekit import MoE, MoEConfig


@pytest.mark.parametrize("router,dtype", [("softmax_topk", torch.float32), ("softmax_topk", torch.bfloat16),
                                          ("sigmoid_bias", torch.float32), ("gshard", torch.float32)])
def test_dropless_hot_path_never_syncs_or_loops(monkeypatch, router, dtype):
    """No .item()/.tolist()/.cpu()/bool(tensor) anywhere in forward+backward, no expert loop."""
    moe = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=8, top_k=2, router=router)).to(dtype)
    x = torch.randn(3, 7, 16, dtype=dtype, requires_grad=True)

    def forbidden(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"host sync via Tensor.{name} in the dropless hot path")
        return fail

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(name))
    monkeypatch.setattr(grouped, "grouped_mm_loop", forbidden("grouped_mm_loop"))
    out = moe(x)
    (out.output.float().square().sum() + out.aux_loss).backward()
    monkeypatch.undo()
    assert torch.isfinite(x.grad).all()


def test_weight_gradients_keep_the_parameter_layout():
    """Weight gradients come out of the grouped GEMM as (E, H, D) / (E, D, F), contiguous."""
    moe = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))
    moe(torch.randn(9, 16)).output.sum().backward()
    for p in (moe.experts.w_in, moe.experts.w_out):
        assert p.grad.shape == p.shape and p.grad.is_contiguous()


def test_gate_gradient_reaches_the_router_on_every_path():
    for kw in ({}, {"capacity_factor": 1.0}, {"router": "expert_choice"}):
        moe = MoE(MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, **kw))
        out = moe(torch.randn(12, 16))
        out.output.square().sum().backward()  # no aux loss: the gradient is the gate's
        assert moe.router.weight.grad.abs().sum() > 0, kw


@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize("tokens", [1, 16, 32])
def test_moe_decode_path_matches_reference(request, monkeypatch, tokens, native_on):
    """Inference with at most 32 tokens takes the decode path: with the native kernel the whole
    dispatch runs in it (sort, gather, both projections, combine), without it the sorted rows go
    through the torch forms; the result is the reference's either way."""
    import moekit.layers.dispatch as experts_mod
    from moekit.ops import native
    from moekit.ops import reference as ref

    if native_on:
        request.getfixturevalue("native_kernel")  # skips without it, fails under MOEKIT_NATIVE=require
    if not native_on:
        monkeypatch.setitem(native._STATE, "failed", True)
        monkeypatch.setitem(native._STATE, "lib", None)
    calls = []
    for name in ("routed_ffn_decode", "routed_ffn_decode_native"):
        real = getattr(experts_mod, name)
        monkeypatch.setattr(experts_mod, name, lambda *a, name=name, real=real: calls.append(name) or real(*a))
    moe = MoE(MoEConfig(d_model=32, d_ff=16, num_experts=16, top_k=4, init_std=0.2)).eval()
    x = torch.randn(tokens, 32)
    with torch.no_grad():
        out = moe(x)
    # the layer's plan picks one of the two, once: without the kernel the sorted op runs
    assert calls == (["routed_ffn_decode_native"] if native_on else ["routed_ffn_decode"])
    r = out.routing
    expected = ref.token_choice(x, r.expert_idx_TK, r.weight_TK, moe.experts)
    torch.testing.assert_close(out.output, expected, atol=1e-5, rtol=1e-4)
    counts = torch.bincount(r.expert_idx_TK.reshape(-1), minlength=16).float()
    torch.testing.assert_close(out.metrics["tokens_per_expert"], counts)
    assert out.metrics["drop_fraction"].item() == 0.0
    calls.clear()
    moe(x.requires_grad_()).output.sum().backward()  # training step: the differentiable op
    assert not calls


def test_decode_with_declined_assignments_takes_the_sorted_path(monkeypatch):
    """GShard's random routing declines some second choices (an active mask): the fused native
    path does not take those, the sorted path weights them to zero."""
    import moekit.layers.dispatch as experts_mod
    from moekit.ops import reference as ref

    calls = []
    real = experts_mod.routed_ffn_decode_native
    monkeypatch.setattr(experts_mod, "routed_ffn_decode_native", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=32, d_ff=16, num_experts=8, top_k=2, router="gshard")).train()
    x = torch.randn(8, 32)
    with torch.no_grad():
        out = moe(x)
    assert not calls
    r = out.routing
    assert r.active_TK is not None
    expected = ref.token_choice(x, r.expert_idx_TK, r.weight_TK * r.active_TK, moe.experts)
    torch.testing.assert_close(out.output, expected, atol=1e-5, rtol=1e-4)
