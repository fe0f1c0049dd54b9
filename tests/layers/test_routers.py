"""Each router on a hand-worked example: logits are set so the expected choice is computed by hand.

With d_model == num_experts and the gate weight set to the identity, the router logits equal the
input, so every number below follows from the input on paper.
"""

import math

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.layers.routers import ExpertChoice, SoftRouting, TokenChoice


def make_router(router, num_experts=4, top_k=2, **kw):
    cfg = MoEConfig(d_model=num_experts, d_ff=8, num_experts=num_experts, top_k=top_k, router=router, **kw)
    moe = MoE(cfg)
    with torch.no_grad():
        if hasattr(moe.router, "weight"):
            moe.router.weight.copy_(torch.eye(num_experts))
    return moe.router


def sm(values):
    e = [math.exp(v) for v in values]
    return [v / sum(e) for v in e]


def test_softmax_topk_renormalised_and_not():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    r = make_router("softmax_topk").eval()
    out = r(x, seq_len=1)
    assert isinstance(out, TokenChoice)
    assert out.expert_idx_TK.tolist() == [[2, 1]]
    # renormalised: e^3 / (e^3 + e^2) = 1 / (1 + e^-1)
    assert out.weight_TK[0, 0].item() == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-6)
    assert out.weight_TK[0].sum().item() == pytest.approx(1.0, rel=1e-6)
    r = make_router("softmax_topk", router_options={"norm_topk_prob": False}).eval()
    out = r(x, seq_len=1)
    p = sm([1, 2, 3, 0])
    assert out.weight_TK[0].tolist() == pytest.approx([p[2], p[1]], rel=1e-6)


def test_softmax_topk_load_balancing_loss_by_hand():
    # two tokens, E=2, k=1: both pick expert 0, f = [1, 0]
    r = make_router("softmax_topk", num_experts=2, top_k=1).eval()
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    out = r(x, seq_len=2)
    p0 = (sm([1, 0])[0] + sm([2, 0])[0]) / 2
    # E * sum f_e P_e = 2 * (1 * p0 + 0)
    assert out.losses["load_balancing_loss"].item() == pytest.approx(2 * p0, rel=1e-6)
    assert out.aux_loss.item() == pytest.approx(0.01 * 2 * p0, rel=1e-6)


def test_switch_top1_weight_is_the_unnormalised_probability():
    r = make_router("switch", top_k=1).eval()
    out = r(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), seq_len=1)
    assert out.expert_idx_TK.tolist() == [[2]]
    assert out.weight_TK.item() == pytest.approx(sm([1, 2, 3, 0])[2], rel=1e-6)


def test_switch_jitter_only_in_training():
    r = make_router("switch", top_k=1, router_options={"jitter_eps": 0.5})
    x = torch.tensor([[1.0, 1.05, 0.0, 0.0]]).repeat(200, 1)
    r.eval()
    assert (r(x, 200).expert_idx_TK == 1).all()  # deterministic without jitter
    r.train()
    picks = r(x, 200).expert_idx_TK.flatten()
    assert (picks == 0).any() and (picks == 1).any()  # jitter flips close calls


def test_gshard_top2_weights_and_random_second_expert():
    r = make_router("gshard").eval()
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0]])
    out = r(x, seq_len=1)
    g1, g2 = 1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))
    assert out.expert_idx_TK.tolist() == [[2, 1]]
    assert out.weight_TK[0].tolist() == pytest.approx([g1, g2], rel=1e-6)
    assert out.active_TK is None  # evaluation keeps both experts
    r.train()
    n = 20000
    out = r(x.repeat(n, 1), seq_len=n)
    assert out.active_TK[:, 0].all()
    kept = out.active_TK[:, 1].float().mean().item()
    # second expert kept with probability 2 * g2 = 0.538; 4 sigma of a binomial mean is 0.014
    assert kept == pytest.approx(2 * g2, abs=0.014)


