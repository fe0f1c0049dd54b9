"""MoEBERT: split each pretrained dense FFN into experts by neuron importance (Zuo et al.,
"MoEBERT: from BERT to Mixture-of-Experts via Importance-Guided Adaptation", NAACL 2022,
arXiv 2204.07675, section 3.2).

Shape legend: B examples in a batch, L tokens, D d_model, F dense FFN width, E experts,
s shared neurons, u = Fe - s neurons of an expert's own, Fe expert width.

Importance (the paper's eq. 3, a first-order Taylor estimate of the loss change when neuron j
is removed; Molchanov et al. 2019, Michel et al. 2019):

    I_j = sum over examples x of | (w1_j)^T grad_{w1_j} L(x) + (w2_j)^T grad_{w2_j} L(x) |

with w1_j the neuron's input weights (row j of the first projection; the gate and up rows for
SwiGLU) and w2_j its output weights (column j of the down projection). Both terms are read off
the activations: with z = W1 x (before the bias) and a = act(z + b) per token t,
(w1_j)^T grad_{w1_j} L = sum_t z_tj dL/dz_tj and (w2_j)^T grad_{w2_j} L = sum_t a_tj dL/da_tj,
so one backward pass over a batch of independent examples gives every example's term.

L is the task loss when the data has labels (what the paper uses: it distils fine-tuned models).
A sentence encoder has no labels: then L(x) = <e(x), r_x>, the projection of the mean-pooled
sentence embedding e(x) onto a random unit direction r_x drawn per example, so that I_j
estimates (up to a constant, averaged over directions) how far removing neuron j moves the
embeddings to first order: the quantity the distillation then has to recover.

Splitting (section 3.2, "the top-s neurons are shared by all experts, the rest are distributed
evenly"): neurons are sorted by I; the top `shared_neurons` go to every expert and the others
are dealt round-robin in importance order, the next u to expert 0, 1, ..., E-1, 0, 1, ... as in
the authors' code, so each expert receives a similar mix of importance levels. An expert is
W1[idx_e], b1[idx_e], W2[:, idx_e] and the full b2, with idx_e = shared + its own neurons.
With top-1 routing (renormalised, so the combine weight is exactly 1) a token pays one expert:
Fe / F of the dense FFN FLOPs, Fe = s + (F - s) / E by default.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from moekit.ops.activations import activate

_DERIVED = ("d_model", "d_ff", "num_experts", "top_k", "router", "activation", "expert_bias", "causal")


# ---------------------------------------------------------------------------------------------
# Data and losses


def as_kwargs(batch: Any) -> dict[str, Tensor]:
    """A batch is a dict of model keyword arguments (input_ids, attention_mask, token_type_ids,
    labels) or an input_ids tensor (B, L)."""
    if isinstance(batch, Tensor):
        return {"input_ids": batch}
    if isinstance(batch, dict) and "input_ids" in batch:
        return dict(batch)
    raise TypeError(f"a data batch must be an input_ids tensor or a dict with 'input_ids', got {type(batch).__name__}")


def mean_pool(h_BLD: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Mean over the real tokens (sentence-transformers' pooling_mode_mean_tokens), (B, D)."""
    if attention_mask is None:
        return h_BLD.mean(dim=1)
    m_BL1 = attention_mask.to(h_BLD.dtype).unsqueeze(-1)
    return (h_BLD * m_BL1).sum(dim=1) / m_BL1.sum(dim=1).clamp_min(1.0)


def default_example_losses(model: nn.Module, batch: dict[str, Tensor], generator: torch.Generator) -> Tensor:
    """Per-example losses (B,): the task loss with labels (cross-entropy, or squared error with
    one label), next-token loss for a decoder, else the random-direction embedding probe."""
    kind = model_kind(model)
    labels = batch.get("labels")
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    out = model(**kwargs)
    if kind == "decoder":
        ids = batch["input_ids"]
        logits = out.logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return nll.view(ids.shape[0], -1).mean(dim=1)
    if labels is not None:
        logits = out.logits.float()
        if logits.shape[-1] == 1:
            return (logits.squeeze(-1) - labels.float()) ** 2
        return F.cross_entropy(logits, labels, reduction="none")
    e_BD = mean_pool(out.hidden_states.float(), batch.get("attention_mask"))
    r_BD = torch.randn(e_BD.shape, generator=generator).to(e_BD.device)
    r_BD = r_BD / r_BD.norm(dim=-1, keepdim=True)
    return (e_BD * r_BD).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# Importance


