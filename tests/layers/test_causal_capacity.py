"""Capacity in causal layers: a token's experts depend only on tokens at or before it in its own
sequence (layers/capacity.py), checked against the first-come loop of ops/reference.py, by
perturbing the future, and one token at a time with a CausalState (what a KV cache carries)."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.layers import CausalState
from moekit.layers.capacity import active_assignments, keep_causal
from moekit.ops import reference as ref

# every token-choice router a decoder accepts, with capacity
CAUSAL_ROUTERS = {
    "softmax_topk": dict(top_k=2),
    "switch": dict(top_k=1),
    "gshard": dict(top_k=2),
    "sigmoid_bias": dict(top_k=2),
    "noisy_topk": dict(top_k=2),
}


def _moe(router: str, factor: float = 0.5, **kw) -> MoE:
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, router=router, capacity_factor=factor, causal=True,
                    init_std=0.3, **{**CAUSAL_ROUTERS[router], **kw})
    moe = MoE(cfg)
    with torch.no_grad():
        for name, p in moe.router.named_parameters():
            if name in ("weight", "noise_weight"):
                p.normal_(std=1.0)  # uneven routing, so capacity bites
    return moe


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("router", list(CAUSAL_ROUTERS))
def test_changing_the_future_does_not_change_the_past(router, training):
    """Tokens 8-15 change; tokens 0-7 keep their outputs (the non-causal group order failed this
    in 18 of 20 trials for top-2 with capacity 0.5)."""
    moe = _moe(router).train(training)
    changed = 0
    for trial in range(10):
        torch.manual_seed(trial)
        x = torch.randn(2, 16, 8)
        future = x.clone()
        future[:, 8:] = torch.randn(2, 8, 8) * 3
        torch.manual_seed(100 + trial)  # the same random draws (noise, GShard's second expert)
        a = moe(x)
        torch.manual_seed(100 + trial)
        b = moe(future)
        assert torch.equal(a.output[:, :8], b.output[:, :8]), f"trial {trial}"
        changed += int(not torch.equal(a.output[:, 8:], b.output[:, 8:]))
        assert a.metrics["drop_fraction"].item() > 0  # capacity did bite
    assert changed == 10


@pytest.mark.parametrize("factor,min_capacity", [(0.25, 1), (0.5, 1), (1.0, 2), (1.5, 1)])
@pytest.mark.parametrize("router", ["softmax_topk", "switch", "gshard"])
def test_causal_rule_matches_the_first_come_loop(router, factor, min_capacity):
    moe = _moe(router, factor, min_capacity=min_capacity).train()
    torch.manual_seed(0)
    x = torch.randn(3, 11, 8, requires_grad=True)
    mask = torch.rand(3, 11) > 0.25
    out = moe(x, mask=mask)
    r = out.routing
    active = active_assignments(r, mask.reshape(-1))
    keep = ref.causal_capacity_keep(r.expert_idx_TK, 4, 11, factor, min_capacity, active, mask.reshape(-1))
    expected = ref.token_choice(x.reshape(33, 8), r.expert_idx_TK, r.weight_TK * keep, moe.experts)
    torch.testing.assert_close(out.output.reshape(33, 8), expected, atol=1e-6, rtol=1e-5)
    assert out.metrics["tokens_per_expert"].sum().item() == keep.sum().item()
    offered = int(active.sum())
    assert out.metrics["drop_fraction"].item() == pytest.approx(1 - keep.sum().item() / offered)
    g = torch.randn_like(expected)
    params = [x, moe.experts.w_in, moe.experts.w_out]
    got = torch.autograd.grad((out.output.reshape(33, 8) * g).sum(), params, retain_graph=True)
    want = torch.autograd.grad((expected * g).sum(), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_an_overloaded_expert_fills_up_to_its_capacity():
    """Every token wants expert 0: it takes C(L) of them, first come (not only the first one)."""
    moe = _moe("switch", factor=1.0)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0
    x = torch.randn(1, 16, 8).abs() + 0.1  # positive first feature: expert 0 always wins
    out = moe.eval()(x)
    kept = out.output.abs().sum(-1)[0] > 0
    # C(n) = ceil(n / 4) with top-1 of 4 experts: kept at n = 1, 5, 9, 13 (positions 0, 4, 8, 12)
    assert kept.nonzero().flatten().tolist() == [0, 4, 8, 12]


@pytest.mark.parametrize("router", ["softmax_topk", "gshard", "sigmoid_bias"])
def test_one_token_at_a_time_with_a_state_equals_the_whole_sequence(router):
    moe = _moe(router).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 12, 8)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[0, :3] = False  # left padding of the first sequence
    whole = moe(x, mask=mask).output
    state = CausalState()
    steps = [moe(x[:, :4], mask=mask[:, :4], state=state).output]  # the prompt
    for p in range(4, 12):
        steps.append(moe(x[:, p : p + 1], mask=mask[:, p : p + 1], state=state).output)
    torch.testing.assert_close(torch.cat(steps, dim=1), whole, atol=1e-6, rtol=1e-5)
    assert state.seen_S.tolist() == [9, 12]


def test_state_of_another_batch_is_refused():
    moe = _moe("softmax_topk").eval()
    state = CausalState()
    moe(torch.randn(2, 3, 8), state=state)
    with pytest.raises(ValueError, match="CausalState holds 2 sequences"):
        moe(torch.randn(3, 1, 8), state=state)


def test_causal_rule_vectorised_equals_loop_on_random_cases():
    """keep_causal's running-minimum form against the loop, whole and incremental, over random
    sizes, masks and declined assignments."""
    from moekit.layers.routers.base import TokenChoice

    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        s, length = (int(v) for v in torch.randint(1, 5, (2,), generator=gen))
        length *= 3
        e = int(torch.randint(1, 7, (1,), generator=gen))
        k = int(torch.randint(1, e + 1, (1,), generator=gen))
        t = s * length
        idx = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(t)])
        if trial % 2:  # one popular expert
            idx[:, 0] = 0 if e == 1 else idx[:, 0].clamp_max(1)
            idx = torch.stack([row if len(set(row.tolist())) == k else torch.randperm(e, generator=gen)[:k]
                               for row in idx])
        factor, min_cap = [0.25, 0.5, 1.0, 2.0][trial % 4], 1 + trial % 3
        mask = torch.rand(t, generator=gen) > 0.3 if trial % 3 == 0 else None
        r = TokenChoice(None, None, idx, torch.ones(t, k))
        r.active_TK = torch.rand(t, k, generator=gen) > 0.2 if trial % 5 == 0 else None
        active = active_assignments(r, mask)
        want = ref.causal_capacity_keep(idx, e, length, factor, min_cap, active, mask)
        got = keep_causal(r, e, length, factor, min_cap, active, mask, None).keep_N.view(t, k)
        assert torch.equal(got, want), trial
        state, parts = CausalState(), []
        for p in range(length):
            cols = torch.arange(s) * length + p
            step = TokenChoice(None, None, idx[cols], torch.ones(s, k))
            m = None if mask is None else mask[cols]
            a = None if active is None else active[cols]
            parts.append(keep_causal(step, e, 1, factor, min_cap, a, m, state).keep_N.view(s, k))
        assert torch.equal(torch.stack(parts, 1).reshape(t, k), want), trial


def test_causal_layer_refuses_batch_prioritized_routing():
    with pytest.raises(ValueError, match="overflow_policy"):
        MoEConfig(d_model=8, d_ff=8, num_experts=4, capacity_factor=1.0, causal=True, overflow_policy="score")