def test_gshard_aux_loss_counts_first_choices_per_group():
    r = make_router("gshard", num_experts=2, num_groups=2).eval()
    # group 0: both tokens pick expert 0 first; group 1: one token each
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    out = r(x, seq_len=4)
    pa, pb = sm([1, 0]), sm([0, 1])
    group0 = 2 * (1.0 * pa[0] + 0.0 * pa[1])
    m1 = [(pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2]
    group1 = 2 * (0.5 * m1[0] + 0.5 * m1[1])
    assert out.losses["gshard_aux_loss"].item() == pytest.approx((group0 + group1) / 2, rel=1e-6)


def test_noisy_topk_eval_is_softmax_over_top_k():
    r = make_router("noisy_topk").eval()
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    out = r(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), seq_len=1)
    assert out.expert_idx_TK.tolist() == [[2, 1]]
    assert out.weight_TK[0].tolist() == pytest.approx(sm([3, 2]), rel=1e-6)


def test_noisy_topk_smooth_load_by_hand(monkeypatch):
    r = make_router("noisy_topk").train()
    with torch.no_grad():
        r.weight.copy_(torch.eye(4))
    # zero noise sample: H = clean logits, std = softplus(0) + 1e-2
    monkeypatch.setattr(torch, "randn_like", lambda t: torch.zeros_like(t))
    out = r(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), seq_len=1)
    s = math.log(2) + 1e-2
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    # chosen experts 2, 1 compare with the 3rd largest (1); unchosen 0, 3 with the 2nd largest (2)
    load = [phi((1 - 2) / s), phi((2 - 1) / s), phi((3 - 1) / s), phi((0 - 2) / s)]
    mean = sum(load) / 4
    cv2 = sum((v - mean) ** 2 for v in load) / 4 / mean**2
    assert out.losses["load_loss"].item() == pytest.approx(cv2, rel=1e-5)
    gates = [0, sm([3, 2])[1], sm([3, 2])[0], 0]  # importance over one token = its gates
    gmean = sum(gates) / 4
    assert out.losses["importance_loss"].item() == pytest.approx(
        sum((g - gmean) ** 2 for g in gates) / 4 / gmean**2, rel=1e-5)


def test_noisy_topk_noise_is_learnable():
    r = make_router("noisy_topk").train()
    out = r(torch.randn(64, 4), seq_len=64)
    out.losses["load_loss"].backward()
    assert r.noise_weight.grad is not None and r.noise_weight.grad.abs().sum() > 0


def sig(v):
    return 1 / (1 + math.exp(-v))


def test_sigmoid_bias_group_limited_selection_by_hand():
    r = make_router("sigmoid_bias", router_options={"n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5})
    r.eval()
    # group {0,1} scores s(2)+s(1.5) = 1.698 > group {2,3} s(3)+s(-3) = 1.0, so expert 2 (the
    # single best) is not eligible.
    out = r(torch.tensor([[2.0, 1.5, 3.0, -3.0]]), seq_len=1)
    assert out.expert_idx_TK.tolist() == [[0, 1]]
    s0, s1 = sig(2.0), sig(1.5)
    assert out.weight_TK[0].tolist() == pytest.approx([2.5 * s0 / (s0 + s1), 2.5 * s1 / (s0 + s1)], rel=1e-6)


def test_sigmoid_bias_bias_selects_but_does_not_weight():
    r = make_router("sigmoid_bias").eval()
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))
    out = r(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), seq_len=1)
    assert out.expert_idx_TK.tolist() == [[3, 2]]  # the bias pulls expert 3 in
    s3, s2 = sig(0.0), sig(3.0)
    assert out.weight_TK[0].tolist() == pytest.approx([s3 / (s3 + s2), s2 / (s3 + s2)], rel=1e-6)


def _moe_of(router):
    """The MoE layer around a router from make_router: the layer reports the load (a router's
    forward has no side effects, layers/routers/base.py)."""
    moe = MoE(router.cfg)
    moe.router = router
    return moe