class _Probe(nn.Module):
    """Stands in for a DenseFFN during scoring: the same function, keeping z = W1 x (before the
    bias) and a = act(z + b1) with their gradients."""

    def __init__(self, ffn: common.DenseFFN):
        super().__init__()
        self.ffn = ffn
        self.z: Tensor | None = None
        self.a: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        f = self.ffn
        z = F.linear(x, torch.cat((f.gate_proj.weight, f.up_proj.weight)) if f.gated else f.up_proj.weight)
        b_in = None if f.up_proj.bias is None else (
            torch.cat((f.gate_proj.bias, f.up_proj.bias)) if f.gated else f.up_proj.bias)
        h = z if b_in is None else z + b_in
        a = activate(h, f.activation)
        z.retain_grad()
        a.retain_grad()
        self.z, self.a = z, a
        return f.down_proj(a)

    def example_scores(self) -> Tensor:
        """(B, F): (w1_j)^T grad L(x) + (w2_j)^T grad L(x) per example (rows of the batch)."""
        z, a = self.z, self.a
        width = a.shape[-1]
        zg = (z * z.grad).flatten(1, -2).sum(dim=1)  # (B, H): sum over the tokens of each example
        if zg.shape[-1] != width:  # gated: the gate and the up rows both belong to neuron j
            zg = zg[:, :width] + zg[:, width:]
        ag = (a * a.grad).flatten(1, -2).sum(dim=1)  # (B, F)
        return zg + ag


