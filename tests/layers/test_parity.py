"""The real dispatch paths against the slow references in ops/reference.py.

Shape table from DESIGN.md: T in {0, 1, 7, 512}, E in {1, 4, 64}, k in {1, 2, E}, float32 and
bfloat16, forward and gradients; plus experts that get no token, capacity with groups and both
overflow policies, expert choice, soft, user expert modules and unaligned widths (fallback path).
"""

import itertools

import pytest
import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.ops import reference as ref

SHAPES = [(t, e, k) for t, e, k in itertools.product([0, 1, 7, 512], [1, 4, 64], [1, 2, "E"])
          if not (k == 2 and e == 1)]


def grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, retain_graph=True, allow_unused=True)


def close(a, b, dtype):
    """Error relative to the reference's largest value. Measured over SHAPES: bfloat16 8.0e-3 at
    worst (bf16 rounding of the hidden rows; the reference reads the same rounded weights and
    inputs in float32), float32 0 (the same sums in the same order); float32 is allowed 2e-6 as
    in tests/ops/test_fast_paths.py, where other summation orders measured 5.2e-7 at worst."""
    err = (a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-3)
    return err.item() <= (2e-2 if dtype == torch.bfloat16 else 2e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T,E,k", SHAPES, ids=[f"T{t}-E{e}-k{k}" for t, e, k in SHAPES])
def test_dropless_matches_reference(T, E, k, dtype):
    k = E if k == "E" else k
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=E, top_k=k, init_std=0.2)).to(dtype)
    x = torch.randn(T, 16, dtype=dtype, requires_grad=True)
    out = moe(x)
    assert out.output.shape == x.shape and out.output.dtype == dtype
    if T == 0:
        assert out.metrics["tokens_per_expert"].sum() == 0
        out.output.sum().backward()  # empty batches still backpropagate
        return
    r = out.routing
    # the reference in float32 on the same (rounded) weights and inputs
    moe32 = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=E, top_k=k))
    moe32.load_state_dict({n: p.float() for n, p in moe.state_dict().items()})
    expected = ref.token_choice(x.float(), r.expert_idx_TK, r.weight_TK, moe32.experts)
    assert close(out.output, expected, dtype)
    assert out.metrics["tokens_per_expert"].sum().item() == T * k
    if dtype == torch.float32:
        g = torch.randn_like(expected)
        params = [x, moe.experts.w_in, moe.experts.w_out, moe.router.weight]
        expected = ref.token_choice(x, r.expert_idx_TK, r.weight_TK, moe.experts)
        for got, want in zip(grads(out.output, params, g), grads(expected, params, g)):
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)


def test_experts_that_get_no_token():
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=8, top_k=2))
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[3, 0] = 10.0  # route on the sign of x[:, 0]
        moe.router.weight[5, 0] = -10.0
        moe.router.weight[6, 1] = 1.0
    x = torch.randn(33, 16, requires_grad=True)
    out = moe(x)
    used = set(out.routing.expert_idx_TK.flatten().tolist())
    assert len(used) < 8
    tpe = out.metrics["tokens_per_expert"]
    assert all(tpe[e] == 0 for e in range(8) if e not in used)
    assert out.metrics["experts_without_tokens"].item() == 8 - len(used)
    expected = ref.token_choice(x, out.routing.expert_idx_TK, out.routing.weight_TK, moe.experts)
    assert torch.allclose(out.output, expected, atol=1e-6)
    out.output.square().sum().backward()
    unused = [e for e in range(8) if e not in used]
    assert moe.experts.w_in.grad[unused].abs().sum() == 0


CAPACITY_CASES = list(itertools.product(
    ["softmax_topk", "switch", "gshard"], [0.5, 1.0, 1.25], [1, 3], ["position", "score"]))


