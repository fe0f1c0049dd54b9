"""Weight-only quantization of a whole model (format "moekit-q/1", ops/quant.py), and the
structure a quantized checkpoint is loaded into.

    model = quantize_model(model, bits=8, block=32, targets=("experts", "attention"))
    save_model_checkpoint(model, DIR)     # packed ints + scales; config.json gets "quantization"
    model = load_checkpoint(DIR)          # rebuilt quantized from config.json, never re-quantized
    model = load_quantized(PATH, bits=4)  # a float checkpoint (moekit or Hugging Face), quantized on load

Targets (each module is swapped in place for its quantized twin, layers/quantized.py):

- `experts`: every MoE layer's routed experts (stacked `Experts` -> `QuantizedExperts`);
- `shared_experts`: the always-on shared experts (DeepSeek, Qwen2-MoE); their sigmoid gate
  (one row) stays float;
- `dense_ffn`: the dense feed-forward layers of a model that mixes them with MoE layers
  (DeepSeek's first layers, Qwen2-MoE's `mlp_only_layers`, every other layer with `moe_interval`);
- `attention`: every `nn.Linear` inside a block's attention (`Block.attn`: q/k/v/o, and MLA's
  down- and up-projections);
- `head`: the output projection `lm_head`. With tied embeddings the head gets its own quantized
  copy and the embedding stays float (a lookup reads it).

Embeddings, norms and routers stay float. The record `model.quantization`
({"format", "bits", "block", "targets", "scale_dtype"}) is written into config.json by
`models.io.save_model_checkpoint`; `prepare_quantized` reads it back and builds the same
structure with empty buffers (on whatever device the model was built, meta included) before
the state is loaded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moekit.checkfiles import CheckpointError, read_json
from moekit.layers.experts import Experts, ModuleExperts
from moekit.layers.moe import MoE
from moekit.layers.quantized import QuantizedExperts, QuantizedLinear
from moekit.models.common import DenseFFN
from moekit.ops.quant import FORMAT, check_bits, check_block, check_code

TARGETS = ("experts", "shared_experts", "dense_ffn", "attention", "head")
SCALE_DTYPE_NAME = "float32"

__all__ = ["TARGETS", "QuantSpec", "load_quantized", "prepare_quantized", "quantize_model", "state_bytes"]


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how: bits (8 or 4), block (even, 2..4096), targets (a subset of
    TARGETS, as a sequence or a comma-separated string)."""

    bits: int = 8
    block: int = 32
    targets: tuple[str, ...] | str = ("experts",)
    code: str = "int"  # "nf4" (4 bits only): NormalFloat levels, QLoRA's base (ops/quant.py)

    def __post_init__(self):
        check_bits(self.bits, "")
        check_block(self.block, "")
        check_code(self.code, self.bits, "")
        targets = self.targets
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",")]
        if not isinstance(targets, Sequence) or not targets:
            raise ValueError(f"targets must name at least one of {', '.join(TARGETS)}, got {targets!r}")
        for t in targets:
            if t not in TARGETS:
                raise ValueError(f"targets: {t!r} is not a target; allowed: {', '.join(TARGETS)}")
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in targets))  # canonical order

    def record(self) -> dict:
        """The `quantization` entry of config.json."""
        record = {"format": FORMAT, "bits": self.bits, "block": self.block, "targets": list(self.targets),
                  "scale_dtype": SCALE_DTYPE_NAME}
        if self.code != "int":  # absent means the integer code: records written before NF4 read the same
            record["code"] = self.code
        return record

    @classmethod
    def from_record(cls, record, where: Path | str) -> QuantSpec:
        """Read a config.json `quantization` entry; anything this moekit cannot read is a
        CheckpointError naming the file."""
        if not isinstance(record, dict):
            raise CheckpointError(f"{where}: 'quantization' must be an object, got {type(record).__name__}")
        fmt = record.get("format")
        if fmt != FORMAT:
            raise CheckpointError(
                f"{where}: unknown quantization format {fmt!r}; this moekit reads {FORMAT!r} (upgrade moekit, "
                f"or re-quantize the float checkpoint with `moekit quantize`)")
        if record.get("scale_dtype", SCALE_DTYPE_NAME) != SCALE_DTYPE_NAME:
            raise CheckpointError(f"{where}: quantization scale_dtype {record.get('scale_dtype')!r} is not "
                                  f"{SCALE_DTYPE_NAME!r}, the only one {FORMAT} has")
        try:
            return cls(record.get("bits"), record.get("block"), tuple(record.get("targets") or ()),
                       record.get("code", "int"))
        except (ValueError, TypeError) as err:
            raise CheckpointError(f"{where}: quantization: {err}") from None


# ---------------------------------------------------------------------------------------------
# Finding what each target means in a model: (parent module, attribute name, module)


def _moe_layers(model: nn.Module) -> Iterator[MoE]:
    return (m for m in model.modules() if isinstance(m, MoE))


