"""`parallelize(model, mesh)`: every MoE becomes an EPMoE, the rest is replicated with DDP.

Gradients (W = dp * ep ranks, every rank's loss = its task loss + the replicated aux loss):

- non-expert parameters (attention, norms, embeddings, routers, shared experts) are replicated
  on all W ranks; DDP all-reduces and averages them over the world, as for any dense model;
- expert parameters of shard r are held by the dp ranks with ep_rank r. The all-to-all backward
  already brought every token's contribution to the rank holding the expert, so they are summed
  over the dp group only, and divided by W (not dp) so that the update equals the
  single-process one for the mean loss, like DDP's average for the rest. DDP ignores them.

The expert reduction runs at the end of each backward pass that syncs (the same condition as
DDP's, so `ddp.no_sync()` accumulation defers it): a gradient hook keeps each backward's new
expert gradient aside and an end-of-backward callback reduces it and adds it to `.grad`.
Only new contributions are reduced, so accumulating over micro-batches with a sync every
backward is exact too.

Gradient clipping must see the global norm: expert gradients differ across the EP ranks, so
`torch.nn.utils.clip_grad_norm_` on one rank's parameters would clip each shard (and, through
the clip factor, each replica of the dense weights) differently. Use `clip_grad_norm_` here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from moekit.layers.moe import MoE
from moekit.parallel.checkpoint import shard_optimizer_state_
from moekit.parallel.ep_moe import EPMoE
from moekit.parallel.mesh import Mesh, check_divisible
from moekit.parallel.modules import ep_layers, expert_parameters, find_mesh, unwrap  # ep_layers: tests import it here


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class ExpertGradSync:
    """Sum each backward's expert gradients over the dp group and scale them by 1 / world."""

    def __init__(self, params: list[nn.Parameter], mesh: Mesh, should_sync: Callable[[], bool]):
        self.params, self.mesh, self.should_sync = params, mesh, should_sync
        self.pending: dict[int, Tensor] = {}
        self.queued = False
        self.handles = [p.register_hook(self._make_hook(i)) for i, p in enumerate(params)]

    def _make_hook(self, index: int):
        def hook(grad: Tensor) -> Tensor:
            pending = self.pending.get(index)
            self.pending[index] = grad.detach().clone() if pending is None else pending.add_(grad)
            if not self.queued:
                self.queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            # .grad receives the reduced gradient in _finish; nothing unreduced lands there.
            return torch.zeros_like(grad)

        return hook

    def _finish(self) -> None:
        self.queued = False
        if not self.should_sync():
            return  # keep accumulating in `pending` until a backward that syncs
        self.flush()

    @torch.no_grad()
    def flush(self) -> None:
        """Reduce the pending gradients now (every rank of the dp group must call it)."""
        if not self.params:
            return
        chunks = [self.pending.get(i, torch.zeros_like(p)).reshape(-1) for i, p in enumerate(self.params)]
        flat = torch.cat(chunks).float()
        if self.mesh.dp > 1:
            dist.all_reduce(flat, group=self.mesh.dp_group)
        flat.div_(self.mesh.world_size)
        start = 0
        for p in self.params:
            n = p.numel()
            g = flat[start : start + n].view_as(p).to(p.dtype)
            start += n
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)
        self.pending.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _broadcast_experts(moes: list[tuple[str, MoE]]) -> None:
    """Rank 0's full expert weights on every rank, before slicing (DDP syncs the rest)."""
    for _, moe in moes:
        for p in moe.experts.parameters():
            dist.broadcast(p.data, src=0)
        for b in moe.experts.buffers():
            dist.broadcast(b, src=0)


