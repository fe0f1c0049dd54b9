"""Sparse upcycling: exact at conversion (plain and fine-grained), a trainable and saveable
model, Hugging Face round trips, and errors that name the problem."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE
from moekit.convert import ConversionError, ffn_flops_per_token, upcycle
from moekit.models import build_model, get_preset, load_checkpoint, save_checkpoint


def _dense(name: str):
    torch.manual_seed(0)
    model = build_model(get_preset(name)).eval()
    with torch.no_grad():  # larger than init-scale weights, so a wrong copy cannot hide in rounding
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _ids(b=2, length=12):
    return torch.randint(0, 256, (b, length), generator=torch.Generator().manual_seed(1))


def _close(a, b, rel=2e-6):
    # The MoE keeps gate weights in float32 and sums K weighted copies: equal up to float32 rounding.
    scale = b.abs().max().item()
    assert (a - b).abs().max().item() <= rel * scale + 1e-7, (a - b).abs().max().item()


EXACT = [
    dict(num_experts=4, top_k=1),
    dict(num_experts=4, top_k=2),
    dict(num_experts=3, top_k=3),
    dict(num_experts=4, top_k=4, router="dense"),
    dict(num_experts=4, top_k=2, router="noisy_topk"),
    dict(num_experts=4, top_k=2, router="sigmoid_bias"),
    dict(num_experts=4, top_k=2, every=2),
    dict(num_experts=2, top_k=4, granularity=2),  # fine-grained: K = g * k with k = 2 copies
    dict(num_experts=4, top_k=4, granularity=4),  # k = 1 copy, all 4 of its slices
    dict(num_experts=2, top_k=8, granularity=4, router="dense"),
    dict(num_experts=4, top_k=2, capacity_factor=None, aux_loss_coef=0.0),
]


@pytest.mark.parametrize("name", ["tiny-dense", "tiny-bert"])
@pytest.mark.parametrize("kw", EXACT, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_upcycled_equals_dense(name, kw):
    dense = _dense(name)
    ids = _ids()
    with torch.no_grad():
        ref = dense(ids)
        moe_model = upcycle(dense, **kw)
        out = moe_model(ids)
    every = kw.get("every", 1)
    assert [i for i, _ in out.layer_metrics] == [i for i in range(dense.cfg.n_layers) if (i + 1) % every == 0]
    _close(out.logits, ref.logits)
    if name == "tiny-bert":
        _close(out.hidden_states, ref.hidden_states)
    g = kw.get("granularity", 1)
    assert moe_model.cfg.moe.num_experts == kw["num_experts"] * g
    assert moe_model.cfg.moe.d_ff == dense.cfg.d_ff // g


def test_exactness_in_float64():
    """In float64 the error is far below float32 rounding (what is left is float64 rounding of the
    K weighted copies, and whatever precision the layer keeps its gate weights in); top-1 (gate
    exactly 1) is exact."""
    dense = _dense("tiny-dense").double()
    ids = _ids()
    with torch.no_grad():
        ref = dense(ids).logits
        err2 = (upcycle(dense, num_experts=4, top_k=2)(ids).logits - ref).abs().max().item()
        err1 = (upcycle(dense, num_experts=4, top_k=1)(ids).logits - ref).abs().max().item()
    assert err2 < 1e-7 * ref.abs().max().item()
    assert err1 < 1e-12


def test_fine_grained_without_whole_copies_is_not_exact():
    """K not a multiple of g: some slices of the dense FFN are missing for some tokens."""
    dense = _dense("tiny-dense")
    ids = _ids()
    with torch.no_grad():
        ref = dense(ids).logits
        err = (upcycle(dense, num_experts=4, top_k=3, granularity=2)(ids).logits - ref).abs().max().item()
    assert err > 1e-3 * ref.abs().max().item()


def test_switch_router_scales_by_probability():
    """Switch multiplies the expert output by its probability, so it does not start at the dense model."""
    dense = _dense("tiny-dense")
    ids = _ids()
    with torch.no_grad():
        ref = dense(ids).logits
        err = (upcycle(dense, num_experts=4, top_k=1, router="switch")(ids).logits - ref).abs().max().item()
    assert err > 1e-3 * ref.abs().max().item()


def test_expert_weights_are_copies_and_slices():
    dense = _dense("tiny-bert")
    m = upcycle(dense, num_experts=2, top_k=2, granularity=2)
    d, ex = dense.blocks[0].ffn, m.blocks[0].ffn.experts
    F = dense.cfg.d_ff
    for c in range(2):
        for j in range(2):
            e = c * 2 + j
            sl = slice(j * F // 2, (j + 1) * F // 2)
            assert torch.equal(ex.w_in[e], d.up_proj.weight[sl])
            assert torch.equal(ex.b_in[e], d.up_proj.bias[sl])
            assert torch.equal(ex.w_out[e], 2 * d.down_proj.weight[:, sl])  # gate scaling by g
            assert torch.equal(ex.b_out[e], d.down_proj.bias)
    r = m.blocks[0].ffn.router.weight
    assert torch.equal(r[0], r[1]) and torch.equal(r[2], r[3]) and not torch.equal(r[0], r[2])  # virtual groups


def test_gated_slices_take_gate_and_up_rows():
    dense = _dense("tiny-dense")
    m = upcycle(dense, num_experts=1, top_k=2, granularity=2)
    d, ex = dense.blocks[1].ffn, m.blocks[1].ffn.experts
    half = dense.cfg.d_ff // 2
    assert torch.equal(ex.w_in[1], torch.cat((d.gate_proj.weight[half:], d.up_proj.weight[half:])))


def test_input_model_unchanged_and_noise_breaks_symmetry():
    dense = _dense("tiny-dense")
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    m = upcycle(dense, num_experts=4, top_k=2, noise=0.1, seed=3)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())
    assert all(type(b.ffn).__name__ == "DenseFFN" for b in dense.blocks)
    w = m.blocks[0].ffn.experts.w_in
    assert not torch.equal(w[0], w[1])
    rel = (w[0] - w[1]).pow(2).mean().sqrt() / dense.blocks[0].ffn.up_proj.weight.pow(2).mean().sqrt()
    assert 0.05 < rel.item() < 0.3  # two independent draws of std 0.1: difference has std ~0.14
    again = upcycle(dense, num_experts=4, top_k=2, noise=0.1, seed=3)
    assert torch.equal(again.blocks[0].ffn.experts.w_in, w)  # seeded


def test_flops_and_config():
    dense = _dense("tiny-dense")
    m = upcycle(dense, num_experts=8, top_k=2, every=2)
    D, F = dense.cfg.d_model, dense.cfg.d_ff
    per_dense = 2 * 3 * D * F
    assert ffn_flops_per_token(dense) == 2 * per_dense
    assert ffn_flops_per_token(m) == per_dense + (2 * per_dense + 2 * D * 8)  # top-2 copies + the router
    assert m.cfg.moe_interval == 2 and m.cfg.moe_layers == [1] and m.cfg.moe.causal
    assert isinstance(m.blocks[1].ffn, MoE) and m.blocks[1].is_moe and not m.blocks[0].is_moe


def test_trains_saves_and_reloads(tmp_path):
    dense = _dense("tiny-dense")
    m = upcycle(dense, num_experts=4, top_k=2).train()
    ids = _ids()
    out = m(ids, labels=ids)
    out.loss.backward()
    moe = m.blocks[0].ffn
    assert moe.experts.w_in.grad.abs().sum() > 0 and moe.router.weight.grad.abs().sum() > 0
    save_checkpoint(m.eval(), tmp_path / "ck")
    back = load_checkpoint(tmp_path / "ck").eval()
    with torch.no_grad():
        assert torch.equal(back(ids).logits, m(ids).logits)


def test_shared_expert_starts_at_zero():
    dense = _dense("tiny-dense")
    ids = _ids()
    m = upcycle(dense, num_experts=4, top_k=2, num_shared_experts=1, shared_d_ff=32, shared_expert_gate=True)
    with torch.no_grad():
        _close(m(ids).logits, dense(ids).logits)
    assert m.blocks[0].ffn.shared_expert.ffn.w_out.abs().sum() == 0


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_experts=0, top_k=1), "num_experts must be >= 1"),
        (dict(num_experts=4, top_k=0), "top_k must be >= 1"),
        (dict(num_experts=4, top_k=5), r"top_k \(5\) must be <= the number of experts"),
        (dict(num_experts=4, top_k=2, granularity=3), r"granularity \(3\) must divide .* d_ff \(128\)"),
        (dict(num_experts=4, top_k=2, every=3), "every=3 selects no block"),
        (dict(num_experts=4, top_k=2, noise=-1.0), "noise must be a finite number >= 0"),
        (dict(num_experts=4, top_k=2, d_ff=7), r"upcycle sets \['d_ff'\] itself"),
        (dict(num_experts=4, top_k=2, router="expert_choice"), "non-causal"),
        (dict(num_experts=4, top_k=2, router="nope"), "unknown router"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ConversionError, match=match):
        upcycle(_dense("tiny-dense"), **kw)


def test_models_without_recognised_ffns():
    with pytest.raises(ConversionError, match="no FFN layers the converter recognises"):
        upcycle(torch.nn.Sequential(torch.nn.Linear(4, 4)), num_experts=2, top_k=1)
    with pytest.raises(ConversionError, match="no FFN layers the converter recognises"):
        upcycle(build_model(get_preset("vit-digits")), num_experts=2, top_k=1)  # not a decoder or encoder
    with pytest.raises(ConversionError, match="no dense FFN layers"):
        upcycle(build_model(get_preset("tiny")), num_experts=2, top_k=1)  # already all MoE
    with pytest.raises(ConversionError, match="already has MoE layers"):
        upcycle(build_model(get_preset("tiny-qwen2-moe")), num_experts=2, top_k=1)  # half MoE
