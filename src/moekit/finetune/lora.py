"""LoRA and QLoRA on a whole moekit model: which modules get adapters, freezing the rest, merging.

    spec = LoraSpec(rank=16, alpha=32, targets=("experts", "attention"))
    quantize_base(model, bits=4)    # QLoRA only: the frozen base in NF4 (or int8), in place
    apply_lora(model, spec)         # in place: adapters on the targets, everything else frozen
    ...train...
    merge_lora(model)               # in place: W + s B A folded into plain float weights

Targets (the modules are the ones `moekit quantize` names, models/quantize.py):

- `experts`: every MoE layer's routed experts, per-expert factors on both projections
  (`LoraExperts`, layers/lora.py), for all experts or the ids in `experts`;
- `shared_experts`: the always-on shared experts, likewise;
- `attention`: every projection inside a block's attention (q/k/v/o, MLA's down/up projections);
- `dense_ffn`: the dense feed-forward layers of models that mix them with MoE layers;
- `router`: a rank-r delta on each router's (E, D) weight (`LowRankDelta`). `train_router`
  instead trains the router weights themselves (E x D per layer: few parameters).

Embeddings, norms (unless `train_norms`), the head and everything not named stay frozen. The
router's balance losses and the DeepSeek bias update keep running in fine-tuning: they are part
of the model's forward and of the trainer, not of the parameters LoRA freezes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from moekit.layers.experts import Experts
from moekit.layers.lora import LoraExperts, LoraLinear, LowRankDelta
from moekit.layers.moe import MoE
from moekit.layers.quantized import QuantizedExperts, QuantizedLinear
from moekit.models.common import RMSNorm
from moekit.models.quantize import available_targets, quantize_model, target_sites

TARGETS = ("experts", "shared_experts", "attention", "dense_ffn", "router")
QUANT_TARGETS = ("experts", "shared_experts", "dense_ffn", "attention")

__all__ = ["LoraExperts", "LoraLinear", "LoraSpec", "LowRankDelta", "TARGETS", "apply_lora", "lora_modules",
           "merge_lora", "quantize_base", "trainable_summary"]


def _parse_targets(targets) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, Sequence) or not targets:
        raise ValueError(f"lora.targets must name at least one of {', '.join(TARGETS)}, got {targets!r}")
    for t in targets:
        if t not in TARGETS:
            raise ValueError(f"lora.targets: {t!r} is not a target; allowed: {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in targets)


@dataclass(frozen=True)
class LoraSpec:
    """What gets an adapter and how big. Fields are validated here, each error naming the field."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] | str = ("experts", "attention")
    experts: tuple[int, ...] | None = None  # None: every routed expert gets an adapter
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    train_router: bool = False  # train the routers' own weights (not an adapter)
    train_norms: bool = False

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora.rank must be a positive integer, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"lora.alpha must be a positive number, got {self.alpha!r}")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "alpha", float(self.alpha))
        object.__setattr__(self, "dropout", float(self.dropout))
        object.__setattr__(self, "targets", _parse_targets(self.targets))
        experts = self.experts
        if experts is not None:
            if isinstance(experts, str):
                try:
                    experts = [int(e) for e in experts.split(",") if e.strip()]
                except ValueError:
                    raise ValueError(f"lora.experts must be expert ids like 0,3,5, got {self.experts!r}") from None
            if (not isinstance(experts, Sequence) or not experts
                    or any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in experts)):
                raise ValueError(f"lora.experts must be a non-empty list of expert ids (>= 0) or None, "
                                 f"got {self.experts!r}")
            object.__setattr__(self, "experts", tuple(sorted(set(experts))))
        for name in ("rslora", "train_router", "train_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"lora.{name} must be true or false, got {getattr(self, name)!r}")

    def record(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout, "targets": list(self.targets),
                "experts": None if self.experts is None else list(self.experts), "rslora": self.rslora,
                "train_router": self.train_router, "train_norms": self.train_norms}


def lora_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every adapter in `model`: LoraLinear, LoraExperts, LowRankDelta."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (LoraLinear, LoraExperts, LowRankDelta))]


def _moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def _sites(model: nn.Module, target: str) -> list[tuple[nn.Module, str, nn.Module]]:
    if target == "router":
        return [(moe, "router", moe.router) for moe in _moe_layers(model)
                if isinstance(getattr(moe.router, "weight", None), nn.Parameter)]
    return target_sites(model, target, linear=(nn.Linear, QuantizedLinear))


def lora_sites(model: nn.Module, spec: LoraSpec) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(target, parent, attribute, module) of every site `spec` puts an adapter on, each checked
    (targets the model has, stacked experts, expert ids): what `apply_lora` will do, changing
    nothing, so a caller can refuse a spec before it starts work."""
    if not isinstance(spec, LoraSpec):
        raise TypeError(f"apply_lora needs a LoraSpec, got {type(spec).__name__}")
    if lora_modules(model):
        raise ValueError("the model has LoRA adapters already; merge_lora(model) first, or start from the base")
    plan = []
    for target in spec.targets:
        sites = _sites(model, target)
        if not sites:
            have = [t for t in TARGETS if _sites(model, t)]
            raise ValueError(f"lora.targets: this {type(model).__name__} has no {target}; it has: "
                             f"{', '.join(have) or 'nothing LoRA can adapt'}")
        plan += [(target, *site) for site in sites]
    for target, _, _, module in plan:  # every check before anything is frozen or wrapped
        if target in ("experts", "shared_experts"):
            if not isinstance(module, (Experts, QuantizedExperts)):
                raise ValueError(f"lora.targets: {target} of type {type(module).__name__} cannot take LoRA; only "
                                 f"stacked experts can")
            if target == "experts" and spec.experts is not None and max(spec.experts) >= module.num_experts:
                raise ValueError(f"lora.experts: expert ids must be in 0..{module.num_experts - 1}, got "
                                 f"{list(spec.experts)}")
    return plan


def apply_lora(model: nn.Module, spec: LoraSpec) -> nn.Module:
    """Put adapters on `spec.targets` of `model`, in place (and return it); freeze everything else
    (the routers and norms train too when the spec says so). Every site is checked before
    anything changes (`lora_sites`)."""
    plan = lora_sites(model, spec)
    for p in model.parameters():
        p.requires_grad_(False)
    wraps = []
    for target, parent, name, module in plan:
        if target == "router":
            continue
        if target in ("experts", "shared_experts"):
            ids = spec.experts if target == "experts" else None
            wraps.append((parent, name, LoraExperts(module, spec.rank, spec.alpha, spec.dropout, spec.rslora, ids)))
        else:
            wraps.append((parent, name, LoraLinear(module, spec.rank, spec.alpha, spec.dropout, spec.rslora)))
    for parent, name, wrapped in wraps:
        setattr(parent, name, wrapped)
    for target, _, _, router in plan:
        if target == "router":
            w = router.weight
            delta = LowRankDelta(w.shape[0], w.shape[1], spec.rank, spec.alpha, spec.rslora, device=w.device)
            parametrize.register_parametrization(router, "weight", delta)
    if spec.train_router:
        for moe in _moe_layers(model):
            for name, p in moe.router.named_parameters():
                if "lora_" not in name:
                    p.requires_grad_(True)
    if spec.train_norms:
        for m in model.modules():
            if isinstance(m, (RMSNorm, nn.LayerNorm)):
                for p in m.parameters():
                    p.requires_grad_(True)
    model.lora = spec.record()
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place (and return it): W + s B A as plain float
    modules (a quantized base is dequantized: the merged model is a float model)."""
    for name, module in lora_modules(model):
        if isinstance(module, LowRankDelta):
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, module.merged())
    for moe in _moe_layers(model):
        if parametrize.is_parametrized(moe.router, "weight"):
            parametrize.remove_parametrizations(moe.router, "weight", leave_parametrized=True)
    if hasattr(model, "lora"):
        del model.lora
        # a QLoRA base quantized more than LoRA adapted (shared experts, dense FFNs): float too,
        # so the merged model is one float model (and its checkpoint carries no stale record)
        for name, module in list(model.named_modules()):
            if isinstance(module, (QuantizedExperts, QuantizedLinear)):
                parent_name, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent_name), attr, _dequantized(module))
        model.quantization = None
    return model


