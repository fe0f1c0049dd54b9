"""V-MoE and WideNet: learning on scikit-learn's digits, batch prioritized routing, sharing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit.models import VisionConfig, WideNetConfig, build_model, count_parameters, dense_twin, get_preset
from moekit.models.widenet import unshared_twin

sklearn_datasets = pytest.importorskip("sklearn.datasets")


@pytest.fixture(scope="module")
def digits():
    d = sklearn_datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm[:1400]], y[perm[:1400]], x[perm[1400:]], y[perm[1400:]]


def _train(model, x, y, steps=150, lr=3e-3, batch=64):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        out = model(x[idx], labels=y[idx])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    model.eval()
    return model


def _accuracy(model, x, y):
    with torch.no_grad():
        out = model(x)
    return (out.logits.argmax(-1) == y).float().mean().item(), out


def test_vmoe_learns_digits_and_bpr_trades_compute(digits):
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = _train(build_model(get_preset("vmoe-digits")), xtr, ytr)
    acc, out = _accuracy(model, xte, yte)
    print(f"\nV-MoE digits test accuracy (training capacity 1.25): {acc:.3f} (chance 0.1)")
    assert acc > 0.75
    assert [i for i, _ in out.layer_metrics] == [1, 3]
    rows = []
    for factor in (1.0, 0.5, 0.25, 1e-3):  # 1e-3: each expert keeps min_capacity=1 token, ~all work skipped
        for policy in ("score", "position"):
            model.set_inference_capacity(factor, policy)
            a, o = _accuracy(model, xte, yte)
            drop = sum(m["drop_fraction"].item() for _, m in o.layer_metrics) / len(o.layer_metrics)
            rows.append((factor, policy, a, drop))
            print(f"  eval capacity {factor:4}  {policy:8}  accuracy {a:.3f}  dropped assignments {drop:.2f}")
    by = {(f, p): (a, d) for f, p, a, d in rows}
    # capacity 0.5 skips about half the expert work and the model still classifies well above chance
    assert by[(0.5, "score")][1] > 0.3
    assert by[(0.5, "score")][0] > 0.6
    # Dropping (almost) all expert work shows what the MoE blocks contribute on this small task;
    # half the capacity with BPR keeps at least that accuracy.
    assert by[(1e-3, "score")][1] > 0.95
    assert by[(0.5, "score")][0] >= by[(1e-3, "score")][0] - 0.01
    model.set_inference_capacity(None)
    assert _accuracy(model, xte, yte)[0] == acc


def test_widenet_learns_digits_and_shares_weights(digits):
    xtr, ytr, xte, yte = digits
    cfg = get_preset("widenet-digits")
    torch.manual_seed(0)
    model = build_model(cfg)
    twin = unshared_twin(cfg)
    total, _ = count_parameters(model)
    twin_total, _ = count_parameters(twin)
    assert count_parameters(cfg) == count_parameters(model)
    assert count_parameters(twin) == count_parameters(build_model(twin))
    # one attention + MoE stored instead of n_layers of them; LayerNorms stay per layer
    d = cfg.d_model
    block = (twin_total - count_parameters(dataclasses.replace(twin, n_layers=1))[0]) // (cfg.n_layers - 1)
    assert twin_total - total == (cfg.n_layers - 1) * (block - 4 * d)
    print(f"\nWideNet digits: {total:,} parameters vs {twin_total:,} unshared ({twin_total / total:.2f}x)")
    assert len(model.norms1) == cfg.n_layers and model.norms1[0].weight is not model.norms1[1].weight
    _train(model, xtr, ytr)
    acc, out = _accuracy(model, xte, yte)
    print(f"WideNet digits test accuracy: {acc:.3f}")
    assert acc > 0.75
    assert len(out.layer_metrics) == cfg.n_layers


@pytest.mark.parametrize("kwargs, field", [
    (dict(image_size=8, patch_size=3), "patch_size"), (dict(d_model=30, n_heads=4), "d_model"),
    (dict(moe_interval=0), "moe_interval"), (dict(pool="max"), "pool"), (dict(num_classes=0), "num_classes"),
])
def test_bad_vision_config(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        VisionConfig(**kwargs)


def test_widenet_config_rules():
    with pytest.raises(ValueError, match="moe"):
        WideNetConfig(image_size=8, patch_size=4)
    with pytest.raises(ValueError, match="moe_interval"):
        WideNetConfig(image_size=8, patch_size=4, moe=dict(d_ff=8, num_experts=2), moe_interval=2)


def test_vision_counts_and_twin():
    for name in ("vmoe-digits", "vit-digits"):
        cfg = get_preset(name)
        assert count_parameters(cfg) == count_parameters(build_model(cfg))
    assert count_parameters(get_preset("vit-b16"))[0] == 86567656  # ViT-B/16 with a 1000-class head
    cfg = get_preset("vmoe-digits")
    twin = dense_twin(cfg, "active")
    assert abs(count_parameters(twin)[0] - count_parameters(cfg)[1]) <= cfg.n_layers * (2 * cfg.d_model + 1) / 2
    with pytest.raises(ValueError, match="images"):
        build_model(cfg)(torch.zeros(2, 3, 8, 8))


@pytest.mark.parametrize("name", ["vmoe-digits", "vit-digits", "widenet-digits"])
def test_trains_on_repeated_batch(digits, name):
    xtr, ytr, _, _ = digits
    torch.manual_seed(0)
    model = build_model(get_preset(name))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(200):
        out = model(xtr[:32], labels=ytr[:32])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first or out.task_loss.item()
        if out.task_loss.item() < first / 2:
            break
    assert out.task_loss.item() < first / 2
