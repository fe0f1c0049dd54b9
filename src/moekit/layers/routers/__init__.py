"""Router registry: name -> (router class, options dataclass)."""

from moekit.layers.routers.base import ExpertChoice, Router, Routing, SoftRouting, TokenChoice
from moekit.layers.routers.dense import DenseRouter
from moekit.layers.routers.expert_choice import ExpertChoiceRouter
from moekit.layers.routers.gshard import GShardRouter
from moekit.layers.routers.noisy_topk import NoisyTopKRouter
from moekit.layers.routers.sigmoid_bias import SigmoidBiasRouter
from moekit.layers.routers.soft import SoftRouter
from moekit.layers.routers.softmax_topk import SoftmaxTopKRouter
from moekit.layers.routers.switch import SwitchRouter

ROUTERS: dict[str, type[Router]] = {
    "dense": DenseRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "gshard": GShardRouter,
    "softmax_topk": SoftmaxTopKRouter,
    "sigmoid_bias": SigmoidBiasRouter,
    "expert_choice": ExpertChoiceRouter,
    "soft": SoftRouter,
}

# Routers whose choice for a token depends on other tokens of the sequence.
NON_CAUSAL_ROUTERS = tuple(name for name, cls in ROUTERS.items() if not cls.causal)

__all__ = [
    "ROUTERS",
    "NON_CAUSAL_ROUTERS",
    "Router",
    "Routing",
    "TokenChoice",
    "ExpertChoice",
    "SoftRouting",
]
