"""Per-rank test bodies run inside the gloo worker pool (see _ep_pool.py).

Each case builds the same full MoE on every rank (same seed), runs the single-process layer on
the concatenated global batch as the oracle, runs EPMoE on this rank's slice, and checks
outputs, aux loss, metrics and every gradient. The loss convention (ep_moe.py docstring): rank r
minimises <out_r, G_r> + aux; the oracle minimises sum_r <out_r, G_r> / W + aux; EP gradients
summed over the ranks that hold a parameter and divided by W must equal the oracle's.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from torch import nn

from moekit import MoE, MoEConfig
from moekit.parallel import EPMoE, build_mesh, record_comm
from moekit.parallel.global_batch import GlobalBatch

RTOL, ATOL = 1e-5, 1e-6


def close(name: str, got, want, rtol=RTOL, atol=ATOL) -> None:
    try:
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol)
    except AssertionError as err:
        raise AssertionError(f"rank {dist.get_rank()}: {name} differs from the single-process layer:\n{err}") from None


@contextlib.contextmanager
def deterministic_draws(offset_rows: int | None, total_rows: int, seed: int):
    """Make the routers' random draws a function of the global token, so EP and the oracle see
    the same noise: randn_like(clean logits) -> sin(3 * logits) (noisy top-k), rand(T) -> a fixed
    uniform vector over the global batch, sliced at this rank's offset (GShard's second expert).
    `offset_rows=None` means the caller is the oracle (the whole global batch)."""
    gen = torch.Generator().manual_seed(seed + 12345)
    u_global = torch.rand(max(total_rows, 1), generator=gen)
    real_rand, real_randn_like = torch.rand, torch.randn_like

    def fake_rand(*size, **kw):
        n = size[0] if size and isinstance(size[0], int) else int(torch.Size(size[0]).numel())
        start = 0 if offset_rows is None else offset_rows
        return u_global[start : start + n].to(kw.get("device") or "cpu")

    def fake_randn_like(t, **kw):
        return torch.sin(3.0 * t.detach())

    torch.rand, torch.randn_like = fake_rand, fake_randn_like
    try:
        yield
    finally:
        torch.rand, torch.randn_like = real_rand, real_randn_like


def make_inputs(shapes: list[tuple], d_model: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(*s, d_model, generator=gen) for s in shapes]
    gs = [torch.randn(*s, d_model, generator=gen) for s in shapes]
    return xs, gs


def parity(router: str, shapes: list[tuple], dp: int, ep: int, cfg: dict | None = None, training: bool = True,
           seed: int = 0, router_scale: float = 1.0, steps: int = 1, same_direction: bool = False,
           module_experts: bool = False) -> dict:
    """shapes[r]: the leading dims of rank r's input (its token count is their product)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = build_mesh(dp, ep)
    torch.manual_seed(seed)
    cfg = MoEConfig(**{"d_model": 8, "d_ff": 8, "num_experts": 4, "top_k": 2, "router": router, **(cfg or {})})
    experts = None
    if module_experts:
        experts = [nn.Sequential(nn.Linear(cfg.d_model, 6), nn.Tanh(), nn.Linear(6, cfg.d_model))
                   for _ in range(cfg.num_experts)]
    full = MoE(cfg, experts=experts)
    with torch.no_grad():
        for name, p in full.router.named_parameters():
            if name in ("weight", "noise_weight"):
                # The default gate init is near uniform; spread it so routing is decisive.
                p.normal_(0.0, router_scale)
    if same_direction:
        # Rank r's tokens point along v_r and expert block r's gate rows along v_r: every token
        # is routed to experts on its own rank, so no rank sends a row to another.
        per = cfg.num_experts // ep
        with torch.no_grad():
            full.router.weight.zero_()
            for e in range(cfg.num_experts):
                full.router.weight[e, e // per] = 5.0 + 0.1 * e
    xs, gs = make_inputs(shapes, cfg.d_model, seed + 1)
    if same_direction:
        for r, x in enumerate(xs):
            x.abs_().mul_(0.01)
            x[..., (r % ep)] += 3.0
    total = sum(int(torch.Size(s).numel()) for s in shapes)
    offset = sum(int(torch.Size(s).numel()) for s in shapes[:rank])

    oracle = copy.deepcopy(full).train(training)
    model = EPMoE(copy.deepcopy(full), mesh).train(training)
    assert len({len(s) for s in shapes}) == 1, "every rank's input needs the same number of dims"
    x_ref = torch.cat(xs).requires_grad_(True)
    x_loc = xs[rank].clone().requires_grad_(True)
    for step in range(steps):
        with deterministic_draws(None, total, seed + step):
            ref = oracle(x_ref)
        ref_loss = (ref.output * torch.cat(gs)).sum() / world + ref.aux_loss
        ref_loss.backward()
        with deterministic_draws(offset, total, seed + step), record_comm() as traffic, count_gathers() as gathers:
            out = model(x_loc)
            loss = (out.output * gs[rank]).sum() + out.aux_loss
            loss.backward()

        n_loc = x_loc.shape[0]
        b_off = sum(s[0] for s in shapes[:rank])
        close(f"step {step} output", out.output, ref.output[b_off : b_off + n_loc])
        close(f"step {step} aux_loss", out.aux_loss, ref.aux_loss)
        assert set(out.metrics) == set(ref.metrics), (sorted(out.metrics), sorted(ref.metrics))
        for key in ref.metrics:
            close(f"step {step} metric {key}", out.metrics[key], ref.metrics[key])
        for name, buf in oracle.named_buffers():
            close(f"step {step} buffer {name}", dict(model.named_buffers())[name], buf, rtol=0, atol=0)
    gx = x_loc.grad if x_loc.grad is not None else torch.zeros_like(x_loc)
    gx_ref = x_ref.grad if x_ref.grad is not None else torch.zeros_like(x_ref)
    close("grad of x", gx / world, gx_ref[b_off : b_off + n_loc])
    check_grads(model, oracle, mesh)
    return {"rank": rank, "bytes_sent": traffic.bytes_sent, "calls": traffic.calls, "gathers": gathers[0],
            "idle_experts": float(out.metrics["experts_without_tokens"]),
            "drop_fraction": float(out.metrics["drop_fraction"])}


@contextlib.contextmanager
def count_gathers():
    """Count metadata all-gathers (capacity / expert choice across ranks)."""
    calls = [0]
    real = GlobalBatch.gather_rows

    def counted(self, t):
        calls[0] += 1
        return real(self, t)

    GlobalBatch.gather_rows = counted
    try:
        yield calls
    finally:
        GlobalBatch.gather_rows = real


def check_grads(model: EPMoE, oracle: MoE, mesh) -> None:
    world = dist.get_world_size()
    ref = dict(oracle.named_parameters())
    rows = model.expert_range
    for name, p in model.named_parameters():
        parts = name.split(".")
        if name.startswith("experts.experts."):  # user modules: local index -> global expert id
            parts[2] = str(int(parts[2]) + rows.start)
        want = ref[".".join(parts)].grad
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        grad = grad.clone()
        if name.startswith("experts."):
            # Replicas of this shard: the other dp ranks with the same ep_rank.
            if mesh.dp > 1:
                dist.all_reduce(grad, group=mesh.dp_group)
            if (not name.startswith("experts.experts.") and want is not None
                    and want.shape[0] == oracle.cfg.num_experts and grad.shape[0] == len(rows)):
                want = want[rows.start : rows.stop]
        else:
            dist.all_reduce(grad)
        if want is None:
            want = torch.zeros_like(grad)
        close(f"grad of {name}", grad / world, want)


def bf16_output(seed: int = 0) -> float:
    """bfloat16 weights and activations through gloo: the EP output matches the single-process
    bf16 layer up to bf16 rounding (grouped GEMMs on different row counts round differently)."""
    rank = dist.get_rank()
    mesh = build_mesh(1, dist.get_world_size())
    torch.manual_seed(seed)
    full = MoE(MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2)).to(torch.bfloat16)
    oracle = copy.deepcopy(full)
    model = EPMoE(copy.deepcopy(full), mesh)
    x = torch.randn(dist.get_world_size(), 6, 16, generator=torch.Generator().manual_seed(seed + 1)).to(torch.bfloat16)
    out = model(x[rank : rank + 1].clone().requires_grad_(True))
    out.output.float().sum().backward()
    want = oracle(x).output[rank : rank + 1]
    assert out.output.dtype == torch.bfloat16
    close("bf16 output", out.output.float(), want.float(), rtol=2e-2, atol=2e-2)
    assert all(p.grad is not None for p in model.experts.parameters())
    return float((out.output.float() - want.float()).abs().max())
