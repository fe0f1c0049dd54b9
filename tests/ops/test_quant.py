"""ops/quant.py ("moekit-q/1"): the packed format against the block-by-block reference, the error
bound the math gives, and every product against the oracle (dequantize, then multiply).

Error bound: q = round_half_even(w / s) with s = absmax / qmax and |w / s| <= qmax, so
|w - q s| <= s / 2 exactly, plus float32 rounding of w / s and q * s (each at most half an ulp
of a value <= absmax, i.e. <= 2^-24 absmax). The tests allow s / 2 + 2^-22 absmax and check the
measured maximum reaches 0.49 s, so the tolerance is not looser than the real error.
"""

import pytest
import torch

from moekit.ops import quant
from moekit.ops import reference as R
from moekit.ops.quant import QTensor, dequantize, qbmm, qgrouped_mm, qlinear, quantize

WIDTHS = [1, 2, 31, 32, 33, 47, 64]  # odd widths and the edges of a 32-wide block
BITS = [8, 4]


def _block_scales(q: QTensor) -> torch.Tensor:
    """The scale that applies to each element (..., O, I)."""
    return q.scales.repeat_interleave(q.block, dim=-1)[..., : q.width]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("width", WIDTHS)
def test_packing_matches_the_block_reference(bits, width):
    w = torch.randn(2, 3, width)
    q, ref = quantize(w, bits, 32), R.quantize_reference(w, bits, 32)
    assert q.data.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert q.scales.dtype == torch.float32
    padded = -(-width // 32) * 32
    assert q.data.shape == (2, 3, padded if bits == 8 else padded // 2)
    assert q.scales.shape == (2, 3, padded // 32)
    assert torch.equal(q.data, ref.data) and torch.equal(q.scales, ref.scales)
    assert torch.equal(dequantize(q), R.dequantize_reference(q))


@pytest.mark.parametrize("block", [2, 8, 31 + 1, 64])
@pytest.mark.parametrize("bits", BITS)
def test_block_sizes_and_their_edges(bits, block):
    for width in (block - 1, block, block + 1):
        if width < 1:
            continue
        w = torch.randn(4, width)
        q, ref = quantize(w, bits, block), R.quantize_reference(w, bits, block)
        assert torch.equal(q.data, ref.data) and torch.equal(q.scales, ref.scales), (block, width)
        assert dequantize(q).shape == w.shape


def test_the_documented_layout_by_hand():
    # One block of 4: absmax 7 -> scale 1 (4-bit) and 7/127 (int8).
    w = torch.tensor([[7.0, -7.0, 2.5, 0.0]])
    q4 = quantize(w, 4, 4)
    assert q4.scales.tolist() == [[1.0]]
    # q = 7, -7, 2 (2.5 rounds half to even), 0; stored q + 8 = 15, 1, 10, 8; even column low nibble.
    assert q4.data.tolist() == [[15 | (1 << 4), 10 | (8 << 4)]]
    assert dequantize(q4).tolist() == [[7.0, -7.0, 2.0, 0.0]]
    q8 = quantize(torch.tensor([[127.0, -127.0, 0.5, 1.5]]), 8, 4)
    assert q8.scales.tolist() == [[1.0]] and q8.data.tolist() == [[127, -127, 0, 2]]


def test_zeros_and_padding_quantize_to_zero():
    w = torch.zeros(3, 40)
    w[1, 5] = 2.0
    for bits in BITS:
        q = quantize(w, bits, 32)
        assert q.scales[0].tolist() == [0.0, 0.0] and q.scales[1, 1].item() == 0.0
        assert torch.equal(dequantize(q), w)
        values = quant.unpack(q)
        assert values[:, 40:].abs().sum() == 0  # padding columns


@pytest.mark.parametrize("bits", BITS)
def test_round_trip_error_is_within_half_a_scale(bits):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 333, generator=g) * torch.logspace(-3, 1, 64).unsqueeze(1)  # rows of many magnitudes
    q = quantize(w, bits, 32)
    err = (dequantize(q) - w).abs()
    scale = _block_scales(q)
    absmax = scale * quant.QMAX[bits]
    assert bool((err <= scale / 2 + absmax * 2**-22).all())
    ratio = (err / scale).max().item()
    assert 0.49 < ratio <= 0.5 + 1e-5  # the bound is reached: not a loose tolerance
    # in absolute terms: at most absmax / 254 (int8) or absmax / 14 (4-bit) per element
    assert bool((err <= absmax / (2 * quant.QMAX[bits]) * (1 + 1e-5)).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_inputs_are_read_in_float32(dtype):
    w = torch.randn(5, 40).to(dtype)
    q = quantize(w, 8, 32)
    assert torch.equal(q.data, quantize(w.float(), 8, 32).data)
    assert dequantize(q, dtype).dtype == dtype


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("width", [1, 33, 47])
@pytest.mark.parametrize("lead", [(0,), (1,), (5,), (2, 3)])
def test_qlinear_matches_the_oracle(bits, width, lead):
    q = quantize(torch.randn(7, width), bits, 32)
    x, bias = torch.randn(*lead, width), torch.randn(7)
    for b in (None, bias):
        y = qlinear(x, q, b)
        assert y.shape == (*lead, 7)
        torch.testing.assert_close(y, R.qlinear_reference(x, q, b))


def test_qlinear_dequantizes_a_large_weight_in_chunks(monkeypatch):
    q = quantize(torch.randn(50, 33), 4, 32)
    x = torch.randn(3, 33)
    monkeypatch.setattr(quant, "_CHUNK_ELEMENTS", 33 * 7)  # 7 rows at a time: 8 chunks, the last short
    torch.testing.assert_close(qlinear(x, q), R.qlinear_reference(x, q))


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("counts", [[0], [5], [3, 0, 4], [0, 0, 2], [0, 0, 0], [1, 1, 1]])
def test_grouped_and_padded_products_match_the_oracle(bits, counts):
    num_experts, width = len(counts), 47
    q = quantize(torch.randn(num_experts, 9, width), bits, 32)
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    x = torch.randn(sum(counts), width)
    y = qgrouped_mm(x, q, offs)
    start, parts = 0, []
    for e, n in enumerate(counts):
        parts.append(R.qlinear_reference(x[start:start + n], q[e]))
        start += n
    torch.testing.assert_close(y, torch.cat(parts))
    x_ECD = torch.randn(num_experts, 3, width)
    y_ECD = qbmm(x_ECD, q)
    for e in range(num_experts):
        torch.testing.assert_close(y_ECD[e], R.qlinear_reference(x_ECD[e], q[e]))


@pytest.mark.parametrize("bad, match", [
    (dict(bits=3), r"bits must be one of \[8, 4\], got 3"),
    (dict(bits=True), "bits must be one of"),
    (dict(block=0), "block must be an even integer from 2 to 4096, got 0"),
    (dict(block=33), "block must be an even integer"),
    (dict(block=8192), "block must be an even integer"),
    (dict(block=32.0), "block must be an integer"),
])
def test_bad_arguments_are_refused(bad, match):
    args = dict(bits=8, block=32) | bad
    with pytest.raises(ValueError, match=match):
        quantize(torch.randn(2, 32), **args)


def test_bad_weights_and_inputs_are_refused():
    with pytest.raises(ValueError, match="floating-point"):
        quantize(torch.ones(2, 32, dtype=torch.int64), 8)
    with pytest.raises(ValueError, match="inf or nan"):
        quantize(torch.tensor([[1.0, float("nan")]]), 8)
    with pytest.raises(ValueError, match="non-empty last"):
        quantize(torch.zeros(2, 0), 8)
    q = quantize(torch.randn(3, 33), 8)
    with pytest.raises(ValueError, match="input width 33"):
        qlinear(torch.randn(2, 32), q)
    with pytest.raises(ValueError, match="E=1"):
        qbmm(torch.randn(2, 1, 33), quantize(torch.randn(1, 3, 33), 8))
