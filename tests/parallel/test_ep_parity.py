"""EPMoE over 2 and 4 gloo processes equals the single-process MoE on the global batch:
outputs, aux loss, metrics, router buffers and every gradient (rtol 1e-5, float32)."""

import math

import _ep_cases as C
import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(120)]

# Router -> config overrides that make it valid; every router family of the layer.
ROUTER_CFG = {
    "dense": {},
    "noisy_topk": {},
    "switch": {"top_k": 1},
    "gshard": {},
    "softmax_topk": {},
    "sigmoid_bias": {"router_options": {"n_group": 2, "topk_group": 1}},
    "expert_choice": {},
    "soft": {"router_options": {"slots_per_expert": 2}},
}
# Uneven per-rank batches of whole sequences (B_r, L): the routers that look at sequences
# (Soft MoE, DeepSeek's sequence-wise loss) need sequences that do not span ranks.
SEQ_SHAPES = [(2, 3), (1, 3)]


@pytest.mark.parametrize("router", list(ROUTER_CFG))
@pytest.mark.parametrize("training", [True, False])
def test_every_router_dropless_two_ranks(pool2, router, training):
    shapes = SEQ_SHAPES if router in ("soft", "sigmoid_bias") else [(3,), (6,)]
    if router == "expert_choice":
        shapes = [(3,), (5,)]  # 8 tokens; expert choice needs T divisible by num_groups only
    pool2.run(C.parity, router=router, shapes=shapes, dp=1, ep=2, cfg=ROUTER_CFG[router], training=training)


@pytest.mark.parametrize("router", list(ROUTER_CFG))
def test_every_router_four_ranks_ep4(pool4, router):
    shapes = [(2, 2), (1, 2), (0, 2), (3, 2)]  # includes a rank with no tokens
    pool4.run(C.parity, router=router, shapes=shapes, dp=1, ep=4, cfg={**ROUTER_CFG[router], "num_experts": 8})


@pytest.mark.parametrize("router", ["softmax_topk", "gshard", "expert_choice", "soft", "sigmoid_bias"])
def test_dp2_x_ep2(pool4, router):
    """Expert shards replicated over two dp replicas; stats and capacity still global."""
    shapes = [(2, 2), (1, 2), (3, 2), (2, 2)]
    cfg = {**ROUTER_CFG[router], "num_experts": 4}
    if router == "gshard":
        cfg["capacity_factor"] = 1.0
    pool4.run(C.parity, router=router, shapes=shapes, dp=2, ep=2, cfg=cfg)


