"""BERT-style MoE encoder: contract, HF BertForSequenceClassification parity, swappable FFNs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit.layers.config import MoEConfig
from moekit.layers.moe import MoE
from moekit.models import EncoderConfig, build_model, count_parameters, dense_twin, get_preset


def _ids(b=4, l=12, seed=0):
    return torch.randint(0, 256, (b, l), generator=torch.Generator().manual_seed(seed))


def test_contract_and_counts():
    for name in ("tiny-encoder", "tiny-bert"):
        cfg = get_preset(name)
        model = build_model(cfg)
        assert count_parameters(cfg) == count_parameters(model)
        out = model(_ids(), labels=torch.tensor([0, 1, 1, 0]), attention_mask=torch.ones(4, 12))
        assert out.logits.shape == (4, 2) and out.hidden_states.shape == (4, 12, 64)
        assert torch.allclose(out.loss, out.task_loss + out.aux_loss)
        assert [i for i, _ in out.layer_metrics] == cfg.moe_layers
    reg = build_model(dataclasses.replace(get_preset("tiny-encoder"), num_labels=1))
    out = reg(_ids(), labels=torch.randn(4))
    assert out.logits.shape == (4, 1) and out.task_loss.item() > 0
    # BERT-base matches HF BertForSequenceClassification's 109,483,778 parameters
    assert count_parameters(get_preset("bert-base")) == (109483778, 109483778)


def test_padding_is_masked():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-bert")).eval()
    ids = _ids(b=1, l=8)
    padded = torch.cat((ids, torch.zeros(1, 4, dtype=torch.long)), dim=1)
    mask = torch.cat((torch.ones(1, 8), torch.zeros(1, 4)), dim=1)
    with torch.no_grad():
        a = model(ids).logits
        b = model(padded, attention_mask=mask).logits
    assert (a - b).abs().max() < 1e-5


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=66, n_heads=4), "d_model"), (dict(vocab_size=0), "vocab_size"),
    (dict(moe_interval=0), "moe_interval"),
    (dict(dropout=1.5), "dropout"), (dict(num_labels=0), "num_labels"),
    (dict(moe=dict(d_model=8, d_ff=4, num_experts=2)), "moe.d_model"),
])
def test_bad_config(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        EncoderConfig(**kwargs)


def test_sequence_too_long():
    model = build_model(get_preset("tiny-encoder"))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(_ids(l=129))


def test_non_causal_routers_allowed_and_trains():
    for router in ("expert_choice", "soft"):
        cfg = dataclasses.replace(get_preset("tiny-encoder"), moe=dict(d_ff=32, num_experts=4, top_k=1, router=router))
        model = build_model(cfg)
        assert count_parameters(cfg) == count_parameters(model)
        model(_ids(), labels=torch.tensor([0, 1, 1, 0])).loss.backward()


@pytest.mark.parametrize("name", ["tiny-encoder", "tiny-bert"])
def test_trains_on_repeated_batch(name):
    torch.manual_seed(0)
    model = build_model(get_preset(name))
    ids, labels = _ids(b=16, l=16, seed=3), torch.arange(16) % 2
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(200):
        out = model(ids, labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first or out.task_loss.item()
        if out.task_loss.item() < first / 2:
            break
    assert out.task_loss.item() < first / 2


def test_ffn_swappable_dense_to_moe():
    """A converter can replace a block's dense FFN by a MoE whose experts copy it (MoEBERT's
    initialisation): with every expert equal to the dense FFN the output is unchanged."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-bert")).eval()
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        dense = model.blocks[1].ffn
        moe = MoE(MoEConfig(d_model=64, d_ff=128, num_experts=4, top_k=2, activation="gelu", expert_bias=True))
        for e in range(4):
            moe.experts.w_in[e].copy_(dense.up_proj.weight)
            moe.experts.b_in[e].copy_(dense.up_proj.bias)
            moe.experts.w_out[e].copy_(dense.down_proj.weight)
            moe.experts.b_out[e].copy_(dense.down_proj.bias)
        model.blocks[1].ffn = moe
        out = model(ids)
    assert (out.logits - before).abs().max() < 1e-5
    assert [i for i, _ in out.layer_metrics] == [1]


def test_dense_twin():
    cfg = get_preset("moebert-base")
    twin = dense_twin(cfg, "active")
    target = count_parameters(cfg)[1]
    assert abs(count_parameters(twin)[0] - target) <= cfg.n_layers * (2 * cfg.d_model + 1) / 2


def test_matches_transformers_bert():
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.BertConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, max_position_embeddings=128, num_labels=3,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ours = build_model(EncoderConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_seq_len=128,
                                     num_labels=3)).eval()
    sd = {}
    for k, v in hf.state_dict().items():
        k = k.removeprefix("bert.")
        k = (k.replace("embeddings.word_embeddings", "embeddings.word")
             .replace("embeddings.position_embeddings", "embeddings.position")
             .replace("embeddings.token_type_embeddings", "embeddings.token_type")
             .replace("embeddings.LayerNorm", "embeddings.norm").replace("encoder.layer.", "blocks.")
             .replace("attention.self.query", "attn.q_proj").replace("attention.self.key", "attn.k_proj")
             .replace("attention.self.value", "attn.v_proj").replace("attention.output.dense", "attn.o_proj")
             .replace("attention.output.LayerNorm", "attn_norm").replace("intermediate.dense", "ffn.up_proj")
             .replace("output.dense", "ffn.down_proj").replace("output.LayerNorm", "ffn_norm")
             .replace("pooler.dense", "pooler"))
        if "position_ids" not in k:
            sd[k] = v
    ours.load_state_dict(sd, strict=True)
    ids = _ids(b=2, l=10)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    types = torch.zeros_like(ids)
    types[:, 5:] = 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, attention_mask=mask, token_type_ids=types).logits
    assert (ref - got).abs().max() < 1e-5
