"""ParallelConfig and mesh validation, one-process behaviour (no process group needed)."""

import pytest
import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.layers.routers.softmax_topk import SoftmaxTopKRouter
from moekit.parallel import EPMoE, Mesh, ParallelConfig, clip_grad_norm_, parallelize, setup
from moekit.parallel.mesh import check_divisible


def test_defaults_and_field_errors():
    cfg = ParallelConfig()
    assert (cfg.dp, cfg.ep, cfg.backend) == (None, 1, "auto")
    with pytest.raises(ValueError, match=r"parallel\.ep must be >= 1"):
        ParallelConfig(ep=0)
    with pytest.raises(TypeError, match=r"parallel\.dp must be an integer"):
        ParallelConfig(dp=1.5)
    with pytest.raises(ValueError, match=r"parallel\.backend must be one of \['auto', 'gloo', 'nccl'\]"):
        ParallelConfig(backend="mpi")
    with pytest.raises(ValueError, match=r"parallel\.timeout_s"):
        ParallelConfig(timeout_s=0)


def test_world_must_be_dp_times_ep():
    assert ParallelConfig(ep=2).resolve_dp(8) == 4
    assert ParallelConfig(dp=2, ep=2).resolve_dp(4) == 2
    with pytest.raises(ValueError, match=r"parallel\.ep=3 must divide the world size 4"):
        ParallelConfig(ep=3).resolve_dp(4)
    with pytest.raises(ValueError, match=r"world size 8 must equal parallel\.dp x parallel\.ep = 2 x 2"):
        ParallelConfig(dp=2, ep=2).resolve_dp(8)


def test_num_experts_must_divide_by_ep():
    check_divisible(8, 4)
    msg = r"parallel\.ep=3 must divide MoEConfig\.num_experts=8 .*valid ep values: \[1, 2, 4, 8\]"
    with pytest.raises(ValueError, match=msg):
        check_divisible(8, 3, "layer 'blocks.0.ffn'")


def test_setup_outside_torchrun_is_a_one_rank_mesh(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    mesh = setup(ParallelConfig())
    assert (mesh.world_size, mesh.dp, mesh.ep, mesh.distributed) == (1, 1, 1, False)
    with pytest.raises(ValueError, match=r"parallel\.ep=2 must divide the world size 1"):
        setup(ParallelConfig(ep=2))
    model = nn.Sequential(nn.Linear(4, 4))
    assert parallelize(model, mesh) is model  # nothing to do on one process
    with pytest.raises(TypeError, match="ParallelConfig"):
        setup({"ep": 2})


def test_epmoe_on_one_rank_equals_moe():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    ref = MoE(moe.cfg)
    ref.load_state_dict(moe.state_dict())
    ep = EPMoE(moe, Mesh(1, 1, 0, 1, torch.device("cpu")))
    x = torch.randn(2, 5, 8)
    a, b = ep(x), ref(x)
    torch.testing.assert_close(a.output, b.output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.aux_loss, b.aux_loss)
    assert ep.state_dict().keys() == ref.state_dict().keys()


def test_unknown_router_class_is_refused_with_its_name():
    class MyRouter(SoftmaxTopKRouter):
        pass

    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4))
    moe.router = MyRouter(moe.cfg)
    with pytest.raises(ValueError, match=r"router MyRouter has no expert-parallel rule.*register_router_rule"):
        EPMoE(moe, Mesh(1, 1, 0, 1, torch.device("cpu")))


def test_ep_must_divide_experts_of_each_layer():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=6))
    with pytest.raises(ValueError, match=r"parallel\.ep=4 must divide MoEConfig\.num_experts=6 \(layer 'ffn'\)"):
        EPMoE(moe, Mesh(1, 4, 0, 4, torch.device("cpu")), "layer 'ffn'")


def test_clip_on_one_process_is_torch_clip():
    torch.manual_seed(0)
    a = nn.Linear(3, 3)
    b = nn.Linear(3, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3)
    for m in (a, b):
        m(x).pow(2).sum().backward()
    na = clip_grad_norm_(a, 0.1)
    nb = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.1)
    torch.testing.assert_close(na, nb)
    torch.testing.assert_close(a.weight.grad, b.weight.grad)


def test_deepcopy_shares_the_mesh():
    import copy

    mesh = Mesh(1, 1, 0, 1, torch.device("cpu"))
    ep = EPMoE(MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4)), mesh)
    twin = copy.deepcopy(ep)
    assert twin.mesh is mesh and twin.experts.w_in is not ep.experts.w_in
