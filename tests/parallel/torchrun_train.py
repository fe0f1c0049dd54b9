"""A few training steps of the `tiny` decoder LM, run as `python torchrun_train.py ...` (one
process) or under `torchrun --nproc-per-node N` (expert parallel): the integration check of
moekit.parallel's public API with a real model, independent of `moekit train`.

Every rank reads its interleaved slice of each global batch (as moekit.train.data does), the
loss is the mean next-token cross-entropy plus the aux loss, gradients are clipped over the
whole model, and the global mean loss of each step is written to --out (rank 0), with the
final full-layout state dict to --ckpt.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moekit.models import build_model, get_preset
from moekit.parallel import ParallelConfig, clip_grad_norm_, full_model, parallelize, setup, teardown


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ep", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--router", default="softmax_topk")
    ap.add_argument("--capacity-factor", type=float, default=None)
    ap.add_argument("--global-batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    mesh = setup(ParallelConfig(ep=args.ep, timeout_s=60))
    rank, world = mesh.rank, mesh.world_size
    torch.manual_seed(0)
    moe = {"router": args.router, "capacity_factor": args.capacity_factor, "num_experts": 4, "top_k": 2, "d_ff": 32}
    cfg = get_preset("tiny", d_model=32, d_ff=64, n_heads=2, n_kv_heads=1, max_seq_len=args.seq_len, moe=moe)
    model = build_model(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    ddp_model = parallelize(model, mesh)

    per_rank = args.global_batch // world
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(args.steps):
        tokens = torch.randint(0, cfg.vocab_size, (args.global_batch, args.seq_len + 1), generator=gen)
        mine = tokens[rank * per_rank : (rank + 1) * per_rank]
        out = ddp_model(mine[:, :-1])
        lm = F.cross_entropy(out.logits.flatten(0, 1), mine[:, 1:].flatten())
        (lm + out.aux_loss).backward()
        clip_grad_norm_(model, 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_loss = (lm + out.aux_loss).detach()
        if world > 1:
            dist.all_reduce(step_loss)
            step_loss /= world
        losses.append(float(step_loss))
    with full_model(model, optimizer):
        state = {k: v.clone() for k, v in model.state_dict().items()}
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "world": world, "ep": mesh.ep}, f)
        if args.ckpt:
            torch.save(state, args.ckpt)
    teardown(mesh)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