def test_sigmoid_bias_sign_update_rule():
    r = make_router("sigmoid_bias", top_k=1, router_options={"bias_update_rate": 0.1}).train()
    moe = _moe_of(r).train()
    # 3 tokens to expert 2, 1 to expert 1: mean load 1 -> expert 2 overloaded (-0.1), 1 at mean
    # (0), experts 0 and 3 underloaded (+0.1)
    x = torch.tensor([[0.0, 0, 5, 0], [0, 0, 5, 0], [0, 0, 5, 0], [0, 5, 0, 0]])
    r(x, seq_len=4)  # the router alone: no side effect
    assert r.expert_bias.abs().sum() == 0 and r.load_accumulator.sum() == 0
    moe(x)
    assert r.expert_bias.tolist() == pytest.approx([0.1, 0.0, -0.1, 0.1])
    moe.eval()
    moe(x)  # no update outside training
    assert r.expert_bias.tolist() == pytest.approx([0.1, 0.0, -0.1, 0.1])


def test_sigmoid_bias_manual_update_accumulates_until_applied():
    r = make_router("sigmoid_bias", top_k=1, router_options={"bias_update": "manual", "bias_update_rate": 0.1})
    moe = _moe_of(r).train()
    x = torch.tensor([[0.0, 0, 5, 0], [0, 0, 5, 0]])
    moe(x)
    moe(x)
    assert r.expert_bias.abs().sum() == 0
    assert r.load_accumulator.tolist() == [0, 0, 4, 0]
    r.apply_bias_update()
    assert r.expert_bias.tolist() == pytest.approx([0.1, 0.1, -0.1, 0.1])
    assert r.load_accumulator.sum() == 0


def test_sequence_balance_loss_by_hand():
    from moekit.layers import losses as L

    scores = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    idx = torch.tensor([[0], [0]])
    # f = E/(K N) * counts = 2/2 * [2, 0] = [2, 0]; P = mean of s/sum s = [(0.9+0.2)/2, ...]
    p0 = (0.9 + 0.2) / 2
    assert L.sequence_balance_loss(scores, idx, seq_len=2).item() == pytest.approx(2 * p0, rel=1e-6)
    # per sequence then averaged: two sequences of one token each
    seq1 = 2 * 0.9
    seq2 = 2 * 0.2
    assert L.sequence_balance_loss(scores, idx, seq_len=1).item() == pytest.approx((seq1 + seq2) / 2, rel=1e-6)


def test_expert_choice_each_expert_takes_its_top_tokens():
    r = make_router("expert_choice", num_experts=2, top_k=1).eval()
    # probs of expert 0: t0 0.73, t1 0.27, t2 0.5, t3 0.88 -> expert 0 takes t3, t0 (C = 4*1/2)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [2.0, 0.0]])
    out = r(x, seq_len=4)
    assert isinstance(out, ExpertChoice)
    assert out.token_idx_EC.tolist() == [[3, 0], [1, 2]]
    assert out.weight_EC[0].tolist() == pytest.approx([sm([2, 0])[0], sm([1, 0])[0]], rel=1e-6)


def test_expert_choice_capacity_factor_and_groups():
    r = make_router("expert_choice", num_experts=2, top_k=1, capacity_factor=2.0, num_groups=2).eval()
    out = r(torch.randn(8, 2), seq_len=8)
    # per group of 4 tokens, C = ceil(4 * 2 / 2) = 4 (every token), indices stay inside the group
    assert out.token_idx_EC.shape == (2, 8)
    assert sorted(out.token_idx_EC[0, :4].tolist()) == [0, 1, 2, 3]
    assert sorted(out.token_idx_EC[0, 4:].tolist()) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="num_groups"):
        r(torch.randn(7, 2), seq_len=7)


def test_soft_routing_dispatch_and_combine_are_softmaxes():
    r = make_router("soft", num_experts=2, top_k=1, router_options={"slots_per_expert": 2, "normalize": False})
    with torch.no_grad():
        r.slot_weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    x = torch.tensor([[[1.0, 2.0], [3.0, -1.0], [0.0, 0.5]]])  # (B=1, N=3, D=2)
    out = r(x.reshape(3, 2), seq_len=3)
    assert isinstance(out, SoftRouting)
    logits = x[0] @ r.slot_weight.t()  # (N, slots)
    assert torch.allclose(out.dispatch_BNX[0], logits.softmax(dim=0))
    assert torch.allclose(out.combine_BNX[0], logits.softmax(dim=1))
    assert torch.allclose(out.probs_TE, logits.softmax(dim=1).view(3, 2, 2).sum(-1))


