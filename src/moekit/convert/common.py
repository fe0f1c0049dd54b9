"""What the dense-to-MoE converters share: finding the dense FFN layers of a model, swapping one
for a MoE while keeping the model's config honest, and counting active FFN FLOPs per token.

Shape legend: D d_model, F dense FFN width, Fe one expert's width, E experts, H = 2F for gated
activations (gate rows, then up rows: the layout of `layers/experts.py`) and F otherwise.

Recognised models: moekit's `DecoderLM` (its dense FFNs are SwiGLU `DenseFFN`s without biases) and
the BERT-style encoder `EncoderClassifier` (GELU `DenseFFN`s with biases), including those loaded
from Hugging Face through `moekit.hf` (Llama, Qwen2 and BERT checkpoints load as these).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moekit.layers.config import MoEConfig
from moekit.layers.moe import MoE
from moekit.models import common
from moekit.models.decoder import DecoderConfig
from moekit.models.encoder import EncoderConfig
from moekit.ops.activations import GATED
from moekit.validate import check_int


class ConversionError(ValueError):
    """A model or argument the converters cannot handle; the message names the problem."""


@dataclass
class DenseFFNWeights:
    """One dense FFN's weights in the expert layout: w_in (H, D), w_out (D, F), biases or None."""

    w_in_HD: Tensor
    w_out_DF: Tensor
    b_in_H: Tensor | None
    b_out_D: Tensor | None
    activation: str

    @property
    def gated(self) -> bool:
        return self.activation in GATED

    @property
    def width(self) -> int:
        return self.w_out_DF.shape[1]

    def rows(self, idx_F: Tensor) -> Tensor:
        """w_in rows of neurons `idx_F`: for gated FFNs the gate rows, then the up rows."""
        if not self.gated:
            return self.w_in_HD[idx_F]
        F = self.width
        return torch.cat((self.w_in_HD[idx_F], self.w_in_HD[F + idx_F]), dim=0)  # (2n, D)

    def bias_rows(self, idx_F: Tensor) -> Tensor | None:
        if self.b_in_H is None:
            return None
        if not self.gated:
            return self.b_in_H[idx_F]
        return torch.cat((self.b_in_H[idx_F], self.b_in_H[self.width + idx_F]))


def model_kind(model: nn.Module) -> str:
    """'decoder' or 'encoder'; raises ConversionError for anything else."""
    cfg = getattr(model, "cfg", None)
    if isinstance(cfg, DecoderConfig) and hasattr(model, "blocks"):
        return "decoder"
    if isinstance(cfg, EncoderConfig) and hasattr(model, "blocks"):
        return "encoder"
    raise ConversionError(
        f"no FFN layers the converter recognises in {type(model).__name__}: it converts moekit's DecoderLM and "
        f"EncoderClassifier (and Llama / Qwen2 / BERT checkpoints loaded through moekit.hf.from_hf)"
    )


def dense_ffn_layers(model: nn.Module) -> list[int]:
    """Indices of the blocks whose FFN is a dense `DenseFFN`; raises if there is none."""
    kind = model_kind(model)
    layers = [i for i, block in enumerate(model.blocks) if isinstance(getattr(block, "ffn", None), common.DenseFFN)]
    if not layers:
        raise ConversionError(
            f"no dense FFN layers the converter recognises in this {kind}: every block's FFN is already "
            f"{type(model.blocks[0].ffn).__name__}"
        )
    return layers


def dense_weights(ffn: common.DenseFFN) -> DenseFFNWeights:
    """The dense FFN's tensors (detached views) in the stacked-expert layout."""
    if ffn.gated:
        w_in = torch.cat((ffn.gate_proj.weight, ffn.up_proj.weight), dim=0)  # (2F, D): gate rows, then up
        b_in = None if ffn.up_proj.bias is None else torch.cat((ffn.gate_proj.bias, ffn.up_proj.bias))
    else:
        w_in, b_in = ffn.up_proj.weight, ffn.up_proj.bias
    b_out = ffn.down_proj.bias
    return DenseFFNWeights(w_in.detach(), ffn.down_proj.weight.detach(), None if b_in is None else b_in.detach(),
                           None if b_out is None else b_out.detach(), ffn.activation)


def check_positive_int(name: str, value, minimum: int = 1) -> None:
    check_int("", name, value, minimum, error=ConversionError)


