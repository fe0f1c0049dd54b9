"""ops/routed_lora.py against the oracle: `reference.routed_rows` (one row at a time, plain
autograd) on explicitly merged weights W + s B A, forward and every gradient, over degenerate
shapes (no rows, an expert with none, one expert, the padded layout), fp32 and bf16."""

import pytest
import torch

from moekit.ops.reference import routed_rows
from moekit.ops.routed_lora import routed_ffn_lora

D, F, R, S = 16, 12, 4, 0.75


def _case(counts, seed=0, dtype=torch.float32, train_base=False, tokens=5):
    torch.manual_seed(seed)
    num_experts = len(counts)
    expert_N = torch.cat([torch.full((c,), e, dtype=torch.long) for e, c in enumerate(counts)])
    n = len(expert_N)
    token_N = torch.randint(0, max(tokens, 1), (n,)) if n else torch.zeros(0, dtype=torch.long)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    e = num_experts

    def rnd(*shape):
        return torch.randn(*shape, dtype=dtype) * 0.3

    t = dict(x=torch.randn(tokens, D, dtype=dtype), gate=torch.rand(n), w_in=rnd(e, 2 * F, D), w_out=rnd(e, D, F),
             a_in=rnd(e, R, D), b_in=rnd(e, 2 * F, R), a_out=rnd(e, R, F), b_out=rnd(e, D, R))
    for k, v in t.items():
        if train_base or k not in ("w_in", "w_out"):
            v.requires_grad_(True)
    return t, token_N, expert_N, offs


def _reference(t, token_N, expert_N):
    w_in = t["w_in"].float() + S * t["b_in"].float() @ t["a_in"].float()
    w_out = t["w_out"].float() + S * t["b_out"].float() @ t["a_out"].float()
    return routed_rows(t["x"].float(), token_N, t["gate"], expert_N, w_in, w_out, "swiglu")


def _ours(t, token_N, offs, rpe=0):
    return routed_ffn_lora(t["x"], token_N, t["gate"], offs, t["w_in"], t["w_out"], t["a_in"], t["b_in"], t["a_out"],
                           t["b_out"], S, "swiglu", rpe)


@pytest.mark.parametrize("counts,train_base", [([3, 0, 5, 2], False), ([3, 0, 5, 2], True), ([6], False),
                                               ([0, 0], False), ([1, 1, 1], False)])
def test_forward_and_gradients_match_the_oracle(counts, train_base):
    t, token_N, expert_N, offs = _case(counts, train_base=train_base)
    out, ref = _ours(t, token_N, offs), _reference(t, token_N, expert_N)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if len(expert_N) == 0:  # nothing routed: a zero output whose backward gives zero gradients
        out.sum().backward()
        assert not t["a_in"].grad.any() and not t["x"].grad.any()
        return
    g = torch.randn_like(out)
    leaves = [v for v in t.values() if v.requires_grad]
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    grads_ref = torch.autograd.grad(ref, leaves, g, allow_unused=True)
    for name, got, want in zip([k for k, v in t.items() if v.requires_grad], grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    if not train_base:
        assert t["w_in"].grad is None


def test_padded_layout_matches_the_oracle():
    t, token_N, expert_N, offs = _case([3, 3, 3])
    out, ref = _ours(t, token_N, offs, rpe=3), _reference(t, token_N, expert_N)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    (ga, gb) = torch.autograd.grad(out.square().sum(), [t["a_in"], t["b_out"]])
    (ra, rb) = torch.autograd.grad(ref.square().sum(), [t["a_in"], t["b_out"]])
    torch.testing.assert_close(ga, ra, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-5)


def test_bf16_within_bf16_rounding():
    t, token_N, expert_N, offs = _case([4, 2, 5], dtype=torch.bfloat16)
    out, ref = _ours(t, token_N, offs), _reference(t, token_N, expert_N)
    assert out.dtype == torch.float32
    # bf16 operands (8-bit mantissa) through two products each: a few 1e-2 of the output's scale
    assert (out - ref).abs().max() / ref.abs().max() < 3e-2
    out.sum().backward()
    assert t["a_in"].grad.dtype == torch.bfloat16 and torch.isfinite(t["a_in"].grad).all()


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "silu", "gelu", "relu"])
def test_act_forward_into_a_buffer_equals_the_fresh_result(activation):
    from moekit.ops.activations import act_forward, hidden_width

    torch.manual_seed(0)
    h = torch.randn(7, hidden_width(5, activation))
    out = torch.full((7, 5), float("nan"))
    got = act_forward(h, activation, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, act_forward(h, activation))
