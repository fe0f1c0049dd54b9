"""V-MoE, its dense ViT twin and WideNet on scikit-learn's bundled 8x8 digits, then V-MoE's
batch prioritized routing: accuracy as the inference capacity shrinks, by score vs by position.

    python examples/vision_digits.py                 # 400 steps per model, ~1-2 minutes on 2 cores
    python examples/vision_digits.py --steps 150     # what tests/models/test_vision.py runs

Split: 1400 training images, 397 test images (fixed seed); inputs standardised; AdamW lr 3e-3,
batch 64. Prints parameter counts (total / active per token), test accuracy, and the capacity
table; --json writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sklearn.datasets import load_digits

from moekit.models import build_model, count_parameters, get_preset
from moekit.models.widenet import unshared_twin


def load(seed: int = 0):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def train(model, x, y, steps: int, lr: float = 3e-3, batch: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        out = model(x[idx], labels=y[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def evaluate(model, x, y):
    out = model(x)
    acc = (out.logits.argmax(-1) == y).float().mean().item()
    drops = [m["drop_fraction"].item() for _, m in out.layer_metrics if "drop_fraction" in m]
    return acc, (sum(drops) / len(drops) if drops else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = load()
    results = {"models": {}, "bpr": []}
    vmoe = None
    for name in ("vmoe-digits", "vit-digits", "widenet-digits"):
        torch.manual_seed(0)
        model = build_model(get_preset(name))
        start = time.perf_counter()
        train(model, xtr, ytr, args.steps)
        acc, _ = evaluate(model, xte, yte)
        total, active = count_parameters(model)
        results["models"][name] = {"total_params": total, "active_params": active, "test_accuracy": acc,
                                   "train_seconds": time.perf_counter() - start}
        if name == "vmoe-digits":
            vmoe = model
    results["models"]["widenet-digits"]["unshared_twin_params"] = count_parameters(
        unshared_twin(get_preset("widenet-digits")))[0]
    print(f"{'model':16s} {'params':>9s} {'active':>9s} {'test acc':>9s} {'train s':>8s}")
    for name, r in results["models"].items():
        print(f"{name:16s} {r['total_params']:9,d} {r['active_params']:9,d} {r['test_accuracy']:9.3f} "
              f"{r['train_seconds']:8.1f}")
    print(f"(WideNet's unshared twin would store {results['models']['widenet-digits']['unshared_twin_params']:,})")
    print("\nV-MoE inference capacity (training capacity 1.25), accuracy / share of expert assignments dropped")
    print(f"{'capacity':>9s} {'by score (BPR)':>16s} {'by position':>16s}")
    for factor in (None, 1.0, 0.75, 0.5, 0.25, 0.1, 1e-3):
        row = {"eval_capacity_factor": factor}
        for policy in ("score", "position"):
            vmoe.set_inference_capacity(factor, policy)
            row[policy] = dict(zip(("accuracy", "dropped"), evaluate(vmoe, xte, yte), strict=True))
        results["bpr"].append(row)
        label = "train" if factor is None else f"{factor:g}"
        print(f"{label:>9s} {row['score']['accuracy']:8.3f} / {row['score']['dropped']:.2f}"
              f" {row['position']['accuracy']:8.3f} / {row['position']['dropped']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
