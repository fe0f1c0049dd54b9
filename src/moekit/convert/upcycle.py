"""Sparse upcycling: turn a trained dense model's FFNs into MoE layers whose experts start as
copies of the dense FFN, then keep training (Komatsuzaki et al. 2022, "Sparse Upcycling:
Training Mixture-of-Experts from Dense Checkpoints", arXiv 2212.05055, section 3).

Shape legend: D d_model, F dense FFN width, g granularity, Fe = F / g one expert's width,
E = num_experts * g routed experts, K top_k, H = 2Fe (gated) or Fe.

Exactness. With every expert a copy of the dense FFN, any token-choice router whose combine
weights sum to one per token reproduces the dense output: sum_k w_k FFN(x) = FFN(x). That holds
for `softmax_topk` with `norm_topk_prob=True` (the default here), `dense`, `noisy_topk` (softmax
over the kept logits, Shazeer et al. 2017 eq. 3-5) and `sigmoid_bias` with `norm_topk_prob=True`
and `routed_scaling_factor=1`, all dropless (`capacity_factor=None`); `switch` scales by the
probability (output = p * FFN(x)), and expert choice / soft routing mix tokens differently, so
they start away from the dense model. Equality is up to float rounding: the MoE sums K weighted
copies and runs other kernels than nn.Linear (relative error ~3e-7 in float32 on the tiny models).

Fine-grained upcycling (granularity g > 1). Each dense FFN's F neurons are cut into g slices
S_1..S_g of Fe neurons; since the nonlinearity acts per neuron, FFN(x) = sum_j W_out[:, S_j]
act(W_in[S_j] x + b_in[S_j]) + b_out exactly. The MoE gets num_experts copies of each slice
(E = num_experts * g experts, expert c*g + j = copy c of slice j). Following the "virtual group"
initialisation of He et al. 2024 ("Upcycling Large Language Models into Mixture of Experts",
arXiv 2410.07524, section 3), the router rows of the g slices of one copy are tied, so a copy's
slices always score alike. With softmax top-K, K = g * k a multiple of g and weights renormalised,
top-K then selects k whole copies (all g slices of each: their scores tie) and each slice of copy c
gets weight p_c / (g * sum_{c' chosen} p_c'). The output is sum over chosen c, j of that weight
times expert (c, j), so scaling every expert's down projection by g (the gate scaling) and giving
each expert the full b_out makes it

    sum_c p_c / (g P) * (g * sum_j W_out[:, S_j] a_j) + b_out = FFN(x)   (P = sum of chosen p_c).

The `dense` router (all experts, weights summing to one) is exact for the same reason. When K is
not a multiple of g, some slices are missing for some tokens and the model starts near, not at,
the dense one; `noise` > 0 also breaks exactness (that is its purpose: Komatsuzaki et al. found
copies differentiate through routing alone, noise is optional).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from moekit.convert.common import (
    ConversionError,
    check_positive_int,
    converted_moe,
    dense_ffn_layers,
    dense_weights,
    model_kind,
    swap_ffns,
)
from moekit.layers.moe import MoE
from moekit.models import common

# MoEConfig fields upcycle decides itself (from the dense FFN and its own arguments).
_DERIVED = ("d_model", "d_ff", "num_experts", "top_k", "router", "router_options", "activation", "expert_bias",
            "causal")


def upcycle(
    model: nn.Module,
    num_experts: int,
    top_k: int,
    router: str = "softmax_topk",
    noise: float = 0.0,
    every: int = 1,
    granularity: int = 1,
    router_options: Any = None,
    seed: int = 0,
    **moe_options: Any,
) -> nn.Module:
    """A copy of the dense `model` whose FFN in every `every`-th block (blocks i with
    (i + 1) % every == 0, the config's `moe_interval`) is a MoE of copies of that FFN.

    num_experts: copies of each dense FFN; with `granularity` g each copy is cut into g experts of
        width d_ff / g, so the MoE has num_experts * g experts.
    top_k: experts per token, counted in those (possibly fine-grained) experts.
    router, router_options: any moekit router (see the module docstring for which start exact).
    noise: relative Gaussian noise added to each expert copy's matrices (std = noise * RMS of the
        dense matrix), to break the symmetry between copies; 0 keeps exact copies.
    moe_options: further MoEConfig fields (capacity_factor, aux_loss_coef, z_loss_coef, ...).
        Shared experts (num_shared_experts, shared_d_ff, shared_expert_gate: the Qwen2-MoE
        layout, so an upcycled Qwen2 exports with `to_hf`) start with a zero down projection:
        they add nothing until trained.

    The result's `cfg` describes it (moe set, moe_interval = every), so it trains with
    `moekit.train`, saves with `save_model_checkpoint` and reloads with `load_checkpoint`. The input
    model is left unchanged.
    """
    model_kind(model)  # refuses a model the converters do not know, before any other check
    layers = dense_ffn_layers(model)
    check_positive_int("num_experts", num_experts)
    check_positive_int("granularity", granularity)
    check_positive_int("every", every)
    check_positive_int("top_k", top_k)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ConversionError(f"noise must be a finite number >= 0, got {noise!r}")
    fixed = sorted(set(moe_options) & set(_DERIVED))
    if fixed:
        raise ConversionError(f"upcycle sets {fixed} itself; pass them as upcycle's own arguments (or not at all)")
    dense0 = model.blocks[layers[0]].ffn
    d_ff = dense0.down_proj.in_features
    if d_ff % granularity:
        raise ConversionError(f"granularity ({granularity}) must divide the dense FFN width d_ff ({d_ff})")
    total = num_experts * granularity
    if top_k > total and router != "dense":
        raise ConversionError(
            f"top_k ({top_k}) must be <= the number of experts, num_experts * granularity = {total}"
        )
    moe_cfg, new_cfg, chosen = converted_moe(
        model, dense0, layers, every, "upcycling", d_ff=d_ff // granularity, num_experts=total, top_k=top_k,
        router=router, router_options=router_options, **moe_options,
    )

    def build(i: int, dense: common.DenseFFN) -> MoE:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed * 100003 + i)  # per layer, independent of the caller's RNG
            moe = MoE(new_cfg.moe)
            _fill_experts(moe, dense, num_experts, granularity, noise)
            _tie_router(moe, num_experts, granularity)
            if moe.shared_expert is not None:
                # A shared expert has no dense counterpart: start it at zero output (its down
                # projection zeroed) so the upcycled model still equals the dense one.
                moe.shared_expert.ffn.w_out.zero_()
                if moe.shared_expert.ffn.b_out is not None:
                    moe.shared_expert.ffn.b_out.zero_()
        return moe

    return swap_ffns(model, new_cfg, build)


@torch.no_grad()
def _fill_experts(moe: MoE, dense: common.DenseFFN, copies: int, g: int, noise: float) -> None:
    w = dense_weights(dense)
    Fe = w.width // g
    ex = moe.experts
    for j in range(g):
        idx_F = torch.arange(j * Fe, (j + 1) * Fe, device=w.w_in_HD.device)
        w_in_HD = w.rows(idx_F)  # (H, D): slice j's gate rows then up rows (or its up rows)
        # Gate scaling: K = g*k renormalised weights give each chosen slice 1/g of a copy's weight.
        w_out_DF = w.w_out_DF[:, idx_F] * g  # (D, Fe)
        b_in_H = w.bias_rows(idx_F)
        for c in range(copies):
            e = c * g + j
            ex.w_in[e].copy_(_noisy(w_in_HD, noise))
            ex.w_out[e].copy_(_noisy(w_out_DF, noise))
            if ex.b_in is not None:
                ex.b_in[e].copy_(b_in_H)
                ex.b_out[e].copy_(w.b_out_D)  # every expert carries the whole output bias (weights sum to 1)


def _noisy(t: torch.Tensor, noise: float) -> torch.Tensor:
    if noise == 0:
        return t
    rms = t.float().pow(2).mean().sqrt().to(t.dtype)
    return t + noise * rms * torch.randn_like(t)


@torch.no_grad()
def _tie_router(moe: MoE, copies: int, g: int) -> None:
    """Virtual groups (He et al. 2024): the g slices of a copy share one router row."""
    if g == 1:
        return
    for name in ("weight", "noise_weight"):
        w_ED = getattr(moe.router, name, None)
        if isinstance(w_ED, torch.Tensor) and w_ED.dim() == 2 and w_ED.shape[0] == copies * g:
            w_ED.copy_(w_ED[::g].repeat_interleave(g, dim=0))  # row c*g + j = row of copy c
