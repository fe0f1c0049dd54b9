"""`moekit demo`: build one layer per router, run it on random tokens, print routing metrics.

A short tour that needs no data; the training issue replaces `make demo` with the real job.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from moekit import ROUTERS, MoE, MoEConfig

HELP = "build each router's MoE layer, run a forward+backward pass and print its routing metrics"

ROUTER_SETTINGS = {
    "dense": dict(top_k=4),
    "noisy_topk": dict(top_k=2),
    "switch": dict(top_k=1, capacity_factor=1.25),
    "gshard": dict(top_k=2, capacity_factor=1.0, num_groups=4),
    "softmax_topk": dict(top_k=2),
    "sigmoid_bias": dict(top_k=2, router_options={"n_group": 4, "topk_group": 2}),
    "expert_choice": dict(top_k=2),
    "soft": dict(top_k=1),
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=2048, help="tokens per batch (default 2048)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    torch.manual_seed(args.seed)
    console = Console(width=140)
    table = Table(title=f"moekit routers: T={args.tokens}, d_model={args.d_model}, d_ff={args.d_ff}, E={args.experts}")
    for col in ("router", "k", "capacity", "aux loss", "drop %", "entropy", "max/mean load", "idle experts",
                "fwd+bwd ms"):
        table.add_column(col, justify="right" if col != "router" else "left")
    seq = 128 if args.tokens % 128 == 0 else args.tokens
    x = torch.randn(args.tokens // seq, seq, args.d_model)
    for name in ROUTERS:
        settings = dict(ROUTER_SETTINGS[name])
        if name == "dense":
            settings["top_k"] = args.experts
        cfg = MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=args.experts, router=name, **settings)
        moe = MoE(cfg).train()
        start = time.perf_counter()
        out = moe(x)
        (out.output.float().square().mean() + out.aux_loss).backward()
        ms = (time.perf_counter() - start) * 1e3
        m = out.metrics
        table.add_row(
            name,
            str(cfg.effective_top_k),
            capacity_label(cfg),
            f"{float(out.aux_loss.detach()):.4f}",
            f"{100 * float(m['drop_fraction']):.1f}",
            f"{float(m['router_entropy']):.3f}",
            f"{float(m['load_imbalance']):.2f}",
            f"{int(m['experts_without_tokens'])}",
            f"{ms:.0f}",
        )
    console.print(table)
    console.print("Entropy in nats (uniform over 8 experts = 2.079). Routers are untrained, so loads are near even.")
    return 0


def capacity_label(cfg: MoEConfig) -> str:
    kind = ROUTERS[cfg.router].kind
    if kind == "expert":
        return f"C=T*{cfg.capacity_factor or cfg.top_k:g}/E"
    if kind == "soft":
        return "all slots"
    return "dropless" if cfg.capacity_factor is None else f"factor {cfg.capacity_factor:g}"