@pytest.mark.parametrize("router,factor,groups,policy", CAPACITY_CASES)
def test_capacity_matches_reference(router, factor, groups, policy):
    k = 1 if router == "switch" else 2
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=k, router=router, capacity_factor=factor,
                    num_groups=groups, overflow_policy=policy, init_std=0.3)
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.router.weight.normal_(std=1.0)  # uneven routing so capacity bites
    x = torch.randn(2, 10, 8, requires_grad=True)  # T = 20, groups of ceil(20 / G)
    out = moe(x)
    r = out.routing
    group_size = -(-20 // groups)
    cap = cfg.capacity(group_size, training=True)
    keep = ref.capacity_keep(r.expert_idx_TK, 4, group_size, cap, r.active_TK,
                             r.priority_T if policy == "score" else None)
    expected = ref.token_choice(x.reshape(20, 8), r.expert_idx_TK, r.weight_TK * keep, moe.experts)
    assert torch.allclose(out.output.reshape(20, 8), expected, atol=1e-6)
    offered = 20 * k if r.active_TK is None else int(r.active_TK.sum())
    assert out.metrics["drop_fraction"].item() == pytest.approx(1 - keep.sum().item() / offered)
    assert out.metrics["tokens_per_expert"].sum().item() == keep.sum().item()
    assert (out.metrics["tokens_per_expert"] <= cap * groups).all()
    g = torch.randn_like(expected)
    params = [x, moe.experts.w_in, moe.experts.w_out, moe.router.weight]
    for got, want in zip(grads(out.output.reshape(20, 8), params, g), grads(expected, params, g)):
        assert torch.allclose(got, want, atol=1e-5)


def test_score_policy_keeps_the_most_confident_tokens():
    cfg = MoEConfig(d_model=4, d_ff=8, num_experts=4, top_k=1, router="switch", capacity_factor=1.0,
                    overflow_policy="score")
    moe = MoE(cfg).eval()
    with torch.no_grad():
        moe.router.weight.copy_(torch.eye(4))
    # all 4 tokens want expert 0 (C = 1); the one with the highest gate wins, not the first one
    x = torch.tensor([[1.0, 0, 0, 0], [3.0, 0, 0, 0], [2.0, 0, 0, 0], [0.5, 0, 0, 0]])
    out = moe(x)
    kept = out.output.abs().sum(-1) > 0
    assert kept.tolist() == [False, True, False, False]
    cfg.overflow_policy = "position"
    out = MoE(cfg).eval()
    out.load_state_dict(moe.state_dict())
    assert (out(x).output.abs().sum(-1) > 0).tolist() == [True, False, False, False]


def test_large_capacity_equals_dropless():
    base = dict(d_model=16, d_ff=32, num_experts=8, top_k=2, router="softmax_topk")
    dropless = MoE(MoEConfig(**base))
    capped = MoE(MoEConfig(**base, capacity_factor=8.0, num_groups=4))
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(3, 16, 16)
    a, b = dropless(x), capped(x)
    assert torch.allclose(a.output, b.output, atol=1e-6)
    assert b.metrics["drop_fraction"].item() == 0.0


def test_single_expert_top1_is_the_dense_ffn():
    for activation in ["swiglu", "gelu", "relu"]:
        moe = MoE(MoEConfig(d_model=12, d_ff=20, num_experts=1, top_k=1, activation=activation))
        w_in, w_out = moe.experts.w_in[0], moe.experts.w_out[0]
        x = torch.randn(4, 5, 12)
        if activation == "swiglu":
            gate, up = nn.Linear(12, 20, bias=False), nn.Linear(12, 20, bias=False)
            gate.weight.data, up.weight.data = w_in[:20].detach(), w_in[20:].detach()
            hidden = nn.functional.silu(gate(x)) * up(x)
        else:
            lin = nn.Linear(12, 20, bias=False)
            lin.weight.data = w_in.detach()
            hidden = {"gelu": nn.functional.gelu, "relu": nn.functional.relu}[activation](lin(x))
        down = nn.Linear(20, 12, bias=False)
        down.weight.data = w_out.detach()
        assert torch.allclose(moe(x).output, down(hidden), atol=1e-6)


def test_expert_choice_matches_reference():
    moe = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, router="expert_choice", init_std=0.3))
    with torch.no_grad():
        moe.router.weight.normal_()
    x = torch.randn(24, 8, requires_grad=True)
    out = moe(x)
    r = out.routing
    expected = ref.expert_choice(x, r.token_idx_EC, r.weight_EC, moe.experts)
    assert torch.allclose(out.output, expected, atol=1e-6)
    untaken = 24 - len(set(r.token_idx_EC.flatten().tolist()))
    assert out.metrics["drop_fraction"].item() == pytest.approx(untaken / 24)
    g = torch.randn_like(expected)
    params = [x, moe.experts.w_in, moe.router.weight]
    for got, want in zip(grads(out.output, params, g), grads(expected, params, g)):
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("slots", [1, 3])
def test_soft_matches_reference(slots):
    moe = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=1, router="soft",
                        router_options={"slots_per_expert": slots}, init_std=0.3))
    x = torch.randn(3, 5, 8, requires_grad=True)
    out = moe(x)
    r = out.routing
    expected = ref.soft(x, r.dispatch_BNX, r.combine_BNX, moe.experts)
    assert torch.allclose(out.output, expected, atol=1e-6)
    g = torch.randn_like(expected)
    params = [x, moe.experts.w_in, moe.router.slot_weight]
    for got, want in zip(grads(out.output, params, g), grads(expected, params, g)):
        assert torch.allclose(got, want, atol=1e-5)