def neuron_importance(
    model: nn.Module,
    data: Iterable[Any],
    loss_fn: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[int, Tensor]:
    """MoEBERT importance I (F,) of every dense FFN neuron, per block index, summed over `data`.

    loss_fn(model, batch) -> per-example losses (B,); default `default_example_losses`. Examples
    must be independent (no loss term mixes two examples), so one backward gives each its own
    term. The model is left unchanged (eval mode is used while scoring, then restored)."""
    layers = dense_ffn_layers(model)
    loss_fn = loss_fn or (lambda m, b: default_example_losses(m, b, generator))
    generator = torch.Generator().manual_seed(seed)
    probes = {i: _Probe(model.blocks[i].ffn) for i in layers}
    scores = {i: None for i in layers}
    was_training = model.training
    requires = {n: p.requires_grad for n, p in model.named_parameters()}
    model.eval()
    try:
        for i, probe in probes.items():
            model.blocks[i].ffn = probe
        seen = 0
        for batch in data:
            kwargs = as_kwargs(batch)
            model.zero_grad(set_to_none=True)
            losses_B = loss_fn(model, kwargs)
            if losses_B.dim() != 1:
                raise ValueError(f"loss_fn must return per-example losses (B,), got shape {tuple(losses_B.shape)}")
            losses_B.sum().backward()
            for i, probe in probes.items():
                s_F = probe.example_scores().abs().sum(dim=0).detach().float()  # eq. 3: |.| per example
                scores[i] = s_F if scores[i] is None else scores[i] + s_F
                probe.z = probe.a = None
            seen += losses_B.shape[0]
            if progress is not None:
                progress(losses_B.shape[0])
        if seen == 0:
            raise ConversionError("moebert needs data: the data iterable gave no batch")
    finally:
        for i, probe in probes.items():
            model.blocks[i].ffn = probe.ffn
        model.zero_grad(set_to_none=True)
        for n, p in model.named_parameters():
            p.requires_grad_(requires[n])
        model.train(was_training)
    return scores


# ---------------------------------------------------------------------------------------------
# Splitting


def split_neurons(importance_F: Tensor, num_experts: int, shared_neurons: int, expert_width: int) -> Tensor:
    """(E, Fe) neuron indices of each expert: the top `shared_neurons` first, then the expert's
    own share of the rest dealt round-robin in importance order (Zuo et al. 2022, section 3.2)."""
    order_F = torch.argsort(importance_F, descending=True, stable=True)
    shared_S = order_F[:shared_neurons]
    rest = order_F[shared_neurons:]
    own = expert_width - shared_neurons
    idx = [torch.cat((shared_S, rest[e::num_experts][:own])) for e in range(num_experts)]
    return torch.stack(idx)  # (E, Fe)


def moebert(
    model: nn.Module,
    num_experts: int,
    shared_neurons: int,
    data: Iterable[Any] | None = None,
    *,
    expert_width: int | None = None,
    importance: dict[int, Tensor] | None = None,
    top_k: int = 1,
    router: str = "softmax_topk",
    router_options: Any = None,
    every: int = 1,
    loss_fn: Callable | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    **moe_options: Any,
) -> nn.Module:
    """A copy of the dense encoder `model` whose FFNs are MoEs of `num_experts` experts cut from
    the dense FFN by neuron importance on `data` (or precomputed `importance`, as returned by
    `neuron_importance`). Each expert holds the `shared_neurons` most important neurons plus its
    own share of the rest; expert_width (default shared + (F - shared) // num_experts, every
    neuron used once except a remainder < num_experts of the least important) may be smaller, to
    drop the least important neurons as the paper's BERT-base setting does (3072 -> 4 x 768 with
    512 shared). Routing: top_k (default 1) of a `router` (default softmax top-k, renormalised,
    so a token's single expert gets weight exactly 1), randomly initialised like the paper's
    gate, with no balancing loss unless `aux_loss_coef` is given. Decoders are accepted too (SwiGLU
    neurons own a gate and an up row). The input model is left unchanged.
    """
    model_kind(model)  # refuses a model the converters do not know, before any other check
    layers = dense_ffn_layers(model)
    check_positive_int("num_experts", num_experts)
    check_positive_int("shared_neurons", shared_neurons, minimum=0)
    check_positive_int("every", every)
    check_positive_int("top_k", top_k)
    fixed = sorted(set(moe_options) & set(_DERIVED))
    if fixed:
        raise ConversionError(f"moebert sets {fixed} itself; pass them as moebert's own arguments (or not at all)")
    dense0 = model.blocks[layers[0]].ffn
    d_ff = dense0.down_proj.in_features
    if shared_neurons > d_ff:
        raise ConversionError(f"shared_neurons ({shared_neurons}) is larger than the FFN width d_ff ({d_ff})")
    widest = shared_neurons + (d_ff - shared_neurons) // num_experts
    if expert_width is None:
        expert_width = widest
    check_positive_int("expert_width", expert_width)
    if not shared_neurons <= expert_width <= widest:
        raise ConversionError(
            f"expert_width ({expert_width}) must be between shared_neurons ({shared_neurons}) and "
            f"shared_neurons + (d_ff - shared_neurons) // num_experts = {widest}: each expert adds its own "
            f"neurons to the shared ones, and there are d_ff = {d_ff} to share out"
        )
    # With renormalised top-1 routing the combine weight is 1 whatever the router says, so the task
    # gives the router no gradient; only a balancing loss would move it, re-routing tokens away from
    # the experts they were cut (and refitted) for. Measured on all-MiniLM-L6-v2: with the default
    # 0.01 the distillation lost held-out cosine, with 0 it gained (docs/convert.md). So: off unless asked.
    moe_options.setdefault("aux_loss_coef", 0.0)
    moe_cfg, new_cfg, chosen = converted_moe(
        model, dense0, layers, every, "moebert", d_ff=expert_width, num_experts=num_experts, top_k=top_k,
        router=router, router_options=router_options, **moe_options,
    )
    if importance is None:
        if data is None:
            raise ConversionError("moebert needs `data` to score neurons (or precomputed `importance`)")
        importance = neuron_importance(model, data, loss_fn=loss_fn, seed=seed, progress=progress)
    missing = [i for i in chosen if i not in importance]
    if missing:
        raise ConversionError(f"importance has no scores for block(s) {missing}")
    for i in chosen:
        if importance[i].shape != (d_ff,):
            raise ConversionError(f"importance[{i}] must have shape ({d_ff},), got {tuple(importance[i].shape)}")

    def build(i: int, dense: common.DenseFFN) -> MoE:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed * 100003 + i)
            moe = MoE(new_cfg.moe)
            w = dense_weights(dense)
            idx_EF = split_neurons(importance[i].to(w.w_in_HD.device), num_experts, shared_neurons, expert_width)
            ex = moe.experts
            for e in range(num_experts):
                ex.w_in[e].copy_(w.rows(idx_EF[e]))
                ex.w_out[e].copy_(w.w_out_DF[:, idx_EF[e]])
                if ex.b_in is not None:
                    ex.b_in[e].copy_(w.bias_rows(idx_EF[e]))
                    ex.b_out[e].copy_(w.b_out_D)
            moe.neuron_index = idx_EF.cpu()  # which dense neurons each expert kept (for inspection)
        return moe

    return swap_ffns(model, new_cfg, build)
