"""Per-rank bodies for parallelize (DDP + expert gradient sync), clipping and checkpoints.

The oracle is the single-process model trained on the global batch with loss
mean_r(task_r) + aux (task_r: rank r's mean squared error), the objective that DDP's averaging
gives when rank r minimises task_r + aux.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.distributed as dist
from _ep_cases import close
from torch import nn

from moekit import MoE, MoEConfig
from moekit.parallel import (
    build_mesh,
    clip_grad_norm_,
    expert_parameters,
    full_model,
    full_state_dict,
    parallelize,
    unwrap,
)
from moekit.parallel.data_parallel import ep_layers


class TinyNet(nn.Module):
    """Linear -> two residual MoE layers -> LayerNorm -> Linear; returns (y, aux)."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.inp = nn.Linear(cfg.d_model, cfg.d_model)
        self.blocks = nn.ModuleList([MoE(cfg), MoE(cfg)])
        self.norm = nn.LayerNorm(cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x):
        h = self.inp(x)
        aux = h.new_zeros(())
        for block in self.blocks:
            o = block(h)
            h = h + o.output
            aux = aux + o.aux_loss
        return self.out(self.norm(h)), aux


def _batches(shapes, d_model, steps, accum, seed):
    gen = torch.Generator().manual_seed(seed)
    return [[([torch.randn(*s, d_model, generator=gen) for s in shapes],
              [torch.randn(*s, d_model, generator=gen) for s in shapes]) for _ in range(accum)] for _ in range(steps)]


def _ref_step(ref, opt, micro_batches, world, clip, grads=None):
    for xs, ts in micro_batches:
        y, aux = ref(torch.cat(xs))
        sizes = [x.shape[0] for x in xs]
        task = sum(((yr - t) ** 2).mean() for yr, t in zip(y.split(sizes), ts) if t.numel()) / world
        ((task + aux) / len(micro_batches)).backward()
    norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), clip)
    if grads is not None:
        grads.update({n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None})
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def _ep_step(wrapped, model, opt, micro_batches, rank, clip, no_sync, want_grads=None, step=0):
    for m, (xs, ts) in enumerate(micro_batches):
        last = m == len(micro_batches) - 1
        ctx = wrapped.no_sync() if (no_sync and not last and hasattr(wrapped, "no_sync")) else contextlib.nullcontext()
        with ctx:
            y, aux = wrapped(xs[rank])
            task = ((y - ts[rank]) ** 2).mean() if ts[rank].numel() else y.sum() * 0.0
            ((task + aux) / len(micro_batches)).backward()
    norm = clip_grad_norm_(model, clip)
    if want_grads is not None:
        got = full_grads(model)
        for name, g in want_grads.items():
            close(f"step {step} clipped grad of {name}", got[name], g)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def full_grads(model) -> dict:
    """Every parameter's gradient in the single-process layout (expert shards gathered)."""
    out = {}
    expert = dict(expert_parameters(model))
    layers = {name: layer for name, layer in ep_layers(model)}
    for name, p in unwrap(model).named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if name in expert:
            mesh = layers[name.rsplit(".experts.", 1)[0]].mesh
            parts = [torch.empty_like(g) for _ in range(mesh.ep)]
            dist.all_gather(parts, g.contiguous(), group=mesh.ep_group)
            g = torch.cat(parts)
        out[name] = g
    return out


def _make(router, cfg, seed):
    torch.manual_seed(seed)
    # init_std 0.3: expert gradients of the same order as the dense ones, so a wrong expert
    # reduction moves the compared numbers well past the tolerance.
    cfg = MoEConfig(**{"d_model": 8, "d_ff": 8, "num_experts": 4, "top_k": 2, "router": router,
                       "init_std": 0.3, **(cfg or {})})
    net = TinyNet(cfg)
    with torch.no_grad():
        for block in net.blocks:
            for name, p in block.router.named_parameters():
                if name == "weight":
                    p.normal_(0.0, 1.0)
    return net