def target_sites(model: nn.Module, target: str,
                 linear: tuple[type, ...] = (nn.Linear,)) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute, module) of every module a target names; `linear` is the class of the
    projections to find for attention, dense_ffn and head (LoRA also finds quantized ones)."""
    if target == "experts":
        sites = []
        for moe in _moe_layers(model):
            if isinstance(moe.experts, ModuleExperts):
                raise ValueError("targets: 'experts' cannot quantize user-module experts "
                                 "(MoE(experts=[...])); only stacked experts")
            sites.append((moe, "experts", moe.experts))
        return sites
    if target == "shared_experts":
        return [(m.shared_expert, "ffn", m.shared_expert.ffn) for m in _moe_layers(model)
                if m.shared_expert is not None]
    if target in ("attention", "dense_ffn"):
        sites = []
        for block in model.modules():
            owner = getattr(block, "attn", None) if target == "attention" else block
            if not isinstance(owner, DenseFFN if target == "dense_ffn" else nn.Module):
                continue
            for name, lin in owner.named_modules():
                if isinstance(lin, linear):
                    parent_name, _, attr = name.rpartition(".")
                    sites.append((owner.get_submodule(parent_name), attr, lin))
        return sites
    head = getattr(model, "lm_head", None)
    return [(model, "lm_head", head)] if isinstance(head, linear) else []


def available_targets(model: nn.Module) -> list[str]:
    """The targets `model` has something to quantize for, in TARGETS order."""
    return [t for t in TARGETS if target_sites(model, t)]


def _quantized_twin(module: nn.Module, spec: QuantSpec, fill: bool) -> nn.Module:
    if isinstance(module, Experts):
        if fill:
            return QuantizedExperts.from_experts(module, spec.bits, spec.block, spec.code)
        return QuantizedExperts.like(module, spec.bits, spec.block, code=spec.code)
    w = module.weight
    if fill:
        return QuantizedLinear.from_linear(module, spec.bits, spec.block, spec.code)
    return QuantizedLinear(module.in_features, module.out_features, module.bias is not None, bits=spec.bits,
                           block=spec.block, dtype=w.dtype, device=w.device, code=spec.code)


def _apply_spec(model: nn.Module, spec: QuantSpec, fill: bool) -> nn.Module:
    if getattr(model, "quantization", None) is not None or any(
            isinstance(m, (QuantizedExperts, QuantizedLinear)) for m in model.modules()):
        raise ValueError("the model is quantized already; quantize its float checkpoint instead")
    plan = []
    for target in spec.targets:
        sites = target_sites(model, target)
        if not sites:
            have = available_targets(model)
            raise ValueError(f"targets: this {type(model).__name__} has no {target} to quantize; "
                             f"it has: {', '.join(have) or 'nothing quantizable'}")
        plan += sites
    twins = [(parent, name, _quantized_twin(module, spec, fill)) for parent, name, module in plan]
    for parent, name, twin in twins:  # every twin is made (and checked) before anything is swapped
        setattr(parent, name, twin)
    model.quantization = spec.record()
    return model


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int = 8, block: int = 32,
                   targets: Sequence[str] | str = ("experts",), code: str = "int") -> nn.Module:
    """Swap the target modules of `model` for quantized ones, in place (and return it). The
    quantized modules have no parameters: they are for inference, or the frozen base of QLoRA."""
    if not isinstance(model, nn.Module) or not hasattr(model, "cfg"):
        raise ValueError(f"quantize_model needs a moekit model (with .cfg), got {type(model).__name__}")
    return _apply_spec(model, QuantSpec(bits, block, targets, code), fill=True)


def prepare_quantized(model: nn.Module, config_path: str | Path) -> nn.Module:
    """Give a freshly built model the quantized structure its checkpoint's config.json records
    (empty buffers of the right shapes, nothing quantized); a config without a `quantization`
    entry leaves the model as it is."""
    data = read_json(config_path)
    if "quantization" not in data:
        return model
    spec = QuantSpec.from_record(data["quantization"], config_path)
    try:
        return _apply_spec(model, spec, fill=False)
    except ValueError as err:
        raise CheckpointError(f"{config_path}: {err}") from None


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict, each storage once (tied weights are stored once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.device) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def load_quantized(path: str | Path, bits: int = 8, block: int = 32, targets: Sequence[str] | str = ("experts",),
                   map_location: str | torch.device = "cpu", *, fallback: bool = False) -> nn.Module:
    """The model at PATH (a moekit checkpoint, a run folder or a Hugging Face folder), quantized
    on load. A checkpoint quantized already with the same settings is returned as it is; with
    other settings it is an error (quantize its float source instead)."""
    from moekit.models.io import load_model, resolve_checkpoint

    spec = QuantSpec(bits, block, targets)  # checked before reading anything
    ref = resolve_checkpoint(path, fallback=fallback)
    if ref.kind == "hf":
        # The one upward import: Hugging Face folders are read by moekit.hf, which builds models.
        from moekit.hf import from_hf

        model = from_hf(ref.path).to(map_location)
    else:
        model = load_model(ref, map_location)
    have = getattr(model, "quantization", None)
    if have is not None:
        if have == spec.record():
            return model
        raise ValueError(f"{ref.path} is quantized already ({have['bits']} bits, block {have['block']}, "
                         f"targets {','.join(have['targets'])}); load it as it is, or quantize its float source")
    return quantize_model(model, spec.bits, spec.block, spec.targets)