@pytest.mark.parametrize("policy", ["position", "score"])
@pytest.mark.parametrize("num_groups", [1, 2, 3])
@pytest.mark.parametrize("router", ["softmax_topk", "switch", "gshard", "noisy_topk", "sigmoid_bias"])
def test_capacity_equals_single_process_over_global_batch(pool2, router, policy, num_groups):
    """Capacity ranks assignments over the global batch (groups may straddle ranks)."""
    cfg = {**ROUTER_CFG[router], "capacity_factor": 0.75, "num_groups": num_groups, "overflow_policy": policy}
    shapes = [(2, 3), (1, 3)] if router == "sigmoid_bias" else [(5,), (4,)]
    result = pool2.run(C.parity, router=router, shapes=shapes, dp=1, ep=2, cfg=cfg)
    tokens = [math.prod(s) for s in shapes]
    size = -(-sum(tokens) // num_groups)
    straddles = tokens[0] % size != 0
    # A group that straddles the ranks is decided on gathered metadata, else locally.
    assert [r["gathers"] > 0 for r in result] == [straddles] * 2
    if num_groups == 1:
        assert result[0]["drop_fraction"] > 0


@pytest.mark.parametrize("policy", ["position", "score"])
def test_capacity_with_rank_local_groups(pool2, policy):
    """num_groups a multiple of the world size with equal batches: decided locally, same result."""
    cfg = {"capacity_factor": 0.5, "num_groups": 4, "overflow_policy": policy}
    result = pool2.run(C.parity, router="softmax_topk", shapes=[(6,), (6,)], dp=1, ep=2, cfg=cfg)
    assert [r["gathers"] for r in result] == [0, 0]
    assert result[0]["drop_fraction"] > 0


@pytest.mark.parametrize("num_groups", [1, 2, 4])
def test_expert_choice_groups_and_capacity_factor(pool2, num_groups):
    cfg = {"capacity_factor": 1.5, "num_groups": num_groups}
    result = pool2.run(C.parity, router="expert_choice", shapes=[(3,), (5,)], dp=1, ep=2, cfg=cfg)
    assert result[0]["gathers"] == 1  # 3 + 5 tokens: some group straddles the ranks


@pytest.mark.parametrize("shapes,gathers", [([(4,), (4,)], 0), ([(3,), (5,)], 1)])
def test_expert_choice_rank_local_groups(pool2, shapes, gathers):
    result = pool2.run(C.parity, router="expert_choice", shapes=shapes, dp=1, ep=2, cfg={"num_groups": 2})
    assert [r["gathers"] for r in result] == [gathers, gathers]


@pytest.mark.parametrize("router", ["softmax_topk", "gshard", "expert_choice", "soft", "dense"])
@pytest.mark.parametrize("shapes", [[(0,), (1,)], [(1,), (1,)], [(1,), (0,)]], ids=["T=0,1", "T=1,1", "T=1,0"])
def test_tiny_and_empty_ranks(pool2, router, shapes):
    cfg = dict(ROUTER_CFG[router])
    if router == "soft":
        shapes = [(s[0], 1) for s in shapes]  # sequences of one token
    if router == "expert_choice" and sum(s[0] for s in shapes) == 0:
        pytest.skip("no tokens at all")
    pool2.run(C.parity, router=router, shapes=shapes, dp=1, ep=2, cfg=cfg)


def test_all_ranks_empty(pool2):
    pool2.run(C.parity, router="softmax_topk", shapes=[(0,), (0,)], dp=1, ep=2)


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_no_rank_sends_to_another(pool2, capacity_factor):
    """Every token prefers experts on its own rank: both all-to-alls carry nothing across ranks,
    and the experts of each rank other than the two preferred get no token."""
    result = pool2.run(C.parity, router="softmax_topk", shapes=[(3,), (4,)], dp=1, ep=2,
                       cfg={"num_experts": 8, "top_k": 2, "capacity_factor": capacity_factor}, same_direction=True)
    assert [r["bytes_sent"] for r in result] == [0, 0]
    assert all(r["calls"] == 4 for r in result)  # dispatch + combine, forward and backward
    assert result[0]["idle_experts"] >= 4


def test_bytes_are_counted_when_ranks_exchange(pool2):
    result = pool2.run(C.parity, router="softmax_topk", shapes=[(3,), (4,)], dp=1, ep=2, cfg={"num_experts": 8})
    assert all(r["bytes_sent"] > 0 for r in result)


def test_experts_without_tokens(pool2):
    """Top-1 of 8 experts with 3 tokens: at least 5 experts idle."""
    result = pool2.run(C.parity, router="switch", shapes=[(1,), (2,)], dp=1, ep=2, cfg={"num_experts": 8, "top_k": 1})
    assert result[0]["idle_experts"] >= 5


@pytest.mark.parametrize("bias_update", ["forward", "manual"])
def test_sigmoid_bias_updates_from_global_load(pool2, bias_update):
    """Three training steps: the aux-loss-free bias follows the global load on every rank."""
    cfg = {"router_options": {"bias_update": bias_update, "bias_update_rate": 0.05}, "top_k": 2}
    pool2.run(C.parity, router="sigmoid_bias", shapes=[(2, 3), (1, 3)], dp=1, ep=2, cfg=cfg, steps=3,
              router_scale=0.3)


def test_gshard_random_routing_same_draws(pool2):
    """With the same uniform draws per global token, GShard's random second expert matches."""
    pool2.run(C.parity, router="gshard", shapes=[(5,), (4,)], dp=1, ep=2, cfg={"capacity_factor": 1.0})


def test_shared_expert_bias_and_z_loss(pool2):
    cfg = {"num_shared_experts": 1, "shared_expert_gate": True, "expert_bias": True, "z_loss_coef": 1e-2,
           "activation": "gelu"}
    pool2.run(C.parity, router="softmax_topk", shapes=[(3,), (4,)], dp=1, ep=2, cfg=cfg)


def test_top_k_equals_num_experts(pool2):
    pool2.run(C.parity, router="softmax_topk", shapes=[(3,), (2,)], dp=1, ep=2, cfg={"top_k": 4})


@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_user_module_experts(pool2, capacity_factor):
    pool2.run(C.parity, router="softmax_topk", shapes=[(3,), (4,)], dp=1, ep=2, module_experts=True,
              cfg={"capacity_factor": capacity_factor})


def test_bfloat16(pool2):
    pool2.run(C.bf16_output)