def _dequantized(module: nn.Module) -> nn.Module:
    """The float twin of a quantized module, holding its dequantized weights."""
    if isinstance(module, QuantizedLinear):
        return LoraLinear(module, 1, 1.0).merged()  # a zero adapter: the merged weight is the base's
    return LoraExperts(module, 1, 1.0).merged()


def quantize_base(model: nn.Module, bits: int = 4, block: int = 64,
                  targets: Sequence[str] | str | None = None) -> nn.Module:
    """QLoRA's frozen base: the weights of `targets` (default: every one of experts, shared
    experts, dense FFN and attention the model has) stored in 4-bit NF4 (bits=4; the QLoRA
    paper's code and its block of 64) or int8 (bits=8), in place. Call before `apply_lora`."""
    if targets is None:
        targets = [t for t in available_targets(model) if t in QUANT_TARGETS]
    return quantize_model(model, bits=bits, block=block, targets=targets, code="nf4" if bits == 4 else "int")


def _logical_numel(module: nn.Module) -> int:
    """Parameters a quantized module stands for (its float twin's count)."""
    if isinstance(module, QuantizedExperts):
        d, h, f = module.widths
        return module.num_experts * (h * d + d * f)
    if isinstance(module, QuantizedLinear):
        return module.in_features * module.out_features
    return 0


def trainable_summary(model: nn.Module) -> dict:
    """{"trainable", "total", "fraction"}: parameters that train, and all of them (quantized
    weights counted as the parameters they stand for; adapters included in the total)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(_logical_numel(m) for m in model.modules())
    return {"trainable": trainable, "total": total, "fraction": trainable / max(total, 1)}