def test_dense_gate_uses_every_expert():
    r = make_router("dense").eval()
    out = r(torch.tensor([[1.0, 2.0, 3.0, 0.0]]), seq_len=1)
    assert out.expert_idx_TK.tolist() == [[0, 1, 2, 3]]
    assert out.weight_TK[0].tolist() == pytest.approx(sm([1, 2, 3, 0]), rel=1e-6)


def test_z_loss_by_hand():
    r = make_router("softmax_topk", z_loss_coef=0.5).eval()
    out = r(torch.zeros(3, 4), seq_len=3)
    # logsumexp of four zeros is log 4
    assert out.losses["z_loss"].item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    assert out.aux_loss.item() == pytest.approx(0.01 * 1.0 + 0.5 * math.log(4) ** 2, rel=1e-6)


def test_router_logits_are_float32_for_bf16_input():
    moe = MoE(MoEConfig(d_model=16, d_ff=16, num_experts=4)).to(torch.bfloat16)
    out = moe(torch.randn(5, 16, dtype=torch.bfloat16))
    assert out.routing.logits_TE.dtype == torch.float32
    assert out.output.dtype == torch.bfloat16


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_topk_native_decode_path_equals_the_torch_ops(native_kernel, monkeypatch, norm):
    """Without gradient, with at most 32 tokens on CPU, the router runs in one native call
    (ops/decode.py); it gives the torch ops' routing, probabilities, losses and aux loss."""
    from moekit.ops import native

    calls = []
    real = native.route_softmax_topk
    monkeypatch.setattr(native, "route_softmax_topk", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=32, d_ff=16, num_experts=16, top_k=4, z_loss_coef=0.1,
                    router_options={"norm_topk_prob": norm})
    router = MoE(cfg).router
    x = torch.randn(32, 32)
    with torch.no_grad():
        fast = router(x, seq_len=32)
    assert calls == [32]
    slow = router(x, seq_len=32)  # the weight requires grad: the torch ops
    assert calls == [32] and slow.aux_loss.requires_grad
    assert torch.equal(fast.expert_idx_TK, slow.expert_idx_TK)
    for name in ("logits_TE", "probs_TE", "weight_TK", "priority_T", "aux_loss"):
        torch.testing.assert_close(getattr(fast, name), getattr(slow, name).detach(), msg=name)
    assert fast.losses.keys() == slow.losses.keys() == {"load_balancing_loss", "z_loss"}
    for name in fast.losses:
        torch.testing.assert_close(fast.losses[name], slow.losses[name].detach(), msg=name)
    with torch.no_grad():
        router(torch.randn(33, 32), seq_len=33)  # more than 32 tokens: the torch ops
    assert calls == [32]


def test_z_loss_and_balance_by_hand_without_gradient(native_kernel, monkeypatch):
    """The by-hand values above, on the native decode path where it is built."""
    from moekit.ops import native

    calls = []
    real = native.route_softmax_topk
    monkeypatch.setattr(native, "route_softmax_topk", lambda *a: calls.append(1) or real(*a))
    r = make_router("softmax_topk", z_loss_coef=0.5).eval()
    with torch.no_grad():
        out = r(torch.zeros(3, 4), seq_len=3)
    assert calls == [1]
    assert out.losses["z_loss"].item() == pytest.approx(math.log(4) ** 2, rel=1e-6)
    assert out.aux_loss.item() == pytest.approx(0.01 * 1.0 + 0.5 * math.log(4) ** 2, rel=1e-6)
    r = make_router("softmax_topk", num_experts=2, top_k=1).eval()
    with torch.no_grad():
        out = r(torch.tensor([[1.0, 0.0], [2.0, 0.0]]), seq_len=2)
    p0 = (sm([1, 0])[0] + sm([2, 0])[0]) / 2
    assert out.expert_idx_TK.tolist() == [[0], [0]] and calls == [1, 1]
    assert out.losses["load_balancing_loss"].item() == pytest.approx(2 * p0, rel=1e-6)
    assert set(out.losses) == {"load_balancing_loss"}  # no z-loss entry when its coefficient is 0
