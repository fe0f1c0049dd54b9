"""Decoder parameter counts from the config alone (the big presets are never built), the layout
rows of `moekit info`, and the dense twin. `tests/models/test_decoder.py` checks every formula
against the built modules on tiny configs of each variant.
"""

from __future__ import annotations

from dataclasses import replace

from moekit.models import common
from moekit.models.decoder.model import DecoderConfig


def attention_params(cfg: DecoderConfig) -> int:
    d, h = cfg.d_model, cfg.n_heads
    if cfg.attention == "mla":
        m = cfg.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        ab = 1 if cfg.attention_bias else 0
        if m.q_lora_rank is None:
            q = d * h * qk
        else:
            q = (d + ab) * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * h * qk
        kv = (d + ab) * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank
        kv += m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim)
        o = h * m.v_head_dim * d + (d if cfg.attention_out_bias else 0)
        return q + kv + o
    hq, hkv = h * cfg.attn_head_dim, cfg.kv_heads * cfg.attn_head_dim
    n = d * (hq + 2 * hkv) + (hq + 2 * hkv if cfg.attention_bias else 0)
    n += hq * d + (d if cfg.attention_out_bias else 0)
    if cfg.qk_norm == "head":
        n += 2 * cfg.attn_head_dim
    elif cfg.qk_norm == "full":
        n += hq + hkv
    return n


def ffn_params(cfg: DecoderConfig, layer: int) -> tuple[int, int]:
    """(total, active) of layer `layer`'s feed-forward block."""
    if cfg.is_moe_layer(layer):
        return common.moe_params(cfg.moe)
    n = common.dense_ffn_params(cfg.d_model, cfg.d_ff, cfg.activation, False)
    return n, n


def count_decoder(cfg: DecoderConfig) -> tuple[int, int]:
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    total = active = embed + cfg.d_model  # embeddings, head, final norm
    per_layer = attention_params(cfg) + 2 * cfg.d_model  # attention and its two norms
    for i in range(cfg.n_layers):
        t, a = ffn_params(cfg, i)
        total, active = total + per_layer + t, active + per_layer + a
    return total, active


def describe_decoder(cfg: DecoderConfig) -> list[tuple[str, str]]:
    """Rows for `moekit info`: the attention and each run of identical layers."""
    if cfg.attention == "mla":
        m = cfg.mla
        attn = (f"MLA, {cfg.n_heads} heads, kv latent {m.kv_lora_rank}, q latent {m.q_lora_rank}, "
                f"qk {m.qk_nope_head_dim}+{m.qk_rope_head_dim} rope, v {m.v_head_dim}")
    else:
        kind = "MHA" if cfg.kv_heads == cfg.n_heads else ("MQA" if cfg.kv_heads == 1 else "GQA")
        attn = f"{kind}, {cfg.n_heads} q heads, {cfg.kv_heads} kv heads, head_dim {cfg.attn_head_dim}"
        if cfg.qk_norm != "none":
            attn += f", qk-norm ({cfg.qk_norm})"
    rows = [("attention", attn + f", rope theta {cfg.rope_theta:g}, max_seq_len {cfg.max_seq_len}")]
    if cfg.moe is not None:
        m = cfg.moe
        moe = f"{m.num_experts} experts x d_ff {m.d_ff} ({m.activation}), router {m.router}, top_k {m.top_k}"
        if m.num_shared_experts:
            moe += f", {m.num_shared_experts} shared (d_ff {m.shared_width}{', gated' if m.shared_expert_gate else ''})"
        moe += ", dropless" if m.capacity_factor is None else f", capacity factor {m.capacity_factor}"
        rows.append(("moe ffn", moe))
    if len(cfg.moe_layers) < cfg.n_layers:
        rows.append(("dense ffn", f"d_ff {cfg.d_ff} ({cfg.activation})"))
    kinds = ["M" if cfg.is_moe_layer(i) else "D" for i in range(cfg.n_layers)]
    runs, start = [], 0
    for i in range(1, cfg.n_layers + 1):
        if i == cfg.n_layers or kinds[i] != kinds[start]:
            name = "MoE" if kinds[start] == "M" else "dense"
            runs.append(f"{start}-{i - 1} {name}" if i - 1 > start else f"{start} {name}")
            start = i
    rows.append(("layers", f"{cfg.n_layers}: " + ", ".join(runs)))
    head = "tied" if cfg.tie_embeddings else "untied"
    rows.append(("embeddings", f"vocab {cfg.vocab_size} x d_model {cfg.d_model}, {head} head"))
    moe_ids = cfg.moe_layers
    embed = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    attn = cfg.n_layers * attention_params(cfg)
    norms = (2 * cfg.n_layers + 1) * cfg.d_model
    dense = sum(ffn_params(cfg, i)[0] for i in range(cfg.n_layers) if i not in moe_ids)
    rows.append(("params: embeddings", _fmt(embed)))
    rows.append(("params: attention", _fmt(attn)))
    rows.append(("params: dense ffn", _fmt(dense)))
    if moe_ids:
        t, a = common.moe_params(cfg.moe)
        rows.append(("params: moe ffn", f"{_fmt(len(moe_ids) * t)} total, {_fmt(len(moe_ids) * a)} active per token"))
    rows.append(("params: norms", _fmt(norms)))
    return rows


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit} ({n:,})"
    return f"{n:,}"


def decoder_dense_twin(cfg: DecoderConfig, match: str) -> DecoderConfig:
    """Same attention, embeddings and depth; every layer a dense FFN of one width F* chosen so the
    dense model's parameters equal the MoE model's active (or total) count up to rounding.

    Only the FFN blocks differ, so F* = round(budget / (n_layers * p)), where budget is the sum
    over layers of each FFN block's active (or total) parameters (router and shared experts
    included) and p the parameters per unit of width (3 * d_model for SwiGLU). The twin's
    count is within n_layers * p / 2 of the target.
    """
    budget = sum(ffn_params(cfg, i)[0 if match == "total" else 1] for i in range(cfg.n_layers))
    per_unit = common.dense_ffn_params(cfg.d_model, 1, cfg.activation, False)
    d_ff = max(1, round(budget / (cfg.n_layers * per_unit)))
    return replace(cfg, moe=None, d_ff=d_ff, first_k_dense=0, dense_layers=(), moe_interval=1, preset=None)
