"""Finding the parts of a parallelized model: the user's module under its wrappers, its EP layers,
their (sharded) expert parameters and the mesh it runs on.

A leaf of parallel/: data_parallel.py (which builds such models) and checkpoint.py (which
saves and loads them) both read models through these helpers, and neither is imported here.
"""

from __future__ import annotations

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from moekit.parallel.ep_moe import EPMoE
from moekit.parallel.mesh import Mesh


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP (or torch.compile) wrapper."""
    while True:
        if isinstance(model, DDP):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def ep_layers(model: nn.Module) -> list[tuple[str, EPMoE]]:
    return [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, EPMoE)]


def expert_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(qualified name, parameter) of every sharded expert parameter of the model."""
    out = []
    for name, layer in ep_layers(model):
        prefix = f"{name}.experts." if name else "experts."
        out.extend((prefix + n, p) for n, p in layer.experts.named_parameters())
    return out


def find_mesh(model: nn.Module) -> Mesh | None:
    """The mesh of the model's EP layers, or the one `parallelize` recorded on a model without any."""
    layers = ep_layers(model)
    return layers[0][1].mesh if layers else getattr(unwrap(model), "_moekit_mesh", None)
