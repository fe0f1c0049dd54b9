"""Mixture of local experts (Jacobs et al. 1991): loss, locality, and the ensemble comparison."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from moekit.models import LocalExperts, LocalExpertsConfig, build_model, count_parameters, get_preset

pytest.importorskip("sklearn")


def test_mixture_loss_is_eq_1_3():
    torch.manual_seed(0)
    model = LocalExperts(LocalExpertsConfig(in_features=3, out_features=2, num_experts=3, expert_hidden=4))
    x, d = torch.randn(5, 3), torch.randn(5, 2)
    out = model(x, labels=d)
    p, o = out.gate_probs, out.expert_outputs
    manual = -torch.stack([
        torch.log(sum(p[t, i] * torch.exp(-0.5 * ((d[t] - o[t, i]) ** 2).sum()) for i in range(3))) for t in range(5)
    ]).mean()
    assert torch.allclose(out.task_loss, manual, atol=1e-5)
    assert torch.allclose(out.prediction, (p[..., None] * o).sum(1))
    assert torch.allclose(p.sum(-1), torch.ones(5))
    cls = LocalExperts(LocalExpertsConfig(in_features=3, out_features=4, task="classification", num_experts=2))
    y = torch.tensor([0, 3, 1, 2, 2])
    out = cls(x, labels=y)
    manual = -torch.log((out.gate_probs * out.expert_outputs.softmax(-1)[torch.arange(5), :, y]).sum(1)).mean()
    assert torch.allclose(out.task_loss, manual, atol=1e-5)
    assert torch.allclose(out.prediction.sum(-1), torch.ones(5))


def test_gate_splits_input_space_between_linear_experts():
    """The 1991 point: on a piecewise-linear target, two linear experts and a gate fit what one
    linear model cannot, and the gate assigns each piece to one expert."""
    torch.manual_seed(0)
    x = torch.linspace(-2, 2, 400)[:, None]
    y = torch.where(x < 0, 2 * x + 1, -1.5 * x + 1)[:, 0]
    model = LocalExperts(LocalExpertsConfig(in_features=1, out_features=1, num_experts=2, expert_hidden=0))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(600):
        out = model(x, labels=y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        out = model(x)
    mse = (out.prediction[:, 0] - y).pow(2).mean().item()
    linear = torch.linalg.lstsq(torch.cat((x, torch.ones_like(x)), 1), y[:, None]).solution
    linear_mse = (torch.cat((x, torch.ones_like(x)), 1) @ linear - y[:, None]).pow(2).mean().item()
    winner = out.gate_probs.argmax(-1)
    left, right = winner[x[:, 0] < -0.2], winner[x[:, 0] > 0.2]
    print(f"\nmixture MSE {mse:.4f} vs one linear model {linear_mse:.4f}")
    assert mse < linear_mse / 10
    assert (left == left[0]).float().mean() > 0.95 and (right == right[0]).float().mean() > 0.95
    assert left[0] != right[0]


@pytest.mark.parametrize("kwargs, field", [
    (dict(in_features=0), "in_features"), (dict(task="ranking"), "task"), (dict(num_experts=0), "num_experts"),
    (dict(task="classification", out_features=1), "out_features"), (dict(loss="mse"), "loss"),
    (dict(expert_hidden=-1), "expert_hidden"),
])
def test_bad_config(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        LocalExpertsConfig(**kwargs)


def test_counts_and_training_on_repeated_batch():
    for name in ("mole-diabetes", "mole-breast-cancer"):
        cfg = get_preset(name)
        model = build_model(cfg)
        assert count_parameters(cfg) == count_parameters(model)
    torch.manual_seed(0)
    model = build_model(get_preset("mole-diabetes"))
    x, y = torch.randn(64, 10), torch.randn(64)
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    first = None
    for _ in range(300):
        out = model(x, labels=y)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.task_loss.item()
        if out.task_loss.item() < first / 2:  # eq. 1.3 omits the Gaussian's constant: a perfect fit scores 0
            break
    assert out.task_loss.item() < first / 2


def test_beside_bagging_and_stacking():
    """A fast cut of examples/local_experts_vs_ensembles.py: one split per dataset."""
    from sklearn.datasets import load_breast_cancer, load_diabetes
    from sklearn.model_selection import train_test_split

    spec = importlib.util.spec_from_file_location(
        "local_experts_example", Path(__file__).parents[2] / "examples" / "local_experts_vs_ensembles.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    scores = {}
    for title, (X, y), models, stratify in [
        ("diabetes R^2", load_diabetes(return_X_y=True), example.regression_models(epochs=200), False),
        ("breast_cancer accuracy", load_breast_cancer(return_X_y=True), example.classification_models(epochs=200),
         True),
    ]:
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y if stratify else None)
        for name, model in models.items():
            if "linear)" in name or "one expert" in name:
                continue  # the full script covers the ablations
            scores[(title, name)] = model.fit(Xtr, ytr).score(Xte, yte)
    print()
    for (title, name), s in scores.items():
        print(f"  {title:24s} {name:42s} {s:.3f}")
    mole = "mixture of local experts (4 x MLP-8)"
    assert scores[("diabetes R^2", mole)] > 0.3  # ridge reaches about 0.48 on this data
    assert scores[("breast_cancer accuracy", mole)] > 0.93
