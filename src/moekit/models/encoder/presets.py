"""Encoder presets: tiny ones for tests, BERT-base shapes, and an MoEBERT-style split."""

from __future__ import annotations

from moekit.models.encoder.model import EncoderConfig
from moekit.models.registry import register_preset


@register_preset("tiny-encoder", "encoder")
def tiny_encoder() -> EncoderConfig:
    """2-layer BERT-style encoder, d_model 64, MoE FFNs (8 experts top-2, GELU), no dropout."""
    return EncoderConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128,
                         dropout=0.0, attention_dropout=0.0, moe=dict(d_ff=32, num_experts=8, top_k=2))


@register_preset("tiny-bert", "encoder")
def tiny_bert() -> EncoderConfig:
    """2-layer dense BERT, d_model 64: the host for MoE conversion tests."""
    return EncoderConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128,
                         dropout=0.0, attention_dropout=0.0)


@register_preset("bert-base", "encoder")
def bert_base() -> EncoderConfig:
    """BERT-base (Devlin et al. 2019): 12 layers, d_model 768, 12 heads, d_ff 3072, WordPiece vocab 30522."""
    return EncoderConfig(vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=512)


@register_preset("moebert-base", "encoder")
def moebert_base() -> EncoderConfig:
    """MoEBERT-style BERT-base (Zuo et al. 2022): each FFN split into 4 experts of width 768, top-1 (switch)."""
    return EncoderConfig(vocab_size=30522, d_model=768, n_layers=12, n_heads=12, d_ff=3072, max_seq_len=512,
                         moe=dict(d_ff=768, num_experts=4, top_k=1, router="switch"))