def parallelize(model: nn.Module, mesh: Mesh, optimizer: torch.optim.Optimizer | None = None, *,
                ddp: bool = True, find_unused_parameters: bool = False, sync_init: bool = True) -> nn.Module:
    """Swap every `MoE` of `model` for an `EPMoE` on `mesh` and replicate the rest with DDP.

    `model` is modified in place (its MoE submodules are replaced, expert parameters keep their
    identity with data cut to the rank's shard) and returned wrapped in DDP; keep using the
    unwrapped `model` for checkpoints and `moekit.apply_router_updates`. `optimizer`: pass it when
    it already holds state (a resumed run) so its per-expert state is cut the same way. On a
    one-rank mesh the model is returned unchanged.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"parallelize expects a moekit.parallel.Mesh (from setup), got {type(mesh).__name__}")
    if not mesh.distributed:
        return model
    root = unwrap(model)
    if isinstance(model, DDP):
        raise ValueError("parallelize wants the plain model, not one already wrapped in DistributedDataParallel")
    moes = [(name, m) for name, m in root.named_modules() if isinstance(m, MoE) and not isinstance(m, EPMoE)]
    if mesh.ep > 1 and not moes and not ep_layers(root):
        raise ValueError(f"parallel.ep={mesh.ep} but the model has no MoE layer to shard; use parallel.ep=1")
    for name, moe in moes:
        check_divisible(moe.cfg.num_experts, mesh.ep, f"layer '{name or type(root).__name__}'")
    if sync_init:
        _broadcast_experts(moes)
    for name, moe in moes:
        layer = EPMoE(moe, mesh, name)
        if name:
            _set_submodule(root, name, layer)
        else:
            root = layer
    if optimizer is not None:
        shard_optimizer_state_(optimizer, root)
    root._moekit_mesh = mesh
    expert = expert_parameters(root)
    wrapped: nn.Module = root
    if ddp:
        DDP._set_params_and_buffers_to_ignore_for_model(root, [n for n, _ in expert])
        has_dense = any(p.requires_grad for n, p in root.named_parameters() if n not in dict(expert))
        if has_dense:
            device_ids = [mesh.device.index] if mesh.device.type == "cuda" else None
            # Buffers (DeepSeek's expert bias) are synced at init and then kept equal by the
            # global load updates; re-broadcasting them every forward would only cost time.
            params = inspect.signature(DDP.__init__).parameters
            no_sync_kw = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {
                "broadcast_buffers": False}
            wrapped = DDP(root, device_ids=device_ids, find_unused_parameters=find_unused_parameters, **no_sync_kw)
    should_sync = (lambda: wrapped.require_backward_grad_sync) if isinstance(wrapped, DDP) else (lambda: True)
    old = getattr(root, "_moekit_grad_sync", None)
    if old is not None:
        old.remove()
    root._moekit_grad_sync = ExpertGradSync([p for _, p in expert if p.requires_grad], mesh, should_sync)
    return wrapped


@torch.no_grad()
def clip_grad_norm_(model: nn.Module | Iterable[nn.Parameter], max_norm: float, norm_type: float = 2.0,
                    mesh: Mesh | None = None) -> Tensor:
    """`torch.nn.utils.clip_grad_norm_` over the whole (sharded) model: the norm of every
    gradient of the single-process model, the same clip factor on every rank.

    Accepts the model (preferred: expert parameters are found through its EP layers) or its
    parameters (then `mesh` and expert detection come from the parameters' owning layers only if
    the model is given; with bare parameters and no EP layers it is torch's function).
    """
    if not isinstance(model, nn.Module):
        return torch.nn.utils.clip_grad_norm_(list(model), max_norm, norm_type)
    mesh = mesh or find_mesh(model)
    params = [p for p in unwrap(model).parameters() if p.grad is not None]
    if mesh is None or not mesh.distributed or mesh.ep == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type)
    expert_ids = {id(p) for _, p in expert_parameters(model)}
    dense = [p.grad for p in params if id(p) not in expert_ids]
    sharded = [p.grad for p in params if id(p) in expert_ids]
    device = params[0].device if params else mesh.device
    if math.isinf(norm_type):
        def absmax(gs):
            return torch.stack([g.abs().max().float() for g in gs]).max() if gs else torch.zeros((), device=device)

        dense_n, shard_n = absmax(dense), absmax(sharded)
        dist.all_reduce(shard_n, op=dist.ReduceOp.MAX, group=mesh.ep_group)
        total = torch.maximum(dense_n, shard_n)
    else:
        def powsum(gs):
            if not gs:
                return torch.zeros((), device=device)
            return torch.stack([torch.linalg.vector_norm(g.float(), norm_type) ** norm_type for g in gs]).sum()

        # Dense gradients are identical on every rank (DDP averaged them); expert shards differ
        # across the EP group and are identical across its dp replicas: sum over ep only.
        shard_p = powsum(sharded)
        dist.all_reduce(shard_p, group=mesh.ep_group)
        total = (powsum(dense) + shard_p) ** (1.0 / norm_type)
    clip = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(clip.to(p.grad.dtype))
    return total
