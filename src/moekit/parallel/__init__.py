"""moekit.parallel: expert parallelism over torch.distributed (the only code that touches process groups).

    mesh = moekit.parallel.setup(ParallelConfig(ep=2))   # under torchrun; one process: a no-op mesh
    model = moekit.parallel.parallelize(model, mesh)     # MoE -> EPMoE, the rest replicated (DDP)
"""

from moekit.parallel.comm import all_to_all, record_comm
from moekit.parallel.config import ParallelConfig
from moekit.parallel.ep_moe import EPMoE
from moekit.parallel.losses import register_router_rule
from moekit.parallel.mesh import Mesh, build_mesh, setup, teardown

__all__ = [
    "EPMoE",
    "Mesh",
    "ParallelConfig",
    "all_to_all",
    "build_mesh",
    "record_comm",
    "register_router_rule",
    "setup",
    "teardown",
]
