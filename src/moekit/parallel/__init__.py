"""moekit.parallel: expert parallelism over torch.distributed (the only code that touches process groups).

    mesh = moekit.parallel.setup(ParallelConfig(ep=2))      # under torchrun; one process: a no-op mesh
    ddp_model = moekit.parallel.parallelize(model, mesh)   # MoE -> EPMoE in place, the rest in DDP
    ...backward...
    moekit.parallel.clip_grad_norm_(model, 1.0)            # the global norm across expert shards
    with moekit.parallel.full_model(model, optimizer):     # single-process layout for checkpoints
        ...save or load...
"""

from moekit.parallel.checkpoint import (
    full_model,
    full_state_dict,
    load_full_state_dict,
    local_state_dict,
    shard_optimizer_state_,
)
from moekit.parallel.comm import all_to_all, record_comm
from moekit.parallel.config import ParallelConfig
from moekit.parallel.data_parallel import clip_grad_norm_, parallelize
from moekit.parallel.ep_moe import EPMoE
from moekit.parallel.losses import register_router_rule
from moekit.parallel.mesh import Mesh, build_mesh, setup, teardown
from moekit.parallel.modules import expert_parameters, find_mesh, unwrap

__all__ = [
    "EPMoE",
    "Mesh",
    "ParallelConfig",
    "all_to_all",
    "build_mesh",
    "clip_grad_norm_",
    "expert_parameters",
    "find_mesh",
    "full_model",
    "full_state_dict",
    "load_full_state_dict",
    "local_state_dict",
    "parallelize",
    "record_comm",
    "register_router_rule",
    "setup",
    "shard_optimizer_state_",
    "teardown",
    "unwrap",
]
