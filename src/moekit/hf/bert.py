"""BERT (Devlin et al. 2019) as moekit's encoder: `transformers`' BertModel and
BertForSequenceClassification checkpoints, and the BERT-architecture sentence encoders
(all-MiniLM-L6-v2 and friends) built on them; a source for MoEBERT conversion and upcycling.

Two checkpoint layouts exist on disk:
- BertForSequenceClassification (and BertForPreTraining / BertForMaskedLM): the encoder under
  `bert.`, a `classifier` head (sequence classification) or `cls.` heads (pre-training, ignored);
- BertModel (what sentence-transformers ships): the same encoder names without the `bert.` prefix
  and no task head. It loads as `EncoderBackbone` (moekit.models.encoder), our encoder without a
  classifier, whose `logits` is BertModel's `pooler_output` tanh(W h_[CLS] + b).

Loading only: `to_hf` writes decoder families (moekit.hf.api.pick_family refuses an encoder).
"""

from __future__ import annotations

from moekit.hf.common import Family, Fields, NotRepresentable
from moekit.hf.keymap import Ignore, KeyMap, Rule
from moekit.models.encoder.model import (
    EncoderBackbone,  # noqa: F401  (re-exported: the class BertModel loads as)
    EncoderBackboneConfig,
    EncoderConfig,
)

MODEL_TYPE, ARCHITECTURE = "bert", "BertForSequenceClassification"

# transformers 5.24 BertConfig defaults for the fields read here.
DEFAULTS = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
    hidden_act="gelu", hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, max_position_embeddings=512,
    type_vocab_size=2, initializer_range=0.02, layer_norm_eps=1e-12, position_embedding_type="absolute",
    is_decoder=False, add_cross_attention=False, problem_type=None,
)

# Architectures whose checkpoint has no pooler (transformers builds them with add_pooling_layer=False).
NO_POOLER = ("BertForMaskedLM", "BertForTokenClassification", "BertForQuestionAnswering")
# Architectures with a sequence-classification head `classifier` on the pooled [CLS].
CLASSIFIER = ("BertForSequenceClassification",)


# ---------------------------------------------------------------------------------------------
# Key map


def _encoder_rules(prefix: str, read_only: bool) -> list[Rule]:
    p, L = prefix, f"{prefix}encoder.layer.{{L}}"
    pairs = [
        (f"{p}embeddings.word_embeddings.weight", "embeddings.word.weight"),
        (f"{p}embeddings.position_embeddings.weight", "embeddings.position.weight"),
        (f"{p}embeddings.token_type_embeddings.weight", "embeddings.token_type.weight"),
        (f"{p}pooler.dense.weight", "pooler.weight"),
        (f"{p}pooler.dense.bias", "pooler.bias"),
    ]
    for hf, ours in (("attention.self.query", "attn.q_proj"), ("attention.self.key", "attn.k_proj"),
                     ("attention.self.value", "attn.v_proj"), ("attention.output.dense", "attn.o_proj"),
                     ("intermediate.dense", "ffn.up_proj"), ("output.dense", "ffn.down_proj")):
        for w in ("weight", "bias"):
            pairs.append((f"{L}.{hf}.{w}", f"blocks.{{L}}.{ours}.{w}"))
    # LayerNorms; checkpoints from the TF-converted era name the affine parameters gamma/beta.
    norms = [(f"{p}embeddings.LayerNorm", "embeddings.norm"),
             (f"{L}.attention.output.LayerNorm", "blocks.{L}.attn_norm"),
             (f"{L}.output.LayerNorm", "blocks.{L}.ffn_norm")]
    rules = [Rule(hf, ours, read_only=read_only) for hf, ours in pairs]
    for hf, ours in norms:
        rules += [Rule(f"{hf}.weight", f"{ours}.weight", read_only=read_only),
                  Rule(f"{hf}.bias", f"{ours}.bias", read_only=read_only),
                  Rule(f"{hf}.gamma", f"{ours}.weight", read_only=True),
                  Rule(f"{hf}.beta", f"{ours}.bias", read_only=True)]
    return rules


KEY_MAP = KeyMap(
    _encoder_rules("bert.", read_only=False)
    + _encoder_rules("", read_only=True)  # BertModel checkpoints: no "bert." prefix
    + [Rule("classifier.weight", "classifier.weight"), Rule("classifier.bias", "classifier.bias")],
    [
        Ignore("embeddings.position_ids", "position ids are arange(L), recomputed"),
        Ignore("bert.embeddings.position_ids", "position ids are arange(L), recomputed"),
        Ignore("cls.{*}", "pre-training heads (masked LM, next sentence): not part of the encoder"),
    ],
)


# ---------------------------------------------------------------------------------------------
# config.json -> EncoderConfig


def config_from_hf(hf: dict) -> EncoderConfig:
    f = Fields(hf, DEFAULTS, MODEL_TYPE)
    f.refuse("hidden_act", ("gelu",), "moekit's encoder uses BERT's exact (erf) GELU")
    f.refuse("position_embedding_type", ("absolute",), "only learned absolute position embeddings are implemented")
    f.refuse("is_decoder", (False,), "moekit's encoder is bidirectional")
    f.refuse("add_cross_attention", (False,), "cross-attention is not implemented")
    f.refuse("problem_type", (None, "single_label_classification", "regression"),
             "the classifier trains with cross-entropy (or MSE with one label)")
    if f.hf.get("quantization_config"):
        raise ValueError(f"config.json ({MODEL_TYPE}): quantized checkpoints are not supported")
    archs = f.hf.get("architectures") or ["BertModel"]
    arch = archs[0]
    fields = dict(
        vocab_size=f["vocab_size"], d_model=f["hidden_size"], n_layers=f["num_hidden_layers"],
        n_heads=f["num_attention_heads"], d_ff=f["intermediate_size"], activation="gelu",
        max_seq_len=f["max_position_embeddings"], type_vocab_size=f["type_vocab_size"],
        norm_eps=float(f["layer_norm_eps"]), dropout=float(f["hidden_dropout_prob"]),
        attention_dropout=float(f["attention_probs_dropout_prob"]), pooler=arch not in NO_POOLER,
        init_std=float(f.get("initializer_range", 0.02)),
    )
    if arch in CLASSIFIER:
        labels = f.hf.get("id2label")
        num_labels = len(labels) if isinstance(labels, dict) and labels else int(f.hf.get("num_labels", 2))
        return EncoderConfig(**fields, num_labels=num_labels)
    return EncoderBackboneConfig(**fields)


def config_to_hf(cfg) -> dict:
    raise NotRepresentable("bert: writing encoder checkpoints is not implemented (moekit.hf loads BERT only)")


FAMILY = Family(MODEL_TYPE, ARCHITECTURE, "encoder: BertModel / BertForSequenceClassification (load only; "
                "MoEBERT and upcycling source)", KEY_MAP, config_from_hf, config_to_hf)
