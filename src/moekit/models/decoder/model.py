"""Decoder-only MoE language model: the Mixtral / Qwen-MoE / OLMoE / DeepSeek-V3 family.

Read top to bottom: config, KV cache, attention (grouped-query, or DeepSeek's multi-head latent
attention), block, model. Parameter counting and the dense twin are in `params.py`.

Shape legend: B batch, L new tokens, S keys (cached + new), D d_model, V vocab, H query heads,
G key/value heads, Dh head dim, F ffn width, E experts.

Numerics follow `transformers` so Hugging Face checkpoints load with logit parity: RMSNorm
statistics in float32 with the weight applied in the input dtype; rotary embedding in the
rotate-half layout (interleaved pairs for DeepSeek's MLA), tables computed in float32; attention
scaled by 1/sqrt(head_dim) with head_dim free of d_model / n_heads; softmax over keys in float32
(scaled_dot_product_attention does this internally).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.capacity import CausalState
from moekit.layers.config import MoEConfig
from moekit.layers.moe import MoE
from moekit.models import common
from moekit.models import rope as rotary
from moekit.ops.activations import ACTIVATIONS

QK_NORMS = ("none", "head", "full")
ATTENTIONS = ("gqa", "mla")
RMSNorm = common.RMSNorm
LATENT_NORM_EPS = 1e-6  # DeepSeek's released code (and transformers) hard-code eps for the MLA latent norms


# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, section 2.1): keys and values
    are rebuilt from a compressed latent of width kv_lora_rank, and only the latent plus one
    shared rotary key of width qk_rope_head_dim is cached per token."""

    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536  # None = queries projected directly from d_model
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_interleave: bool = True  # DeepSeek's released weights rotate interleaved pairs

    def __post_init__(self):
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "qk_rope_head_dim"):
            common.check_int("MLAConfig", name, getattr(self, name), 1)
        if self.q_lora_rank is not None:
            common.check_int("MLAConfig", "q_lora_rank", self.q_lora_rank, 1)
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"MLAConfig.qk_rope_head_dim must be even (rotary pairs), got {self.qk_rope_head_dim}")
        common.check_bool("MLAConfig", "rope_interleave", self.rope_interleave)


