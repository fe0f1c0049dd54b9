"""NF4 (ops/quant.py) against the written-out reference, and the quantized products' input
gradients (QLoRA's frozen base) against autograd through the dequantized weight; the grouped
and routed products skip the weight gradient of a frozen weight and give the same input grad."""

import pytest
import torch

from moekit.ops import quant
from moekit.ops.grouped import grouped_mm
from moekit.ops.reference import dequantize_reference, quantize_reference
from moekit.ops.routed import routed_ffn


@pytest.mark.parametrize("shape,block", [((3, 10), 4), ((2, 3, 16), 8), ((1, 7), 2)])
def test_nf4_matches_reference_bit_for_bit(shape, block):
    torch.manual_seed(0)
    w = torch.randn(shape)
    w[0, ..., :block] = 0  # a zero block: scale 0, every value index 7 (level 0.0)
    q, r = quant.quantize(w, 4, block, "nf4"), quantize_reference(w, 4, block, "nf4")
    assert torch.equal(q.data, r.data) and torch.equal(q.scales, r.scales) and q.code == r.code == "nf4"
    torch.testing.assert_close(quant.dequantize(q), dequantize_reference(r), rtol=0, atol=0)


def test_nf4_error_is_half_the_widest_level_gap():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    q = quant.quantize(w, 4, 64, "nf4")
    err = (quant.dequantize(q) - w).abs().unflatten(-1, (-1, 64))  # (64, 4, 64)
    levels = torch.tensor(quant.NF4_LEVELS)
    half_gap = (levels[1:] - levels[:-1]).max() / 2  # nearest level: within half the widest gap
    assert (err <= half_gap * q.scales.unsqueeze(-1) + 1e-6).all()
    # normal weights lose less to NF4 than to the evenly spaced int4 code (the point of NF4)
    int4 = (quant.dequantize(quant.quantize(w, 4, 64)) - w).pow(2).mean()
    assert (quant.dequantize(q) - w).pow(2).mean() < int4


def test_nf4_errors():
    with pytest.raises(ValueError, match="code 'nf4' is a 4-bit code"):
        quant.quantize(torch.randn(2, 4), 8, 2, "nf4")
    with pytest.raises(ValueError, match="code must be one of"):
        quant.quantize(torch.randn(2, 4), 4, 2, "fp4")


@pytest.mark.parametrize("code,bits", [("int", 8), ("int", 4), ("nf4", 4)])
def test_quantized_products_input_gradient(code, bits):
    torch.manual_seed(0)
    q = quant.quantize(torch.randn(3, 12, 20), bits, 4, code)  # (E, O, I)
    w = quant.dequantize(q).requires_grad_(False)
    offs = torch.tensor([2, 2, 7], dtype=torch.int32)  # expert 1 gets no row
    x = torch.randn(7, 20, requires_grad=True)
    y = quant.qgrouped_mm(x, q, offs)
    rows = torch.tensor([0, 0, 2, 2, 2, 2, 2])
    y_ref = torch.einsum("ni,noi->no", x, w[rows])
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-5)
    x2 = torch.randn(3, 5, 20, requires_grad=True)  # padded form
    (gx2,) = torch.autograd.grad(quant.qbmm(x2, q).sum(), x2)
    torch.testing.assert_close(gx2, w.sum(1).unsqueeze(1).expand(3, 5, 20), rtol=1e-5, atol=1e-5)
    xl = torch.randn(4, 20, requires_grad=True)  # linear form, chunked over rows of the weight
    old = quant._CHUNK_ELEMENTS
    quant._CHUNK_ELEMENTS = 40  # 2 rows per chunk
    try:
        yl = quant.qlinear(xl, q[0])
        (gxl,) = torch.autograd.grad(yl, xl, torch.ones_like(yl))
    finally:
        quant._CHUNK_ELEMENTS = old
    torch.testing.assert_close(yl, xl @ w[0].t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gxl, w[0].sum(0).expand(4, 20), rtol=1e-5, atol=1e-5)


def test_frozen_weight_gets_no_gradient_and_the_same_input_gradient():
    torch.manual_seed(0)
    x = torch.randn(9, 16, requires_grad=True)
    w = torch.randn(3, 16, 8)
    offs = torch.tensor([4, 4, 9], dtype=torch.int32)
    (gx_frozen,) = torch.autograd.grad(grouped_mm(x, w, offs).square().sum(), x)
    wt = w.clone().requires_grad_(True)
    gx, gw = torch.autograd.grad(grouped_mm(x, wt, offs).square().sum(), (x, wt))
    assert torch.equal(gx_frozen, gx) and gw.abs().sum() > 0


def test_routed_ffn_frozen_experts_same_input_gradient():
    torch.manual_seed(0)
    x = torch.randn(6, 16, requires_grad=True)
    token = torch.tensor([0, 3, 5, 1, 2, 4, 0, 1])
    gate = torch.rand(8)
    offs = torch.tensor([3, 3, 8], dtype=torch.int32)
    w_in, w_out = torch.randn(3, 48, 16) * 0.1, torch.randn(3, 16, 24) * 0.1
    out = routed_ffn(x, token, gate, offs, w_in, w_out, "swiglu")
    (gx_frozen,) = torch.autograd.grad(out.square().sum(), x)
    w_in_t, w_out_t = w_in.clone().requires_grad_(True), w_out.clone().requires_grad_(True)
    out = routed_ffn(x, token, gate, offs, w_in_t, w_out_t, "swiglu")
    gx, gw = torch.autograd.grad(out.square().sum(), (x, w_in_t))
    assert torch.equal(gx_frozen, gx) and gw.abs().sum() > 0


def test_nf4_levels_are_the_papers_normal_quantiles():
    """QLoRA's construction (Dettmers et al. 2023, section 3; bitsandbytes' create_normal_map):
    8 positive and 7 negative quantiles of N(0, 1) between 1 - delta and 1/2, with
    delta = (1/32 + 1/30) / 2, plus an exact zero, scaled so the extremes are -1 and 1."""
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0)
    top = 1 - (1 / 32 + 1 / 30) / 2
    pos = normal.icdf(torch.linspace(top, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(top, 0.5, 8, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    levels = levels / levels.abs().max()
    # the published table is float32: 1.1e-7 is what it differs by
    torch.testing.assert_close(torch.tensor(quant.NF4_LEVELS, dtype=torch.float64), levels, rtol=0, atol=2e-7)
