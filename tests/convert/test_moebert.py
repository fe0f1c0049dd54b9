"""MoEBERT: the importance score against a per-example brute force of the paper's equation, the
importance-guided split, the converted model, distillation, and the bad inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.convert import (
    ConversionError,
    DistillConfig,
    distill,
    ffn_flops_per_token,
    mean_pool,
    moebert,
    neuron_importance,
    split_neurons,
)
from moekit.models import build_model, get_preset


def _bert(num_labels=2, seed=0):
    torch.manual_seed(seed)
    model = build_model(get_preset("tiny-bert", num_labels=num_labels)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _batches(n=3, b=4, length=10, seed=0, labels=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 256, (b, length), generator=g)
        mask = torch.ones_like(ids)
        mask[0, length // 2:] = 0  # padding must not leak into the scores
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = torch.randint(0, 2, (b,), generator=g)
        out.append(batch)
    return out


def _brute_force(model, batches, per_example_loss):
    """Zuo et al. 2022 eq. 3, literally: one backward per example, then
    I_j = sum_x |w1_j . grad_{w1_j} L(x) + w2_j . grad_{w2_j} L(x)|."""
    scores = {}
    for batch in batches:
        for i in range(batch["input_ids"].shape[0]):
            one = {k: v[i:i + 1] for k, v in batch.items()}
            model.zero_grad()
            per_example_loss(model, one).sum().backward()
            for layer, block in enumerate(model.blocks):
                f = block.ffn
                if f.gated:
                    w1 = (f.gate_proj.weight * f.gate_proj.weight.grad).sum(1) \
                        + (f.up_proj.weight * f.up_proj.weight.grad).sum(1)
                else:
                    w1 = (f.up_proj.weight * f.up_proj.weight.grad).sum(1)
                w2 = (f.down_proj.weight * f.down_proj.weight.grad).sum(0)
                s = (w1 + w2).abs().detach()
                scores[layer] = scores.get(layer, 0) + s
    model.zero_grad()
    return scores


def _ce(model, batch):
    out = model(batch["input_ids"], attention_mask=batch["attention_mask"])
    return F.cross_entropy(out.logits, batch["labels"], reduction="none")


def test_importance_is_the_papers_equation_encoder():
    model = _bert().double()
    batches = _batches(labels=True)
    fast = neuron_importance(model, batches)  # default loss with labels: per-example cross-entropy
    slow = _brute_force(model, batches, _ce)
    for layer in slow:
        torch.testing.assert_close(fast[layer].double(), slow[layer], rtol=1e-5, atol=1e-9)


def test_importance_is_the_papers_equation_decoder():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-dense")).double().eval()
    ids = torch.randint(0, 256, (3, 9), generator=torch.Generator().manual_seed(1))
    fast = neuron_importance(model, [ids])

    def lm(m, batch):
        logits = m(batch["input_ids"]).logits[:, :-1]
        nll = F.cross_entropy(logits.reshape(-1, 256), batch["input_ids"][:, 1:].reshape(-1), reduction="none")
        return nll.mean()[None]

    slow = _brute_force(model, [{"input_ids": ids}], lm)
    for layer in slow:
        torch.testing.assert_close(fast[layer].double(), slow[layer], rtol=1e-5, atol=1e-9)


def test_unlabelled_probe_is_seeded_and_leaves_model_alone():
    model = _bert()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = neuron_importance(model, _batches(), seed=1)
    b = neuron_importance(model, _batches(), seed=1)
    assert all(torch.equal(a[i], b[i]) for i in a)
    assert all(a[i].shape == (128,) and (a[i] >= 0).all() and a[i].sum() > 0 for i in a)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(type(b.ffn).__name__ == "DenseFFN" for b in model.blocks) and not model.training
    assert all(p.grad is None for p in model.parameters())


def test_importance_predicts_the_loss_change_of_removing_a_neuron():
    """First-order Taylor: the score ranks neurons by how much removing them moves the loss."""
    model = _bert().double()
    batches = _batches(n=2, b=8, labels=True)
    imp = neuron_importance(model, batches)[1]
    ffn = model.blocks[1].ffn

    def change(j):
        total = 0.0
        with torch.no_grad():
            base = [_ce(model, b) for b in batches]
            w, b_in = ffn.down_proj.weight[:, j].clone(), ffn.up_proj.bias[j].clone()
            ffn.down_proj.weight[:, j] = 0  # neuron j removed
            for b, l0 in zip(batches, base):
                total += (_ce(model, b) - l0).abs().sum().item()
            ffn.down_proj.weight[:, j] = w
            ffn.up_proj.bias[j] = b_in
        return total

    order = torch.argsort(imp, descending=True)
    top = sum(change(int(j)) for j in order[:8])
    bottom = sum(change(int(j)) for j in order[-8:])
    assert top > 5 * bottom


def test_split_neurons_shared_then_round_robin():
    imp = torch.tensor([0.0, 9, 8, 7, 6, 5, 4, 3, 2, 1])  # ranking: 1, 2, 3, ..., 9, 0
    idx = split_neurons(imp, num_experts=3, shared_neurons=2, expert_width=4)
    assert idx.tolist() == [[1, 2, 3, 6], [1, 2, 4, 7], [1, 2, 5, 8]]  # the least important (0, 9) dropped


def test_moebert_experts_are_dense_slices_and_flops_halve():
    model = _bert()
    imp = neuron_importance(model, _batches())
    student = moebert(model, num_experts=4, shared_neurons=32, importance=imp)  # width 32 + 96 / 4 = 56
    moe = student.blocks[0].ffn
    d = model.blocks[0].ffn
    assert moe.cfg.d_ff == 56 and moe.cfg.top_k == 1 and moe.cfg.num_experts == 4
    idx = moe.neuron_index
    assert torch.equal(idx, split_neurons(imp[0], 4, 32, 56))
    own = torch.cat([idx[e, 32:] for e in range(4)])
    assert len(set(own.tolist())) == 96 and not set(own.tolist()) & set(idx[0, :32].tolist())
    for e in range(4):
        assert torch.equal(moe.experts.w_in[e], d.up_proj.weight[idx[e]])
        assert torch.equal(moe.experts.b_in[e], d.up_proj.bias[idx[e]])
        assert torch.equal(moe.experts.w_out[e], d.down_proj.weight[:, idx[e]])
        assert torch.equal(moe.experts.b_out[e], d.down_proj.bias)
    D = model.cfg.d_model
    dense_flops = 2 * (2 * 2 * D * 128)
    assert ffn_flops_per_token(model) == dense_flops
    assert ffn_flops_per_token(student) == 2 * (2 * 2 * D * 56 + 2 * D * 4)


def test_moebert_one_expert_per_token_equals_its_slice():
    """Top-1 renormalised routing: each token's FFN output is exactly its expert's."""
    model = _bert()
    student = moebert(model, 4, 32, importance=neuron_importance(model, _batches()))
    x = torch.randn(20, 64)
    with torch.no_grad():
        out = student.blocks[0].ffn(x)
        chosen = out.routing.expert_idx_TK[:, 0]
        experts = student.blocks[0].ffn.experts
        ref = torch.stack([experts.forward_one(int(e), x[t:t + 1])[0] for t, e in enumerate(chosen)])
    torch.testing.assert_close(out.output, ref, rtol=1e-5, atol=1e-6)


def test_moebert_decoder():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-dense")).eval()
    ids = torch.randint(0, 256, (2, 12))
    student = moebert(model, 2, 64, data=[ids])  # SwiGLU width 128: 64 shared + 32 own
    assert student.cfg.moe.d_ff == 96 and student.cfg.moe.activation == "swiglu"
    with torch.no_grad():
        assert student(ids).logits.shape == (2, 12, 256)


def test_distillation_recovers_the_teacher():
    teacher = _bert()
    data = _batches(n=4, b=8, length=12, seed=5)
    held = _batches(n=1, b=16, length=12, seed=9)[0]
    student = moebert(teacher, 4, 16, data=data)

    def cos():
        with torch.no_grad():
            e_s = mean_pool(student(**held).hidden_states, held["attention_mask"])
            e_t = mean_pool(teacher(**held).hidden_states, held["attention_mask"])
        return F.cosine_similarity(e_s, e_t).mean().item()

    before = cos()
    seen = []
    history = distill(student, teacher, data, DistillConfig(steps=40, lr=3e-3), progress=lambda s, r: seen.append(s))
    after = cos()
    assert seen == list(range(1, 41))
    assert history[-1]["hidden_mse"] < 0.5 * history[0]["hidden_mse"]
    assert 1 - after < 0.5 * (1 - before), (before, after)
    assert all(not p.requires_grad for p in teacher.parameters())


def test_distill_config_validation():
    with pytest.raises(ValueError, match="DistillConfig.steps must be an integer >= 1"):
        DistillConfig(steps=0)
    with pytest.raises(ValueError, match="DistillConfig.lr must be a finite number > 0"):
        DistillConfig(lr=0.0)
    with pytest.raises(ValueError, match="DistillConfig.output must be one of"):
        DistillConfig(output="kl")


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_experts=0, shared_neurons=8), "num_experts must be >= 1"),
        (dict(num_experts=4, shared_neurons=129), r"shared_neurons \(129\) is larger than the FFN width d_ff \(128\)"),
        (dict(num_experts=4, shared_neurons=-1), "shared_neurons must be >= 0"),
        (dict(num_experts=4, shared_neurons=32, expert_width=57), r"expert_width \(57\) must be between"),
        (dict(num_experts=4, shared_neurons=32, expert_width=31), r"expert_width \(31\) must be between"),
        (dict(num_experts=4, shared_neurons=32, router="nope"), "unknown router"),
    ],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ConversionError, match=match):
        moebert(_bert(), data=_batches(n=1), **kw)


def test_bad_models_and_data():
    with pytest.raises(ConversionError, match="no FFN layers the converter recognises"):
        moebert(torch.nn.Linear(3, 3), 4, 8, data=_batches(n=1))
    with pytest.raises(ConversionError, match="no dense FFN layers"):
        moebert(build_model(get_preset("tiny-encoder")), 4, 8, data=_batches(n=1))
    with pytest.raises(ConversionError, match="needs `data`"):
        moebert(_bert(), 4, 8)
    with pytest.raises(ConversionError, match="gave no batch"):
        moebert(_bert(), 4, 8, data=[])
