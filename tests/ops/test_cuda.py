"""The CUDA path against the slow reference (`pytest -m gpu` on a machine with a CUDA device).

Deselected by default (pyproject addopts) and skipped without CUDA; CPU CI covers the same code
paths on CPU in tests/layers/test_parity.py.
"""

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.ops import reference as ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
@pytest.mark.parametrize("T,E,k", [(1, 64, 8), (7, 4, 2), (512, 8, 2), (512, 64, 8)])
def test_cuda_matches_reference_and_cpu(T, E, k, capacity_factor, dtype):
    torch.manual_seed(0)
    cfg = MoEConfig(d_model=64, d_ff=128, num_experts=E, top_k=k, capacity_factor=capacity_factor, init_std=0.2)
    moe = MoE(cfg).cuda().to(dtype)
    x = torch.randn(T, 64, device="cuda", dtype=dtype, requires_grad=True)
    out = moe(x)
    tol = dict(atol=1e-4, rtol=1e-3) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)
    if capacity_factor is None:  # dropless: the per-expert loop of ops/reference.py
        r = out.routing
        moe32 = MoE(cfg).cuda()
        moe32.load_state_dict({n: p.float() for n, p in moe.state_dict().items()})
        expected = ref.token_choice(x.float(), r.expert_idx_TK, r.weight_TK, moe32.experts)
        torch.testing.assert_close(out.output.float(), expected, **tol)
    g = torch.randn_like(out.output)
    (out.output * g).sum().backward()
    assert torch.isfinite(moe.experts.w_in.grad).all() and torch.isfinite(x.grad).all()
    # the CPU path (tested against the references in tests/layers) on the same weights agrees,
    # capacity drops included
    cpu = MoE(cfg).to(dtype)
    cpu.load_state_dict({n: p.cpu() for n, p in moe.state_dict().items()})
    torch.testing.assert_close(cpu(x.detach().cpu()).output.float(), out.output.detach().cpu().float(), **tol)
