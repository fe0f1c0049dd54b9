"""Every MoEConfig field is validated with an error that names it."""

import pytest

from moekit import MoE, MoEConfig

BASE = dict(d_model=16, d_ff=32, num_experts=4, top_k=2)


@pytest.mark.parametrize(
    "override, exc, fragment",
    [
        (dict(d_model=0), ValueError, "d_model"),
        (dict(d_model=16.0), TypeError, "d_model"),
        (dict(d_ff=-1), ValueError, "d_ff"),
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(top_k=0), ValueError, "top_k"),
        (dict(top_k=5), ValueError, "top_k"),
        (dict(router="hash"), ValueError, "softmax_topk"),  # lists valid names
        (dict(capacity_factor=0.0), ValueError, "capacity_factor"),
        (dict(capacity_factor=-1.0), ValueError, "capacity_factor"),
        (dict(capacity_factor="big"), TypeError, "capacity_factor"),
        (dict(eval_capacity_factor=0), ValueError, "eval_capacity_factor"),
        (dict(num_groups=0), ValueError, "num_groups"),
        (dict(min_capacity=0), ValueError, "min_capacity"),
        (dict(overflow_policy="random"), ValueError, "overflow_policy"),
        (dict(activation="tanh"), ValueError, "swiglu"),
        (dict(expert_bias=1), TypeError, "expert_bias"),
        (dict(num_shared_experts=-1), ValueError, "num_shared_experts"),
        (dict(shared_d_ff=0), ValueError, "shared_d_ff"),
        (dict(shared_expert_gate=True), ValueError, "shared_expert_gate"),
        (dict(aux_loss_coef=-0.1), ValueError, "aux_loss_coef"),
        (dict(z_loss_coef=float("nan")), TypeError, "z_loss_coef"),
        (dict(init_std=0), ValueError, "init_std"),
        (dict(causal="yes"), TypeError, "causal"),
        (dict(router="switch"), ValueError, "top_k"),  # switch is top-1
        (dict(router="gshard", top_k=1), ValueError, "top_k"),
        (dict(router="dense", capacity_factor=1.0), ValueError, "capacity_factor"),
        (dict(router="soft", capacity_factor=1.0), ValueError, "capacity_factor"),
        (dict(router="expert_choice", causal=True), ValueError, "causal"),
        (dict(router="soft", causal=True), ValueError, "non-causal"),
        (dict(router_options={"nope": 1}), ValueError, "norm_topk_prob"),  # lists allowed keys
        (dict(router_options=3), TypeError, "router_options"),
        (dict(router="sigmoid_bias", router_options={"n_group": 3}), ValueError, "n_group"),
        (dict(router="sigmoid_bias", router_options={"n_group": 2, "topk_group": 3}), ValueError, "topk_group"),
        (dict(router="sigmoid_bias", router_options={"bias_update": "never"}), ValueError, "bias_update"),
        (dict(router="sigmoid_bias", router_options={"routed_scaling_factor": 0}), ValueError, "routed_scaling"),
        (dict(router="sigmoid_bias", router_options={"bias_update_rate": -1}), ValueError, "bias_update_rate"),
        (dict(router="noisy_topk", router_options={"noise_epsilon": 0}), ValueError, "noise_epsilon"),
        (dict(router="switch", top_k=1, router_options={"jitter_eps": 1.5}), ValueError, "jitter_eps"),
        (dict(router="gshard", router_options={"second_expert_policy": "x"}), ValueError, "second_expert_policy"),
        (dict(router="soft", router_options={"slots_per_expert": 0}), ValueError, "slots_per_expert"),
        (dict(router="softmax_topk", router_options={"norm_topk_prob": 1}), TypeError, "norm_topk_prob"),
    ],
)
def test_bad_config_names_the_field(override, exc, fragment):
    with pytest.raises(exc, match=fragment):
        cfg = MoEConfig(**{**BASE, **override})
        MoE(cfg)  # some checks (n_group divides E) happen when the router is built


def test_sigmoid_bias_top_k_must_fit_the_eligible_groups():
    cfg = MoEConfig(d_model=8, d_ff=8, num_experts=8, top_k=3, router="sigmoid_bias",
                    router_options={"n_group": 4, "topk_group": 1})
    with pytest.raises(ValueError, match="topk_group"):
        MoE(cfg)


def test_router_options_accepts_dict_and_dataclass():
    from moekit.layers.routers.sigmoid_bias import SigmoidBiasOptions

    a = MoEConfig(**BASE, router="sigmoid_bias", router_options={"n_group": 2, "topk_group": 1})
    b = MoEConfig(**BASE, router="sigmoid_bias", router_options=SigmoidBiasOptions(n_group=2, topk_group=1))
    assert a.router_options == b.router_options
    assert a.router_options.n_group == 2


def test_capacity_formula():
    cfg = MoEConfig(**BASE, capacity_factor=1.0)
    # ceil(1.0 * 10 tokens * k=2 / 4 experts) = 5
    assert cfg.capacity(10, training=True) == 5
    # never more than the group size, never less than min_capacity
    assert MoEConfig(**BASE, capacity_factor=100.0).capacity(10, training=True) == 10
    assert MoEConfig(**BASE, capacity_factor=0.01, min_capacity=3).capacity(10, training=True) == 3
    # eval factor applies only in eval
    cfg = MoEConfig(**BASE, capacity_factor=2.0, eval_capacity_factor=0.5)
    assert cfg.capacity(8, training=True) == 8 and cfg.capacity(8, training=False) == 2
    assert MoEConfig(**BASE).capacity(8, training=True) is None
