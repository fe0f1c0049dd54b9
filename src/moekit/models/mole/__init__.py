"""Adaptive mixtures of local experts (Jacobs et al. 1991) for tabular regression and classification."""

from moekit.models.mole.model import (
    LocalExperts,
    LocalExpertsConfig,
    LocalExpertsOutput,
    count_local_experts,
    describe_local_experts,
)
from moekit.models.registry import register_arch

register_arch("local_experts", LocalExpertsConfig, LocalExperts, count_local_experts, describe_local_experts)

from moekit.models.mole import presets  # noqa: E402,F401  (registers the presets)

__all__ = ["LocalExperts", "LocalExpertsConfig", "LocalExpertsOutput"]
