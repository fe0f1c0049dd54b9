"""layers/quantized.py: QuantizedLinear and QuantizedExperts against float twins holding the
dequantized weights (same numbers, so the only difference is the order of float sums), through
every dispatch path of the MoE layer; the native decode kernels never see quantized experts."""

import pytest
import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.layers.experts import Experts
from moekit.layers.plan import Path, make_plan
from moekit.layers.quantized import QuantizedExperts, QuantizedLinear
from moekit.ops import decode, native
from moekit.ops import reference as R
from moekit.ops.quant import dequantize

BITS = [8, 4]


def _float_twin(qe: QuantizedExperts) -> Experts:
    ex = Experts(qe.num_experts, qe.d_model, qe.d_ff, qe.activation, qe.b_in is not None)
    w_in, w_out = qe.weights(torch.float32)
    with torch.no_grad():
        ex.w_in.copy_(w_in)
        ex.w_out.copy_(w_out)
        if qe.b_in is not None:
            ex.b_in.copy_(qe.b_in)
            ex.b_out.copy_(qe.b_out)
    return ex


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_features", [1, 33, 64])
def test_quantized_linear_is_a_drop_in(bits, bias, in_features):
    lin = nn.Linear(in_features, 5, bias=bias)
    q = QuantizedLinear.from_linear(lin, bits)
    assert list(q.parameters()) == []
    x = torch.randn(2, 3, in_features)
    torch.testing.assert_close(q(x), R.qlinear_reference(x, q.qweight(), q.bias))
    keys = {"weight_q", "weight_scale"} | ({"bias"} if bias else set())
    assert set(q.state_dict()) == keys
    assert q(torch.randn(0, in_features)).shape == (0, 5)


