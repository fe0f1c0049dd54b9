"""Dense Hugging Face checkpoints as conversion sources: BERT loads through moekit.hf (the
adapter of src/moekit/hf/bert.py) with parity, and upcycled Llama / Qwen2 models export with
to_hf as Mixtral / Qwen2-MoE checkpoints that transformers runs with the dense model's logits."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from moekit.convert import moebert, upcycle  # noqa: E402
from moekit.hf import from_hf, to_hf  # noqa: E402
from moekit.hf.bert import EncoderBackbone  # noqa: E402
from moekit.models import EncoderClassifier, count_parameters  # noqa: E402

BERT = dict(vocab_size=99, hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=60,
            max_position_embeddings=40, type_vocab_size=2)


def _perturbed(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _inputs():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 99, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    return ids, mask, types


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    cfg = transformers.BertConfig(**BERT, attn_implementation="eager")
    torch.manual_seed(0)
    hf = _perturbed(transformers.BertModel(cfg))
    folder = tmp_path_factory.mktemp("bert")
    hf.save_pretrained(folder)
    return folder, hf


def test_bert_model_loads_headless_with_parity(bert_folder):
    folder, hf = bert_folder
    ours = from_hf(folder)
    assert isinstance(ours, EncoderBackbone) and not ours.training
    assert count_parameters(ours)[0] == sum(p.numel() for p in hf.parameters())
    ids, mask, types = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
        out = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert (out.hidden_states[real] - ref.last_hidden_state[real]).abs().max() < 1e-5
    assert (out.logits - ref.pooler_output).abs().max() < 1e-5  # logits of the headless model = pooler_output


def test_bert_classifier_checkpoint(tmp_path):
    cfg = transformers.BertConfig(**BERT, num_labels=3, attn_implementation="eager")
    torch.manual_seed(1)
    hf = _perturbed(transformers.BertForSequenceClassification(cfg))
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert type(ours) is EncoderClassifier and ours.cfg.num_labels == 3
    ids, mask, types = _inputs()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, attention_mask=mask, token_type_ids=types).logits
    assert (ref - got).abs().max() < 1e-5


def test_bert_config_refusals(tmp_path):
    cfg = transformers.BertConfig(**BERT, hidden_act="relu")
    transformers.BertModel(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="hidden_act='relu' is not supported"):
        from_hf(tmp_path)


def test_upcycle_and_moebert_of_a_loaded_bert(bert_folder):
    folder, hf = bert_folder
    ours = from_hf(folder)
    ids, mask, types = _inputs()
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        up = upcycle(ours, num_experts=4, top_k=2)(ids, attention_mask=mask, token_type_ids=types).hidden_states
        # shared_neurons = d_ff: every expert is the whole dense FFN (top-1 weight 1)
        mb = moebert(ours, 3, 60, importance={0: torch.rand(60), 1: torch.rand(60)})
        whole = mb(ids, attention_mask=mask, token_type_ids=types).hidden_states
    assert (up[real] - ref[real]).abs().max() < 1e-5
    assert (whole[real] - ref[real]).abs().max() < 1e-5


DECODER = dict(vocab_size=97, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=44, max_position_embeddings=64)


@pytest.mark.parametrize(
    "family, kw, exported",
    [
        ("llama", dict(num_experts=2, top_k=4, granularity=2), "mixtral"),  # fine-grained: 4 experts of 22
        ("qwen2", dict(num_experts=4, top_k=2, num_shared_experts=1, shared_d_ff=20, shared_expert_gate=True),
         "qwen2_moe"),
    ],
)
def test_upcycled_hf_decoder_exports(tmp_path, family, kw, exported):
    cls, cfg_cls = {"llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig),
                    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config)}[family]
    cfg = cfg_cls(**DECODER)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = _perturbed(cls(cfg))
    hf.save_pretrained(tmp_path / "dense")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(ids).logits
        moe_model = upcycle(from_hf(tmp_path / "dense"), **kw)
        assert (moe_model(ids).logits - ref).abs().max() < 1e-4
        to_hf(moe_model, tmp_path / "moe")
        assert json.loads((tmp_path / "moe" / "config.json").read_text())["model_type"] == exported
        back_cfg = transformers.AutoConfig.from_pretrained(tmp_path / "moe")
        back_cfg._attn_implementation = "eager"
        back_cfg._experts_implementation = "eager"  # grouped_mm rejects these odd widths
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "moe", config=back_cfg).eval()
        assert (back(ids).logits - ref).abs().max() < 1e-4
