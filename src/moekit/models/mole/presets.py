"""Mixture-of-local-experts presets, shaped for scikit-learn's bundled tabular datasets."""

from __future__ import annotations

from moekit.models.mole.model import LocalExpertsConfig
from moekit.models.registry import register_preset


@register_preset("mole-diabetes", "local_experts")
def mole_diabetes() -> LocalExpertsConfig:
    """Mixture of 4 local experts (MLP 10->8->1) for the diabetes regression data (10 features)."""
    return LocalExpertsConfig(in_features=10, out_features=1, task="regression", num_experts=4, expert_hidden=8)


@register_preset("mole-breast-cancer", "local_experts")
def mole_breast_cancer() -> LocalExpertsConfig:
    """Mixture of 4 local experts (MLP 30->8->2) for the breast-cancer classification data (30 features)."""
    return LocalExpertsConfig(in_features=30, out_features=2, task="classification", num_experts=4, expert_hidden=8)
