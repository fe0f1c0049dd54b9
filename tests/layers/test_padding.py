"""A padding mask changes nothing for the real tokens: the same sequences with padding inserted
give the real tokens the outputs, losses and routing metrics they get without it, for every
router, dropless and with capacity, causal and not."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig

CASES = [
    # (router, extra MoEConfig fields)
    ("softmax_topk", {}),
    ("softmax_topk", {"capacity_factor": 0.5}),
    ("softmax_topk", {"capacity_factor": 0.75, "num_groups": 3, "overflow_policy": "score"}),
    ("softmax_topk", {"capacity_factor": 0.5, "causal": True}),
    ("softmax_topk", {"z_loss_coef": 0.1}),
    ("switch", {"top_k": 1, "capacity_factor": 1.0}),
    ("gshard", {"capacity_factor": 1.0, "num_groups": 2}),
    ("noisy_topk", {}),
    ("dense", {}),
    ("sigmoid_bias", {"capacity_factor": 0.5, "causal": True}),
    ("sigmoid_bias", {}),
    ("expert_choice", {}),
    ("expert_choice", {"capacity_factor": 0.5, "num_groups": 2}),
    ("soft", {}),
]


def _moe(router, extra, training):
    kw = {"top_k": 2, **extra}
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, router=router, init_std=0.3, **kw)
    moe = MoE(cfg).train(training)
    with torch.no_grad():
        for name, p in moe.router.named_parameters():
            if name in ("weight", "noise_weight", "slot_weight"):
                p.normal_(std=1.0)
    return moe


def _padded(x_BLD: torch.Tensor, pads_per_seq: int, gen: torch.Generator):
    """The same sequences with `pads_per_seq` padding tokens inserted at random places."""
    b, length, d = x_BLD.shape
    total = length + pads_per_seq
    out = torch.randn(b, total, d, generator=gen) * 5  # padding holds garbage
    mask = torch.zeros(b, total, dtype=torch.bool)
    for i in range(b):
        real = torch.sort(torch.randperm(total, generator=gen)[:length]).values
        out[i, real] = x_BLD[i]
        mask[i, real] = True
    return out, mask


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("router,extra", CASES)
def test_padding_changes_nothing_for_the_real_tokens(router, extra, training):
    moe = _moe(router, extra, training)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 8, generator=gen)
    xp, mask = _padded(x, 4, gen)
    torch.manual_seed(1)  # the same random draws for the router where it samples in training
    want = moe(x)
    if router == "sigmoid_bias":
        moe.router.expert_bias.zero_()  # a training forward moved it; start the padded run alike
    torch.manual_seed(1)
    got = moe(xp, mask=mask)
    if router in ("noisy_topk", "gshard") and training:
        # their noise is drawn per token, padding included, so the draws differ: compare shapes
        assert got.output.shape == xp.shape and (got.output[~mask] == 0).all()
        return
    torch.testing.assert_close(got.output[mask].reshape(x.shape), want.output, atol=1e-6, rtol=1e-5)
    assert (got.output[~mask] == 0).all()
    torch.testing.assert_close(got.aux_loss, want.aux_loss, atol=1e-6, rtol=1e-5)
    for key in ("tokens_per_expert", "drop_fraction", "router_entropy", "load_imbalance"):
        torch.testing.assert_close(got.metrics[key], want.metrics[key], atol=1e-6, rtol=1e-5, msg=key)


def test_padding_takes_no_capacity():
    """With capacity 0.5 the padded tokens would take slots (and drop real tokens) if routed."""
    moe = _moe("softmax_topk", {"capacity_factor": 0.5}, training=False)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, 8, 8, generator=gen)
    xp, mask = _padded(x, 24, gen)
    full = moe(xp)  # the padding routed as tokens
    masked = moe(xp, mask=mask)
    alone = moe(x)
    torch.testing.assert_close(masked.output[mask], alone.output[0], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(full.output[mask], alone.output[0], atol=1e-4)


def test_all_padding_gives_zeros_that_still_backpropagate():
    moe = _moe("softmax_topk", {}, training=True)
    x = torch.randn(2, 3, 8, requires_grad=True)
    out = moe(x, mask=torch.zeros(2, 3, dtype=torch.bool))
    assert (out.output == 0).all() and out.aux_loss.item() == 0.0
    (out.output.sum() + out.aux_loss).backward()


def test_a_mask_of_the_wrong_shape_or_dtype_is_refused():
    moe = _moe("softmax_topk", {}, training=False)
    with pytest.raises(ValueError, match=r"leading shape \(2, 3\)"):
        moe(torch.randn(2, 3, 8), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        moe(torch.randn(2, 3, 8), mask=torch.ones(2, 3))


def test_sigmoid_bias_load_counts_only_real_tokens():
    moe = _moe("sigmoid_bias", {"router_options": {"bias_update": "manual"}}, training=True)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[:, :2] = True
    moe(torch.randn(2, 5, 8), mask=mask)
    assert moe.router.load_accumulator.sum().item() == 2 * 2 * 2  # 4 real tokens x top-2