def converted_config(model: nn.Module, moe: MoEConfig, every: int):
    """The model's config with MoE FFNs in every `every`-th block (its `moe_interval`)."""
    cfg = model.cfg
    if cfg.moe is not None:
        raise ConversionError(
            f"the model already has MoE layers {cfg.moe_layers}; the converters take a dense model "
            f"(a config holds one MoE layout, so adding a second kind of MoE layer is not representable)"
        )
    changes = dict(moe=moe, moe_interval=every, preset=None)
    if isinstance(cfg, DecoderConfig):
        if cfg.first_k_dense or cfg.dense_layers:
            raise ConversionError("DecoderConfig.first_k_dense / dense_layers must be unset on a dense model")
    try:
        return dataclasses.replace(cfg, **changes)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"the converted model's config is invalid: {err}") from err


def converted_moe(model: nn.Module, dense0: common.DenseFFN, layers: list[int], every: int, what: str,
                  **moe_fields) -> tuple[MoEConfig, Any, list[int]]:
    """The MoE config that replaces the dense FFN `dense0` (same d_model, activation and biases;
    causal in a decoder), the converted model config, and the dense `layers` it converts.
    `what` names the converter in errors."""
    try:
        moe_cfg = MoEConfig(d_model=model.cfg.d_model, activation=dense0.activation,
                            expert_bias=dense0.down_proj.bias is not None, causal=model_kind(model) == "decoder",
                            **moe_fields)
    except (TypeError, ValueError) as err:
        raise ConversionError(f"invalid MoE for {what}: {err}") from err
    new_cfg = converted_config(model, moe_cfg, every)
    chosen = [i for i in layers if new_cfg.is_moe_layer(i)]
    if not chosen:
        raise ConversionError(
            f"every={every} selects no block of this {model.cfg.n_layers}-layer model "
            f"(block i is converted when (i + 1) % every == 0)"
        )
    return moe_cfg, new_cfg, chosen


def swap_ffns(model: nn.Module, new_cfg, build_moe) -> nn.Module:
    """A copy of `model` whose FFN in each MoE layer of `new_cfg` is `build_moe(i, dense_ffn)`.

    The copy keeps every other tensor, the device, the dtype and attributes such as `hf_source`;
    its `cfg` is `new_cfg`, so `build_model(new.cfg).load_state_dict(new.state_dict())` holds.
    """
    new = copy.deepcopy(model)
    new.cfg = new_cfg
    for i, block in enumerate(new.blocks):
        if not new_cfg.is_moe_layer(i):
            continue
        dense = block.ffn
        if not isinstance(dense, common.DenseFFN):  # pragma: no cover - converted_config refuses MoE models
            raise ConversionError(f"block {i} has no dense FFN to convert")
        ref = dense.down_proj.weight
        moe = build_moe(i, dense).to(device=ref.device, dtype=ref.dtype)
        block.ffn = moe
        if hasattr(block, "is_moe"):  # the decoder block decides dense vs MoE once, at init
            block.is_moe = True
    return new


# ---------------------------------------------------------------------------------------------
# FLOPs


def _ffn_flops(d_model: int, width: int, activation: str) -> int:
    """Multiply-adds x 2 of one FFN on one token: 2 matrices (3 when gated) of D x width."""
    mats = 3 if activation in GATED else 2
    return 2 * mats * d_model * width


def moe_flops_per_token(cfg: MoEConfig) -> dict[str, float]:
    """Forward FLOPs of one MoE layer per token: router, routed experts (experts_per_token of
    them: top_k for token choice) and shared experts. Biases and activations are not counted."""
    router = 2 * common.router_params(cfg)
    experts = common.experts_per_token(cfg) * _ffn_flops(cfg.d_model, cfg.d_ff, cfg.activation)
    shared = _ffn_flops(cfg.d_model, cfg.shared_width, cfg.activation) if cfg.num_shared_experts else 0
    if cfg.shared_expert_gate:
        shared += 2 * cfg.d_model
    return {"router": float(router), "experts": float(experts), "shared": float(shared),
            "total": float(router + experts + shared)}


def ffn_flops_per_token(model: nn.Module) -> float:
    """Active FFN forward FLOPs per token summed over the model's blocks (dense FFNs and MoEs
    with stacked experts; routers included)."""
    total = 0.0
    for block in model.blocks:
        ffn = block.ffn
        if isinstance(ffn, common.DenseFFN):
            d_ff, d_model = ffn.down_proj.in_features, ffn.down_proj.out_features  # down_proj: (D, F)
            total += _ffn_flops(d_model, d_ff, ffn.activation)
        elif isinstance(ffn, MoE):
            total += moe_flops_per_token(ffn.cfg)["total"]
        else:
            raise ConversionError(f"cannot count FLOPs of FFN type {type(ffn).__name__}")
    return total