def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def train_parity(dp: int, ep: int, shapes: list[tuple], router: str = "softmax_topk", cfg: dict | None = None,
                 steps: int = 2, accum: int = 1, no_sync: bool = False, clip: float = 0.05, seed: int = 0) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = build_mesh(dp, ep)
    full = _make(router, cfg, seed)
    ref, model = copy.deepcopy(full), copy.deepcopy(full)
    ref_opt = _sgd(ref.parameters())
    opt = _sgd(model.parameters())  # built before parallelize, as a trainer does
    wrapped = parallelize(model, mesh)
    data = _batches(shapes, 8, steps, accum, seed + 1)
    norms = []
    for step in range(steps):
        ref_grads = {}
        ref_norm = _ref_step(ref, ref_opt, data[step], world, clip, ref_grads)
        norm = _ep_step(wrapped, model, opt, data[step], rank, clip, no_sync, ref_grads, step)
        close(f"step {step} grad norm", norm, ref_norm)
        norms.append(float(norm))
    state = full_state_dict(model)
    for key, value in ref.state_dict().items():
        close(f"parameter {key} after {steps} steps", state[key], value)
    # Dense weights are replicas: bitwise equal on every rank.
    for name, p in unwrap(model).named_parameters():
        if ".experts." not in name:
            q = p.detach().clone()
            dist.broadcast(q, src=0)
            assert torch.equal(q, p.detach()), f"rank {rank}: replica {name} drifted"
    return {"norms": norms, "clipped": any(n > clip for n in norms)}


def checkpoint_roundtrip(dp: int, ep: int, path: str, seed: int = 0) -> dict:
    """EP run -> full checkpoint -> one process continues == reference; and one-process checkpoint ->
    EP run continues == reference (model and optimizer state)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = build_mesh(dp, ep)
    shapes = [(3,), (2,), (4,), (1,)][:world]
    full = _make("softmax_topk", None, seed)
    data = _batches(shapes, 8, 3, 1, seed + 1)
    ref = copy.deepcopy(full)
    ref_opt = _sgd(ref.parameters())
    model = copy.deepcopy(full)
    opt = _sgd(model.parameters())
    wrapped = parallelize(model, mesh)
    _ref_step(ref, ref_opt, data[0], world, 1.0)
    _ep_step(wrapped, model, opt, data[0], rank, 1.0, False)

    # 1. Saved under EP, read by one process.
    with full_model(model, opt):
        if rank == 0:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
    dist.barrier()
    saved = torch.load(path)
    single = copy.deepcopy(full)
    single.load_state_dict(saved["model"])
    single_opt = _sgd(single.parameters())
    single_opt.load_state_dict(saved["optim"])
    for key, value in ref.state_dict().items():
        close(f"EP checkpoint: {key}", single.state_dict()[key], value)
    ref_mom = [ref_opt.state[p]["momentum_buffer"] for p in ref.parameters()]
    one_mom = [single_opt.state[p]["momentum_buffer"] for p in single.parameters()]
    for i, (a, b) in enumerate(zip(one_mom, ref_mom)):
        close(f"EP checkpoint: momentum of parameter {i}", a, b)
    # The shards survived the round trip through full_model.
    for key, value in ref.state_dict().items():
        close(f"after full_model: {key}", full_state_dict(model)[key], value)

    # 2. Saved by one process (the reference), resumed under EP; both continue one step.
    dist.barrier()
    if rank == 0:
        torch.save({"model": ref.state_dict(), "optim": ref_opt.state_dict()}, path)
    dist.barrier()
    saved = torch.load(path)
    resumed = copy.deepcopy(full)
    resumed.load_state_dict(saved["model"])
    resumed_opt = _sgd(resumed.parameters())
    resumed_opt.load_state_dict(saved["optim"])
    resumed_wrapped = parallelize(resumed, mesh, resumed_opt)  # cuts the optimizer state too
    _ref_step(ref, ref_opt, data[1], world, 1.0)
    _ep_step(resumed_wrapped, resumed, resumed_opt, data[1], rank, 1.0, False)
    state = full_state_dict(resumed)
    for key, value in ref.state_dict().items():
        close(f"resumed under EP: {key}", state[key], value)

    # 3. Loading inside full_model lands on every rank's shard.
    target = copy.deepcopy(full)
    target_wrapped = parallelize(target, mesh)
    del target_wrapped
    with full_model(target):
        target.load_state_dict(ref.state_dict())
    state = full_state_dict(target)
    for key, value in ref.state_dict().items():
        close(f"loaded inside full_model: {key}", state[key], value)
    return {"rank": rank}
