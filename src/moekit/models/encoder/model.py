"""BERT-style bidirectional encoder with MoE feed-forward layers and a classification head.

Read top to bottom: config, embeddings, attention, block, model, the headless encoder (BertModel),
counting and dense twin.

Shape legend: B batch, L tokens, D d_model, H heads, Dh head dim, F ffn width, C classes.

The layout follows `transformers`' BertModel so BERT weights map one to one (Devlin et al. 2019):
learned word + position + token-type embeddings summed then LayerNorm; post-LayerNorm blocks
x = LN(x + attn(x)), x = LN(x + ffn(x)); exact (erf) GELU; a tanh pooler over [CLS]. The FFN of
any block is either a `DenseFFN` or a `MoE`; the block checks which at run time, so a converter
(MoEBERT, Zuo et al. 2022) can swap `blocks[i].ffn` for a MoE built from the dense weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.config import MoEConfig
from moekit.layers.moe import MoE
from moekit.models import common
from moekit.ops.activations import ACTIVATIONS

# ---------------------------------------------------------------------------------------------
# Config


@dataclass
class EncoderConfig:
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    activation: str = "gelu"  # BERT's exact GELU; dense FFN only (experts use moe.activation)
    max_seq_len: int = 512  # learned position embeddings (HF max_position_embeddings)
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    dropout: float = 0.1  # hidden dropout (embeddings, block outputs, classifier)
    attention_dropout: float = 0.1
    num_labels: int = 2  # 1 = regression (MSE), >= 2 = single-label classification (cross-entropy)
    pooler: bool = True  # tanh(W h_[CLS]) as in BERT; False = classify the raw [CLS] state
    moe: MoEConfig | dict | None = None  # None = dense encoder (plain BERT)
    moe_interval: int = 1  # block i is MoE when (i + 1) % moe_interval == 0
    init_std: float = 0.02
    preset: str | None = None

    def __post_init__(self):
        own = "EncoderConfig"
        for name, minimum in (("vocab_size", 1), ("d_model", 1), ("n_layers", 1), ("n_heads", 1), ("d_ff", 1),
                              ("max_seq_len", 1), ("type_vocab_size", 1), ("num_labels", 1), ("moe_interval", 1)):
            common.check_int(own, name, getattr(self, name), minimum)
        if self.d_model % self.n_heads:
            raise ValueError(f"{own}.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        common.check_choice(own, "activation", self.activation, ACTIVATIONS)
        common.check_float(own, "norm_eps", self.norm_eps)
        for name in ("dropout", "attention_dropout"):
            common.check_float(own, name, getattr(self, name), strict=False)
            if getattr(self, name) >= 1:
                raise ValueError(f"{own}.{name} must be in [0, 1), got {getattr(self, name)}")
        common.check_bool(own, "pooler", self.pooler)
        common.check_float(own, "init_std", self.init_std)
        if isinstance(self.moe, dict):
            # BERT-compatible experts by default: biased GELU MLPs like the dense FFN they replace.
            self.moe = {"activation": "gelu", "expert_bias": True, **self.moe}
        self.moe = common.nested_moe(own, self.moe, self.d_model, causal=False)

    def is_moe_layer(self, i: int) -> bool:
        return self.moe is not None and (i + 1) % self.moe_interval == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layers) if self.is_moe_layer(i)]


# ---------------------------------------------------------------------------------------------
# Embeddings, attention, block


def _linear(d_in: int, d_out: int, std: float) -> nn.Linear:
    lin = nn.Linear(d_in, d_out)
    nn.init.normal_(lin.weight, std=std)
    nn.init.zeros_(lin.bias)
    return lin


class Embeddings(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.position = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.d_model)
        for emb in (self.word, self.position, self.token_type):
            nn.init.normal_(emb.weight, std=cfg.init_std)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids_BL: Tensor, token_type_ids_BL: Tensor | None) -> Tensor:
        L = input_ids_BL.shape[1]
        if token_type_ids_BL is None:
            token_type_ids_BL = torch.zeros_like(input_ids_BL)
        pos_L = torch.arange(L, device=input_ids_BL.device)
        x_BLD = self.word(input_ids_BL) + self.position(pos_L)[None] + self.token_type(token_type_ids_BL)
        return self.drop(self.norm(x_BLD))


class SelfAttention(nn.Module):
    """Bidirectional multi-head attention; padded keys are masked out."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        d, std = cfg.d_model, cfg.init_std
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (_linear(d, d, std) for _ in range(4))
        self.p_drop = cfg.attention_dropout

    def forward(self, x_BLD: Tensor, mask_B11L: Tensor | None) -> Tensor:
        B, L, D = x_BLD.shape
        q, k, v = (
            p(x_BLD).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)
            for p in (self.q_proj, self.k_proj, self.v_proj)
        )
        out_BHLd = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_B11L,
                                                  dropout_p=self.p_drop if self.training else 0.0)
        return self.o_proj(out_BHLd.transpose(1, 2).reshape(B, L, D))  # (B, H, L, Dh) -> (B, L, D)