@dataclass
class DecoderConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int | None = None  # None = n_heads (multi-head); fewer = grouped-query attention
    head_dim: int | None = None  # None = d_model // n_heads; Qwen3-MoE uses 128 with d_model 2048, 32 heads
    d_ff: int = 256  # width of the dense FFN layers (and of a dense model)
    activation: str = "swiglu"  # dense FFN activation; experts use moe.activation
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"type": "linear" | "yarn" | "llama3", ...}: see models/rope.py
    norm_eps: float = 1e-6
    qk_norm: str = "none"  # "head": RMSNorm per head (Qwen3-MoE); "full": over the whole q/k projection (OLMoE)
    attention_bias: bool = False  # bias on q/k/v (Qwen2-MoE), and MLA's down-projections
    attention_out_bias: bool = False  # bias on the output projection
    clip_qkv: float | None = None  # OLMoE: clamp q, k, v to [-clip, clip]
    tie_embeddings: bool = False
    attention: str = "gqa"  # "gqa" or "mla" (DeepSeek-V2/V3)
    mla: MLAConfig | dict | None = None
    moe: MoEConfig | dict | None = None  # None = dense model
    moe_interval: int = 1  # layer i is MoE when (i + 1) % moe_interval == 0 (Qwen2-MoE decoder_sparse_step)
    first_k_dense: int = 0  # the first K layers stay dense (DeepSeek first_k_dense_replace)
    dense_layers: tuple[int, ...] = ()  # further layers kept dense (Qwen2-MoE mlp_only_layers)
    init_std: float = 0.02
    preset: str | None = None  # informational: the preset this config came from

    def __post_init__(self):
        own = "DecoderConfig"
        common.check_int(own, "vocab_size", self.vocab_size, 1)
        common.check_int(own, "d_model", self.d_model, 1)
        common.check_int(own, "n_layers", self.n_layers, 1)
        common.check_int(own, "n_heads", self.n_heads, 1)
        if self.n_kv_heads is not None:
            common.check_int(own, "n_kv_heads", self.n_kv_heads, 1)
            if self.n_heads % self.n_kv_heads:
                raise ValueError(
                    f"{own}.n_kv_heads ({self.n_kv_heads}) must divide n_heads ({self.n_heads}): "
                    f"each key/value head serves a whole group of query heads"
                )
        if self.head_dim is not None:
            common.check_int(own, "head_dim", self.head_dim, 2)
        elif self.d_model % self.n_heads:
            raise ValueError(
                f"{own}.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}), "
                f"or set head_dim explicitly"
            )
        common.check_int(own, "d_ff", self.d_ff, 1)
        common.check_choice(own, "activation", self.activation, ACTIVATIONS)
        common.check_int(own, "max_seq_len", self.max_seq_len, 1)
        common.check_float(own, "rope_theta", self.rope_theta)
        self.rope_scaling = rotary.check_rope_scaling(own, self.rope_scaling)
        common.check_float(own, "norm_eps", self.norm_eps)
        common.check_choice(own, "qk_norm", self.qk_norm, QK_NORMS)
        for name in ("attention_bias", "attention_out_bias", "tie_embeddings"):
            common.check_bool(own, name, getattr(self, name))
        common.check_float(own, "clip_qkv", self.clip_qkv, allow_none=True)
        common.check_choice(own, "attention", self.attention, ATTENTIONS)
        if self.attention == "mla":
            if isinstance(self.mla, dict):
                self.mla = MLAConfig(**self.mla)
            elif self.mla is None:
                self.mla = MLAConfig()
            elif not isinstance(self.mla, MLAConfig):
                raise TypeError(f"{own}.mla must be None, a dict or MLAConfig, got {type(self.mla).__name__}")
            if self.qk_norm != "none":
                raise ValueError(f"{own}.qk_norm must be 'none' with attention='mla' (MLA normalises its latents)")
        else:
            if self.mla is not None:
                raise ValueError(f"{own}.mla is only used with attention='mla'; got attention={self.attention!r}")
            if self.attn_head_dim % 2:
                raise ValueError(f"{own}: head dim ({self.attn_head_dim}) must be even for rotary embeddings")
        self.moe = common.nested_moe(own, self.moe, self.d_model, causal=True)
        common.check_int(own, "moe_interval", self.moe_interval, 1)
        common.check_int(own, "first_k_dense", self.first_k_dense, 0)
        if self.first_k_dense > self.n_layers:
            raise ValueError(f"{own}.first_k_dense ({self.first_k_dense}) must be <= n_layers ({self.n_layers})")
        self.dense_layers = tuple(self.dense_layers)
        for i in self.dense_layers:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.n_layers:
                raise ValueError(f"{own}.dense_layers entries must be layer indices in [0, {self.n_layers}), got {i!r}")
        common.check_float(own, "init_std", self.init_std)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        return self.mla.qk_rope_head_dim if self.attention == "mla" else self.attn_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return (
            self.moe is not None
            and i >= self.first_k_dense
            and (i + 1) % self.moe_interval == 0
            and i not in self.dense_layers
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Per-layer keys and values of every token seen so far, (B, G, S, Dh) each; for MLA the
    compressed latent (B, 1, S, kv_lora_rank) and the shared rotary key (B, 1, S, rope). MoE
    layers with capacity keep their causal counts here too (layers/capacity.py), so a token's
    experts are the same with and without the cache."""

    def __init__(self, n_layers: int):
        self.first: list[Tensor | None] = [None] * n_layers
        self.second: list[Tensor | None] = [None] * n_layers
        self.moe: list[CausalState] = [CausalState() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return 0 if self.first[0] is None else self.first[0].shape[2]

    def update(self, layer: int, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        if self.first[layer] is not None:
            a = torch.cat((self.first[layer], a), dim=2)
            b = torch.cat((self.second[layer], b), dim=2)
        self.first[layer], self.second[layer] = a, b
        return a, b


def build_attention_mask(attention_mask_BS: Tensor | None, new_len: int, past_len: int) -> Tensor | None:
    """Boolean (B or 1, 1, L, S) mask, True = may attend; None when plain causal suffices.

    Query i (absolute position past_len + i) sees keys j <= past_len + i that are not padding.
    A padding query (left padding) has no such key; letting it see itself keeps its softmax finite,
    so no NaN reaches the values of later layers (0 * NaN is NaN even where the mask says 0).
    """
    if attention_mask_BS is None and (past_len == 0 or new_len == 1):
        return None
    device = attention_mask_BS.device if attention_mask_BS is not None else None
    total = past_len + new_len
    q_pos_L = torch.arange(past_len, total, device=device)
    k_pos_S = torch.arange(total, device=device)
    causal_LS = k_pos_S[None, :] <= q_pos_L[:, None]
    allowed = causal_LS[None, None]  # (1, 1, L, S)
    if attention_mask_BS is not None:
        allowed = allowed & attention_mask_BS.bool()[:, None, None, :]
    return allowed | (k_pos_S[None, :] == q_pos_L[:, None])[None, None]


def sdpa(q_BHLd: Tensor, k_BHSd: Tensor, v_BHSd: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    causal = mask is None and q_BHLd.shape[2] == k_BHSd.shape[2] and q_BHLd.shape[2] > 1
    return F.scaled_dot_product_attention(q_BHLd, k_BHSd, v_BHSd, attn_mask=mask, is_causal=causal, scale=scale)


# ---------------------------------------------------------------------------------------------
# Attention


def _linear(d_in: int, d_out: int, bias: bool, std: float) -> nn.Linear:
    lin = nn.Linear(d_in, d_out, bias=bias)
    nn.init.normal_(lin.weight, std=std)
    if bias:
        nn.init.zeros_(lin.bias)
    return lin


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): G key/value heads each serve H/G queries."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
        self.qk_norm, self.clip = cfg.qk_norm, cfg.clip_qkv
        hq, hkv, std = self.n_heads * self.head_dim, self.n_kv * self.head_dim, cfg.init_std
        self.q_proj = _linear(cfg.d_model, hq, cfg.attention_bias, std)
        self.k_proj = _linear(cfg.d_model, hkv, cfg.attention_bias, std)
        self.v_proj = _linear(cfg.d_model, hkv, cfg.attention_bias, std)
        self.o_proj = _linear(hq, cfg.d_model, cfg.attention_out_bias, std)
        if cfg.qk_norm == "head":  # Qwen3: one RMSNorm over each head's Dh, shared by the heads
            self.q_norm, self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps), RMSNorm(self.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "full":  # OLMoE: over the whole projection, before the head split
            self.q_norm, self.k_norm = RMSNorm(hq, cfg.norm_eps), RMSNorm(hkv, cfg.norm_eps)
        self.scale = self.head_dim**-0.5

    def forward(self, x_BLD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        B, L, _ = x_BLD.shape
        q, k, v = self.q_proj(x_BLD), self.k_proj(x_BLD), self.v_proj(x_BLD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q_BHLd = q.view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
        k_BGLd = k.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, L, Dh)
        v_BGLd = v.view(B, L, self.n_kv, self.head_dim).transpose(1, 2)  # (B, G, L, Dh)
        if self.qk_norm == "head":
            q_BHLd, k_BGLd = self.q_norm(q_BHLd), self.k_norm(k_BGLd)
        q_BHLd, k_BGLd = common.apply_rope(q_BHLd, cos, sin), common.apply_rope(k_BGLd, cos, sin)
        if cache is not None:
            k_BGLd, v_BGLd = cache.update(self.layer_idx, k_BGLd, v_BGLd)  # now (B, G, S, Dh)
        rep = self.n_heads // self.n_kv  # key/value head g serves query heads g*rep .. g*rep+rep-1
        k_BHSd = k_BGLd.repeat_interleave(rep, dim=1) if rep > 1 else k_BGLd
        v_BHSd = v_BGLd.repeat_interleave(rep, dim=1) if rep > 1 else v_BGLd
        out_BHLd = sdpa(q_BHLd, k_BHSd, v_BHSd, mask, self.scale)
        return self.o_proj(out_BHLd.transpose(1, 2).reshape(B, L, -1))  # (B, L, H*Dh) -> (B, L, D)


class LatentAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention (arXiv 2405.04434 eq. 9-19). Each head's key is
    [k_nope (from the latent) ; k_rope (one rotary key shared by all heads)], its query likewise;
    the cache keeps only the normalised latent and the rotary key."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        m, std, d = cfg.mla, cfg.init_std, cfg.d_model
        self.layer_idx, self.n_heads, self.mla = layer_idx, cfg.n_heads, m
        qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank is None:
            self.q_proj = _linear(d, cfg.n_heads * qk_dim, False, std)
        else:
            self.q_a_proj = _linear(d, m.q_lora_rank, cfg.attention_bias, std)
            self.q_a_norm = RMSNorm(m.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = _linear(m.q_lora_rank, cfg.n_heads * qk_dim, False, std)
        self.kv_a_proj = _linear(d, m.kv_lora_rank + m.qk_rope_head_dim, cfg.attention_bias, std)
        self.kv_a_norm = RMSNorm(m.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = _linear(m.kv_lora_rank, cfg.n_heads * (m.qk_nope_head_dim + m.v_head_dim), False, std)
        self.o_proj = _linear(cfg.n_heads * m.v_head_dim, d, cfg.attention_out_bias, std)
        self.rope = common.apply_rope_interleaved if m.rope_interleave else common.apply_rope
        # Under YaRN, DeepSeek's MLA also rescales the softmax (models/rope.py).
        self.scale = qk_dim**-0.5 * rotary.mla_softmax_multiplier(cfg.rope_scaling)

    def forward(self, x_BLD: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, cache: KVCache | None) -> Tensor:
        B, L, _ = x_BLD.shape
        m, H = self.mla, self.n_heads
        q = self.q_proj(x_BLD) if m.q_lora_rank is None else self.q_b_proj(self.q_a_norm(self.q_a_proj(x_BLD)))
        q_BHLd = q.view(B, L, H, -1).transpose(1, 2)  # (B, H, L, nope + rope)
        q_nope, q_rot = q_BHLd.split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        latent, k_rot = self.kv_a_proj(x_BLD).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        latent_B1Lr = self.kv_a_norm(latent).unsqueeze(1)  # (B, 1, L, kv_lora_rank)
        k_rot_B1Lr = k_rot.unsqueeze(1)  # (B, 1, L, rope)
        q_rot, k_rot_B1Lr = self.rope(q_rot, cos, sin), self.rope(k_rot_B1Lr, cos, sin)
        if cache is not None:
            latent_B1Lr, k_rot_B1Lr = cache.update(self.layer_idx, latent_B1Lr, k_rot_B1Lr)  # L -> S
        S = latent_B1Lr.shape[2]
        kv_BHSd = self.kv_b_proj(latent_B1Lr.squeeze(1)).view(B, S, H, -1).transpose(1, 2)  # (B, H, S, nope + v)
        k_nope, v_BHSd = kv_BHSd.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
        k_BHSd = torch.cat((k_nope, k_rot_B1Lr.expand(B, H, S, -1)), dim=-1)
        q_BHLd = torch.cat((q_nope, q_rot), dim=-1)
        out_BHLd = sdpa(q_BHLd, k_BHSd, v_BHSd, mask, self.scale)
        return self.o_proj(out_BHLd.transpose(1, 2).reshape(B, L, -1))  # (B, L, H*v) -> (B, L, D)



# ---------------------------------------------------------------------------------------------
# Block and model


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is dense or MoE."""

    def __init__(self, cfg: DecoderConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = (LatentAttention if cfg.attention == "mla" else Attention)(cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.ffn = MoE(cfg.moe)
        else:
            self.ffn = common.DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, False, cfg.init_std)

    def forward(self, x_BLD, cos, sin, mask, cache, tokens_BL=None):
        """`mask` is the attention mask; `tokens_BL` marks the new tokens that are real (False =
        padding), for the MoE layer, which routes only those."""
        x_BLD = x_BLD + self.attn(self.attn_norm(x_BLD), cos, sin, mask, cache)
        h_BLD = self.ffn_norm(x_BLD)
        if not self.is_moe:
            return x_BLD + self.ffn(h_BLD), None
        state = cache.moe[self.attn.layer_idx] if cache is not None else None
        out = self.ffn(h_BLD, mask=tokens_BL, state=state)
        return x_BLD + out.output, out


@dataclass
class DecoderOutput:
    logits: Tensor  # (B, L, V); (B, 1, V) with last_logits_only
    aux_loss: Tensor  # scalar: the MoE layers' weighted auxiliary losses, summed
    layer_metrics: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)
    loss: Tensor | None = None  # lm_loss + aux_loss, when labels are given
    lm_loss: Tensor | None = None  # mean next-token cross-entropy
    cache: KVCache | None = None


class DecoderLM(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        if not isinstance(cfg, DecoderConfig):
            raise TypeError(f"DecoderLM expects a DecoderConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        nn.init.normal_(self.embed.weight, std=cfg.init_std)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        else:
            nn.init.normal_(self.lm_head.weight, std=cfg.init_std)

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.n_layers)

    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        cache: KVCache | None = None,
        last_logits_only: bool = False,
    ) -> DecoderOutput:
        """input_ids (B, L); attention_mask (B, past + L), 1 = real token, 0 = padding;
        position_ids (B, L) default past..past+L-1; cache is extended in place."""
        cfg = self.cfg
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int32, torch.int64):
            raise ValueError(
                f"input_ids must be an integer tensor (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}"
            )
        B, L = input_ids.shape
        past = cache.length if cache is not None else 0
        if past + L > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {past + L} (cached {past} + new {L}) exceeds "
                f"DecoderConfig.max_seq_len={cfg.max_seq_len}"
            )
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past + L):
            raise ValueError(
                f"attention_mask must have shape (batch, cached + new) = {(B, past + L)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = torch.arange(past, past + L, device=input_ids.device).expand(B, L)
        x_BLD = self.embed(input_ids)
        cos, sin = rotary.rope_cos_sin(position_ids, cfg.rope_dim, cfg.rope_theta, x_BLD.dtype, cfg.rope_scaling)
        mask = build_attention_mask(attention_mask, L, past)
        # The new tokens that are real, for the MoE layers; None when all are (checked once here
        # rather than in every layer: decode steps add real tokens only).
        tokens_BL = None if attention_mask is None else attention_mask[:, past:].bool()
        if tokens_BL is not None and not torch.compiler.is_compiling() and bool(tokens_BL.all()):
            tokens_BL = None
        aux_loss = x_BLD.new_zeros((), dtype=torch.float32)
        layer_metrics = []
        for i, block in enumerate(self.blocks):
            x_BLD, moe_out = block(x_BLD, cos, sin, mask, cache, tokens_BL)
            if moe_out is not None:
                aux_loss = aux_loss + moe_out.aux_loss
                layer_metrics.append((i, moe_out.metrics))
        h_BLD = self.norm(x_BLD[:, -1:] if last_logits_only else x_BLD)
        logits_BLV = self.lm_head(h_BLD)
        out = DecoderOutput(logits_BLV, aux_loss, layer_metrics, cache=cache)
        if labels is not None:
            if last_logits_only:
                raise ValueError("labels need every position's logits; do not pass last_logits_only")
            out.lm_loss = common.causal_lm_loss(logits_BLV, labels)
            out.loss = out.lm_loss + aux_loss
        return out

    @torch.no_grad()
    def generate(self, input_ids, **kwargs) -> Tensor:
        """See `moekit.models.generation.generate`: greedy or sampled continuation of a batch of
        prompts (left-padded tensor + attention_mask, or a list of token lists)."""
        from moekit.models.generation import generate

        return generate(self, input_ids, **kwargs)


