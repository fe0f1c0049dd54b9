"""Single-device MoE building blocks."""

from moekit.layers.capacity import CausalState
from moekit.layers.config import MoEConfig
from moekit.layers.experts import Experts, ModuleExperts, SharedExpert
from moekit.layers.moe import MoE, MoEOutput, apply_router_updates
from moekit.layers.routers import ROUTERS

__all__ = [
    "CausalState", "MoE", "MoEConfig", "MoEOutput", "Experts", "ModuleExperts", "SharedExpert", "ROUTERS",
    "apply_router_updates",
]
