"""Least-squares refit of the experts' output projections: the accumulated normal equations give
the solution a direct lstsq on the collected features gives, and the layer error drops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit.convert import ConversionError, moebert, refit_experts, upcycle
from moekit.models import build_model, get_preset


def _bert():
    torch.manual_seed(0)
    model = build_model(get_preset("tiny-bert")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _data(n=3, b=6, length=10):
    g = torch.Generator().manual_seed(4)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 256, (b, length), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 6:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def test_refit_is_the_least_squares_solution():
    teacher = _bert().double()
    data = _data(n=8, b=8)  # ~300 tokens per expert for 73 features (72 neurons + the bias)
    student = moebert(teacher, 2, 16, data=data)
    # The reference: collect every real token's FFN input of block 1, solve lstsq per expert directly.
    xs = []
    h = teacher.blocks[1].ffn.register_forward_hook(lambda _m, inp, _o: xs.append(inp[0]))
    with torch.no_grad():
        for b in data:
            teacher(**b)
    h.remove()
    x = torch.cat([xb[b["attention_mask"].bool()] for xb, b in zip(xs, data)])
    moe = student.blocks[1].ffn
    with torch.no_grad():
        y = teacher.blocks[1].ffn(x)
        e = moe.router(x, x.shape[0]).expert_idx_TK[:, 0]
        expected = {}
        for k in range(2):
            a = F.gelu(x[e == k] @ moe.experts.w_in[k].t() + moe.experts.b_in[k])
            phi = torch.cat((a, torch.ones_like(a[:, :1])), dim=1)
            expected[k] = torch.linalg.lstsq(phi, y[e == k]).solution  # (Fe + 1, D)
    stats = refit_experts(student, teacher, data, ridge=0.0)
    for k in range(2):
        torch.testing.assert_close(moe.experts.w_out[k], expected[k][:-1].t(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(moe.experts.b_out[k], expected[k][-1], rtol=1e-5, atol=1e-7)
    for layer in stats.values():
        assert layer["rel_err_after"] < 0.5 * layer["rel_err_before"]
        assert sum(layer["tokens_per_expert"]) == sum(int(b["attention_mask"].sum()) for b in data)


def test_refit_needs_top1_and_a_matching_teacher():
    teacher = _bert()
    with pytest.raises(ConversionError, match="top-1"):
        refit_experts(upcycle(teacher, num_experts=2, top_k=2), teacher, _data(n=1))
    student = moebert(teacher, 2, 16, data=_data(n=1))
    with pytest.raises(ConversionError, match="same blocks"):
        refit_experts(student, build_model(get_preset("tiny-dense")), _data(n=1))
    with pytest.raises(ConversionError, match="no block that is MoE"):
        refit_experts(teacher, teacher, _data(n=1))
    with pytest.raises(ConversionError, match="ridge must be a number >= 0"):
        refit_experts(student, teacher, _data(n=1), ridge=-1.0)
    with pytest.raises(ConversionError, match="gave no batch"):
        refit_experts(student, teacher, [])
