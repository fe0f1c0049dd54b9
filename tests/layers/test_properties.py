"""Property tests: random configs and inputs never crash and keep the invariants.

The examples and their number come from the hypothesis profile (tests/conftest.py): fixed in
`make test` and CI, random with `--hypothesis-profile=explore`.
"""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import ROUTERS, MoE, MoEConfig


@st.composite
def configs(draw):
    router = draw(st.sampled_from(list(ROUTERS)))
    num_experts = draw(st.integers(1, 9))
    if router == "gshard":
        num_experts = max(2, num_experts)
    top_k = {"switch": 1, "gshard": 2}.get(router, draw(st.integers(1, num_experts)))
    capacity = None
    if router not in ("dense", "soft"):
        capacity = draw(st.one_of(st.none(), st.floats(0.1, 3.0)))
    options = None
    if router == "sigmoid_bias":
        divisors = [g for g in range(1, num_experts + 1) if num_experts % g == 0]
        n_group = draw(st.sampled_from(divisors))
        per_group = num_experts // n_group
        topk_group = draw(st.integers(max(1, -(-top_k // per_group)), n_group))
        options = {"n_group": n_group, "topk_group": topk_group}
    cfg = MoEConfig(
        d_model=draw(st.sampled_from([4, 6, 8])), d_ff=draw(st.integers(1, 12)), num_experts=num_experts,
        top_k=top_k, router=router, capacity_factor=capacity, router_options=options,
        num_groups=draw(st.integers(1, 3)) if router != "expert_choice" else 1,
        overflow_policy=draw(st.sampled_from(["position", "score"])),
        activation=draw(st.sampled_from(["swiglu", "gelu", "relu"])),
        num_shared_experts=draw(st.integers(0, 1)), z_loss_coef=draw(st.sampled_from([0.0, 1e-3])),
    )
    return cfg


@given(cfg=configs(), batch=st.integers(0, 3), seq=st.integers(1, 9), training=st.booleans(),
       scale=st.sampled_from([0.01, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_random_configs_keep_invariants(cfg, batch, seq, training, scale, seed):
    torch.manual_seed(seed)
    moe = MoE(cfg).train(training)
    x = torch.randn(batch, seq, cfg.d_model) * scale
    out = moe(x)
    assert out.output.shape == x.shape
    assert torch.isfinite(out.output).all()
    assert torch.isfinite(out.aux_loss)
    m = out.metrics
    drop = m["drop_fraction"].item()
    assert 0.0 <= drop <= 1.0
    tokens = batch * seq
    if tokens == 0 or cfg.router in ("soft", "expert_choice"):
        return
    routing = out.routing
    offered = tokens * cfg.effective_top_k if routing.active_TK is None else int(routing.active_TK.sum())
    assert math.isclose(m["tokens_per_expert"].sum().item(), offered * (1 - drop), abs_tol=1e-3)
    if cfg.capacity_factor is None:
        assert drop == 0.0


def test_ci_profile_runs_fixed_examples(pytestconfig):
    """Unless exploring, the property tests are derandomized and read no example database (a
    failure saved in .hypothesis/ by an earlier run would otherwise be replayed first), so every
    run of `make test` checks the same 150 examples."""
    chosen = pytestconfig.getoption("hypothesis_profile", None) or os.environ.get("MOEKIT_HYPOTHESIS_PROFILE", "ci")
    if chosen != "ci":
        pytest.skip(f"the {chosen!r} hypothesis profile is selected")
    assert settings.default.derandomize and settings.default.database is None
    assert settings.default.max_examples == 150
