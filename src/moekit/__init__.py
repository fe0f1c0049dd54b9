"""moekit: sparse Mixture-of-Experts layers, models, training and interop for PyTorch."""

from moekit.layers import ROUTERS, MoE, MoEConfig, MoEOutput, apply_router_updates

__version__ = "0.1.0"

__all__ = ["MoE", "MoEConfig", "MoEOutput", "ROUTERS", "apply_router_updates", "__version__"]