def test_a_cast_keeps_the_scales_float32_and_moves_the_compute_dtype():
    q = QuantizedLinear.from_linear(nn.Linear(40, 6, bias=True), 8)
    scale = q.weight_scale.clone()
    q = q.to(torch.bfloat16)
    assert q.weight_scale.dtype == torch.float32 and torch.equal(q.weight_scale, scale)
    assert q.weight_q.dtype == torch.int8 and q.bias.dtype == torch.bfloat16
    assert q.compute_dtype == torch.bfloat16 and q(torch.randn(2, 40, dtype=torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("bias", [False, True])
def test_quantized_experts_match_their_float_twin(bits, bias):
    ex = Experts(3, 47, 33, "swiglu", bias)
    if bias:
        with torch.no_grad():
            ex.b_in.normal_()
            ex.b_out.normal_()
    qe = QuantizedExperts.from_experts(ex, bits)
    twin = _float_twin(qe)
    assert qe.widths == twin.widths == (47, 66, 33) and not qe.fused and not qe.requires_grad
    counts = [2, 0, 3]
    x = torch.randn(5, 47)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    expert_N = torch.tensor([0, 0, 2, 2, 2])
    torch.testing.assert_close(qe.forward_grouped(x, offs, expert_N), twin.forward_grouped(x, offs, expert_N))
    x_ECD = torch.randn(3, 4, 47)
    torch.testing.assert_close(qe.forward_padded(x_ECD), twin.forward_padded(x_ECD))
    for e in range(3):
        torch.testing.assert_close(qe.forward_one(e, x), R.run_expert(qe, e, x))
        torch.testing.assert_close(qe.forward_one(e, x), twin.forward_one(e, x))
    empty, no_rows = torch.zeros(0, 47), torch.zeros(0, dtype=torch.long)
    assert qe.forward_grouped(empty, torch.zeros(3, dtype=torch.int32), no_rows).shape == (0, 47)


CASES = [  # (name, config overrides): every router family, dropless and with capacity
    ("softmax_topk", dict(router="softmax_topk", top_k=2)),
    ("top_k=E", dict(router="softmax_topk", top_k=4)),
    ("E=1", dict(router="softmax_topk", num_experts=1, top_k=1)),
    ("switch capacity", dict(router="switch", top_k=1, capacity_factor=1.0)),
    ("gshard", dict(router="gshard", top_k=2, capacity_factor=2.0)),
    ("sigmoid_bias", dict(router="sigmoid_bias", top_k=2)),
    ("expert_choice", dict(router="expert_choice", top_k=2)),
    ("soft", dict(router="soft", top_k=1)),
    ("shared", dict(router="softmax_topk", top_k=2, num_shared_experts=1, shared_expert_gate=True)),
    ("bias", dict(router="softmax_topk", top_k=2, expert_bias=True)),
]


def _pair(overrides, bits):
    cfg = MoEConfig(**(dict(d_model=48, d_ff=40, num_experts=4) | overrides))
    moe = MoE(cfg).eval()
    qmoe = MoE(cfg).eval()
    qmoe.load_state_dict(moe.state_dict())
    qmoe.experts = QuantizedExperts.from_experts(moe.experts, bits)
    moe.experts = _float_twin(qmoe.experts)
    if moe.shared_expert is not None:
        qmoe.shared_expert.ffn = QuantizedExperts.from_experts(moe.shared_expert.ffn, bits)
        moe.shared_expert.ffn = _float_twin(qmoe.shared_expert.ffn)
    return moe, qmoe


SIZED = [(name, overrides, tokens) for name, overrides in CASES for tokens in (0, 1, 3, 24)]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("name, overrides, tokens", SIZED, ids=[f"{c[0]}-T{c[2]}" for c in SIZED])
def test_moe_with_quantized_experts_matches_the_dequantized_float_layer(name, overrides, bits, tokens):
    moe, qmoe = _pair(overrides, bits)
    x = torch.randn(1, tokens, 48)
    with torch.no_grad():
        ref, out = moe(x), qmoe(x)
    torch.testing.assert_close(out.output, ref.output, rtol=1e-5, atol=1e-5)


def test_decode_plan_takes_the_dequantizing_path(monkeypatch):
    """A few tokens without gradient on CPU: float experts go NATIVE_DECODE / TORCH_DECODE;
    quantized ones PIECES, and the native decode kernel is never called on them."""
    moe, qmoe = _pair(dict(router="softmax_topk", top_k=2), 8)
    x = torch.randn(2, 48)
    with torch.no_grad():
        float_plan = make_plan(x, moe.router, moe.experts, moe.cfg, False, torch.float32)
        q_plan = make_plan(x, qmoe.router, qmoe.experts, qmoe.cfg, False, torch.float32)
        assert float_plan.decode and q_plan.path is Path.PIECES
        expected = moe(x).output

        def refuse(*args, **kwargs):
            raise AssertionError("a decode kernel read the weights of quantized experts")

        for mod, name in ((native, "decode_ffn"), (native, "grouped_gemv"), (decode, "_routed_ffn_decode_op")):
            monkeypatch.setattr(mod, name, refuse)
        torch.testing.assert_close(qmoe(x).output, expected, rtol=1e-5, atol=1e-5)


def test_quantized_experts_state_and_empty_structure():
    qe = QuantizedExperts.from_experts(Experts(2, 33, 20, "gelu"), 4)
    assert {k: (tuple(v.shape), v.dtype) for k, v in qe.state_dict().items()} == {
        "w_in_q": ((2, 20, 32), torch.uint8), "w_in_scale": ((2, 20, 2), torch.float32),
        "w_out_q": ((2, 33, 16), torch.uint8), "w_out_scale": ((2, 33, 1), torch.float32),
    }
    with torch.device("meta"):
        meta = Experts(2, 33, 20, "gelu")
    empty = QuantizedExperts.like(meta, 4)
    assert all(t.device.type == "meta" for t in empty.state_dict().values())
    assert {k: v.shape for k, v in empty.state_dict().items()} == {k: v.shape for k, v in qe.state_dict().items()}
    w_in, _ = qe.weights(torch.bfloat16)
    assert w_in.dtype == torch.bfloat16 and torch.equal(w_in, dequantize(qe.qweights()[0], torch.bfloat16))


def test_bad_module_arguments():
    with pytest.raises(ValueError, match=r"QuantizedLinear: bits must be one of \[8, 4\], got 2"):
        QuantizedLinear(4, 4, bits=2)
    with pytest.raises(ValueError, match="QuantizedExperts: block must be an even integer"):
        QuantizedExperts(1, 4, 4, "gelu", 4, block=7)