def test_soft_sequences_do_not_mix():
    moe = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=2, top_k=1, router="soft"))
    x = torch.randn(2, 6, 8)
    both = moe(x).output
    alone = moe(x[:1]).output
    assert torch.allclose(both[:1], alone, atol=1e-6)


def test_dense_router_matches_reference():
    moe = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=5, top_k=1, router="dense"))
    x = torch.randn(9, 8)
    out = moe(x)
    probs = out.routing.probs_TE
    expected = sum(probs[:, e : e + 1] * ref.run_expert(moe.experts, e, x) for e in range(5))
    assert torch.allclose(out.output, expected, atol=1e-6)


def test_user_expert_modules():
    experts = [nn.Sequential(nn.Linear(6, 11), nn.Tanh(), nn.Linear(11, 6)) for _ in range(3)]
    experts.append(nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 9), nn.GELU(), nn.Linear(9, 6)))
    moe = MoE(MoEConfig(d_model=6, d_ff=1, num_experts=4, top_k=2), experts=experts)
    x = torch.randn(13, 6, requires_grad=True)
    out = moe(x)
    expected = ref.token_choice(x, out.routing.expert_idx_TK, out.routing.weight_TK, moe.experts)
    assert torch.allclose(out.output, expected, atol=1e-6)
    out.output.sum().backward()
    assert all(m[0].weight.grad is not None for m in experts if out.metrics["tokens_per_expert"][experts.index(m)] > 0)
    capped = MoE(MoEConfig(d_model=6, d_ff=1, num_experts=4, top_k=2, capacity_factor=0.5), experts=experts)
    assert capped(x).metrics["drop_fraction"] > 0


def test_unaligned_widths_take_the_fallback_and_agree():
    moe = MoE(MoEConfig(d_model=6, d_ff=10, num_experts=3, top_k=2, expert_bias=True))
    with torch.no_grad():
        moe.experts.b_in.normal_()
        moe.experts.b_out.normal_()
    x = torch.randn(11, 6)
    out = moe(x)
    expected = ref.token_choice(x, out.routing.expert_idx_TK, out.routing.weight_TK, moe.experts)
    assert torch.allclose(out.output, expected, atol=1e-6)


def test_shared_expert_with_gate_adds_sigmoid_scaled_ffn():
    moe = MoE(MoEConfig(d_model=8, d_ff=16, num_experts=4, top_k=2, num_shared_experts=2,
                        shared_expert_gate=True))
    assert moe.shared_expert.ffn.d_ff == 32  # d_ff * num_shared_experts
    x = torch.randn(7, 8)
    out = moe(x)
    routed = ref.token_choice(x, out.routing.expert_idx_TK, out.routing.weight_TK, moe.experts)
    shared = ref.run_expert(moe.shared_expert.ffn, 0, x)
    gate = torch.sigmoid(x @ moe.shared_expert.gate.weight.t())
    assert torch.allclose(out.output, routed + gate * shared, atol=1e-6)


ROUTER_CASES = [
    ("dense", {}), ("noisy_topk", {}), ("switch", {"top_k": 1, "capacity_factor": 1.0}),
    ("gshard", {"capacity_factor": 1.5, "num_groups": 2}), ("softmax_topk", {}),
    ("softmax_topk", {"capacity_factor": 0.75, "overflow_policy": "score"}),
    ("sigmoid_bias", {"router_options": {"n_group": 2, "topk_group": 1}}),
    ("expert_choice", {}), ("soft", {"router_options": {"slots_per_expert": 2}}),
]


@pytest.mark.parametrize("router,kw", ROUTER_CASES, ids=[c[0] + str(i) for i, c in enumerate(ROUTER_CASES)])
def test_gradcheck_float64(router, kw):
    kw = {"top_k": 2, **kw}
    cfg = MoEConfig(d_model=4, d_ff=3, num_experts=4, router=router, expert_bias=True, z_loss_coef=0.1,
                    init_std=0.5, **kw)
    moe = MoE(cfg).double().eval()  # eval: no sampling, so the function is deterministic
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(std=0.5)
    names = [n for n, _ in moe.named_parameters()]
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    params = [p.detach().clone().requires_grad_() for p in moe.parameters()]

    def f(x, *ps):
        out = torch.func.functional_call(moe, dict(zip(names, ps)), (x,))
        return out.output, out.aux_loss

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)