class Block(nn.Module):
    """Post-LN block (BERT): x = LN(x + drop(attn(x))); x = LN(x + drop(ffn(x)))."""

    def __init__(self, cfg: EncoderConfig, layer_idx: int):
        super().__init__()
        self.attn = SelfAttention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.ffn: nn.Module = MoE(cfg.moe)
        else:
            self.ffn = common.DenseFFN(cfg.d_model, cfg.d_ff, cfg.activation, bias=True, init_std=cfg.init_std)
        self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x_BLD: Tensor, mask_B11L: Tensor | None, tokens_BL: Tensor | None = None):
        """`tokens_BL` marks real tokens (False = padding); a MoE routes only those."""
        x_BLD = self.attn_norm(x_BLD + self.drop(self.attn(x_BLD, mask_B11L)))
        moe_out = None
        if isinstance(self.ffn, MoE):  # checked per call: the FFN may have been swapped after init
            moe_out = self.ffn(x_BLD, mask=tokens_BL)
            y_BLD = moe_out.output
        else:
            y_BLD = self.ffn(x_BLD)
        return self.ffn_norm(x_BLD + self.drop(y_BLD)), moe_out


# ---------------------------------------------------------------------------------------------
# Model


@dataclass
class EncoderOutput:
    logits: Tensor  # (B, C) class scores, or (B, 1) regression values
    hidden_states: Tensor  # (B, L, D) last block output
    aux_loss: Tensor  # scalar: the MoE layers' weighted auxiliary losses, summed
    layer_metrics: list[tuple[int, dict[str, Tensor]]] = field(default_factory=list)
    loss: Tensor | None = None  # task_loss + aux_loss when labels are given
    task_loss: Tensor | None = None


class EncoderClassifier(nn.Module):
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        if not isinstance(cfg, EncoderConfig):
            raise TypeError(f"EncoderClassifier expects an EncoderConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.pooler = _linear(cfg.d_model, cfg.d_model, cfg.init_std) if cfg.pooler else None
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = _linear(cfg.d_model, cfg.num_labels, cfg.init_std)

    def forward(self, input_ids: Tensor, labels: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> EncoderOutput:
        """input_ids (B, L); attention_mask (B, L) 1 = token, 0 = padding; labels (B,) class ids
        (float values when num_labels == 1)."""
        cfg = self.cfg
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > cfg.max_seq_len:
            raise ValueError(
                f"sequence length {input_ids.shape[1]} exceeds EncoderConfig.max_seq_len={cfg.max_seq_len}"
            )
        mask_B11L = tokens_BL = None
        if attention_mask is not None:
            tokens_BL = attention_mask.bool()
            mask_B11L = tokens_BL[:, None, None, :]
            if not torch.compiler.is_compiling() and bool(tokens_BL.all()):
                tokens_BL = None  # no padding: the MoE layers need not look
        x_BLD = self.embeddings(input_ids, token_type_ids)
        aux_loss = x_BLD.new_zeros((), dtype=torch.float32)
        layer_metrics = []
        for i, block in enumerate(self.blocks):
            x_BLD, moe_out = block(x_BLD, mask_B11L, tokens_BL)
            if moe_out is not None:
                aux_loss = aux_loss + moe_out.aux_loss
                layer_metrics.append((i, moe_out.metrics))
        cls_BD = x_BLD[:, 0]
        if self.pooler is not None:
            cls_BD = torch.tanh(self.pooler(cls_BD))
        logits_BC = self.classifier(self.drop(cls_BD))
        out = EncoderOutput(logits_BC, x_BLD, aux_loss, layer_metrics)
        if labels is not None:
            if cfg.num_labels == 1:
                out.task_loss = F.mse_loss(logits_BC.squeeze(-1).float(), labels.float())
            else:
                out.task_loss = F.cross_entropy(logits_BC.float(), labels)
            out.loss = out.task_loss + aux_loss
        return out


# ---------------------------------------------------------------------------------------------
# The headless encoder (transformers' BertModel; what sentence-transformers checkpoints hold)


@dataclass
class EncoderBackboneConfig(EncoderConfig):
    """Our encoder without a task head: `num_labels` is unused (kept at its default)."""


class EncoderBackbone(EncoderClassifier):
    """The encoder and its pooler, no classifier: `out.logits` is the pooled [CLS] state (B, D)
    (BertModel's pooler_output; the raw [CLS] state when pooler=False) and `out.hidden_states`
    the last block's token states (BertModel's last_hidden_state)."""

    def __init__(self, cfg: EncoderBackboneConfig):
        super().__init__(cfg)
        # Identity keeps EncoderClassifier.forward unchanged and leaves no tensor in the state dict.
        self.classifier = nn.Identity()
        self.drop = nn.Identity()  # BertModel's pooler_output has no dropout

    def forward(self, input_ids, labels=None, attention_mask=None, token_type_ids=None):
        if labels is not None:
            raise ValueError("EncoderBackbone has no task head, so it takes no labels")
        return super().forward(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)


# ---------------------------------------------------------------------------------------------
# Parameter counts and dense twin


def _block_fixed(cfg: EncoderConfig) -> int:
    d = cfg.d_model
    return 4 * (d * d + d) + 2 * 2 * d  # q, k, v, o with bias; two LayerNorms (weight + bias)


def _ffn(cfg: EncoderConfig, i: int) -> tuple[int, int]:
    if cfg.is_moe_layer(i):
        return common.moe_params(cfg.moe)
    n = common.dense_ffn_params(cfg.d_model, cfg.d_ff, cfg.activation, True)
    return n, n


def count_encoder(cfg: EncoderConfig) -> tuple[int, int]:
    d = cfg.d_model
    fixed = (cfg.vocab_size + cfg.max_seq_len + cfg.type_vocab_size) * d + 2 * d  # embeddings + LN
    fixed += (d * d + d if cfg.pooler else 0) + d * cfg.num_labels + cfg.num_labels
    total = active = fixed
    for i in range(cfg.n_layers):
        t, a = _ffn(cfg, i)
        total, active = total + _block_fixed(cfg) + t, active + _block_fixed(cfg) + a
    return total, active


def count_backbone(cfg: EncoderBackboneConfig) -> tuple[int, int]:
    head = cfg.d_model * cfg.num_labels + cfg.num_labels  # the classifier count_encoder includes
    total, active = count_encoder(cfg)
    return total - head, active - head


def describe_encoder(cfg: EncoderConfig) -> list[tuple[str, str]]:
    rows = [("attention", f"bidirectional MHA, {cfg.n_heads} heads, post-LayerNorm, max_seq_len {cfg.max_seq_len}")]
    if cfg.moe is not None:
        m = cfg.moe
        rows.append(("moe ffn", f"{m.num_experts} experts x d_ff {m.d_ff} ({m.activation}), router {m.router}, "
                                f"top_k {m.top_k}, layers {cfg.moe_layers}"))
    rows.append(("dense ffn", f"d_ff {cfg.d_ff} ({cfg.activation})"))
    rows.append(("head", f"{'tanh pooler + ' if cfg.pooler else ''}linear to {cfg.num_labels} "
                         f"{'value' if cfg.num_labels == 1 else 'classes'}"))
    return rows


def encoder_dense_twin(cfg: EncoderConfig, match: str) -> EncoderConfig:
    """Every block dense with one width F*: round(FFN budget / (n_layers * (2D + 1))) for a
    biased non-gated FFN; within n_layers * (2D + 1) / 2 parameters of the target."""
    budget = sum(_ffn(cfg, i)[0 if match == "total" else 1] for i in range(cfg.n_layers))
    fixed = common.dense_ffn_params(cfg.d_model, 0, cfg.activation, True)  # the output bias, whatever F is
    bias_free = cfg.n_layers * fixed
    per_unit = common.dense_ffn_params(cfg.d_model, 1, cfg.activation, True) - fixed
    d_ff = max(1, round((budget - bias_free) / (cfg.n_layers * per_unit)))
    return replace(cfg, moe=None, d_ff=d_ff, moe_interval=1, preset=None)
