"""Generation: cached and uncached paths agree token for token; padding, stops and sampling."""

from __future__ import annotations

import pytest
import torch

from moekit.models import build_model, get_preset
from moekit.models.generation import filter_logits, left_pad

PROMPTS = [[5, 17, 99, 3, 200, 41], [7, 8], [250, 1, 2, 3]]


def _model(name="tiny", seed=0):
    torch.manual_seed(seed)
    return build_model(get_preset(name)).eval()


@pytest.mark.parametrize("name", ["tiny", "tiny-deepseek", "tiny-qwen3-moe"])
def test_greedy_cached_equals_uncached(name):
    model = _model(name)
    cached = model.generate(PROMPTS, max_new_tokens=20, use_cache=True)
    uncached = model.generate(PROMPTS, max_new_tokens=20, use_cache=False)
    assert cached.shape == (3, 6 + 20)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("sampling", [dict(temperature=1.0), dict(temperature=0.8, top_k=20),
                                      dict(temperature=1.2, top_p=0.9), dict(temperature=1.0, top_k=50, top_p=0.8)])
def test_sampling_cached_equals_uncached(sampling):
    model = _model("tiny")
    outs = []
    for use_cache in (True, False):
        gen = torch.Generator().manual_seed(123)
        outs.append(model.generate(PROMPTS, max_new_tokens=16, use_cache=use_cache, generator=gen, **sampling))
    assert torch.equal(outs[0], outs[1])
    # sampling at temperature > 0 actually differs from greedy somewhere
    greedy = model.generate(PROMPTS, max_new_tokens=16)
    if sampling.get("temperature", 0) >= 1.0 and "top_k" not in sampling:
        assert not torch.equal(outs[0], greedy)


def test_left_padded_batch_equals_each_prompt_alone():
    model = _model("tiny-qwen2-moe")
    batch = model.generate(PROMPTS, max_new_tokens=12)
    width = max(len(p) for p in PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone = model.generate([prompt], max_new_tokens=12)
        assert torch.equal(batch[i, width:], alone[0, len(prompt):]), i
        assert batch[i, width - len(prompt) : width].tolist() == prompt


def test_tensor_input_with_mask_matches_list_input():
    model = _model()
    ids, mask = left_pad(PROMPTS, pad_token_id=0)
    assert mask.tolist()[1] == [0, 0, 0, 0, 1, 1]
    a = model.generate(ids, attention_mask=mask, max_new_tokens=8)
    b = model.generate(PROMPTS, max_new_tokens=8)
    assert torch.equal(a, b)


def test_stop_tokens_finish_sequences():
    model = _model()
    free = model.generate(PROMPTS, max_new_tokens=20)
    # stop on the token the first sequence emits at its 3rd step
    stop = int(free[0, 6 + 2])
    out = model.generate(PROMPTS, max_new_tokens=20, stop_tokens=[stop], pad_token_id=255)
    first_stop = (free[0, 6:] == stop).nonzero()[0].item()
    assert out[0, 6 + first_stop] == stop
    assert (out[0, 6 + first_stop + 1 :] == 255).all()
    # sequences end early when all have stopped
    every = sorted(set(free[:, 6].tolist()))
    short = model.generate(PROMPTS, max_new_tokens=20, stop_tokens=every)
    assert short.shape[1] == 7


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = _model()
    greedy = model.generate(PROMPTS, max_new_tokens=10)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        gen = torch.Generator().manual_seed(0)
        assert torch.equal(model.generate(PROMPTS, max_new_tokens=10, temperature=1.0, generator=gen, **kw), greedy)


def test_filter_logits():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = filter_logits(logits, top_k=None, top_p=0.7).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = filter_logits(logits, top_k=None, top_p=0.85).isfinite()
    assert kept.tolist() == [[True, True, True, False]]
    kept = filter_logits(logits, top_k=2, top_p=None).isfinite()
    assert kept.tolist() == [[True, True, False, False]]


def test_generation_restores_training_mode_and_validates():
    model = _model()
    model.train()
    model.generate([[1, 2]], max_new_tokens=2)
    assert model.training
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate([[1, 2]], max_new_tokens=model.cfg.max_seq_len)
    with pytest.raises(ValueError, match="top_p"):
        model.generate([[1, 2]], top_p=0.0, temperature=1.0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate([[1, 2]], temperature=-1.0)


@pytest.mark.parametrize("input_ids, match", [
    (torch.zeros(1, 0, dtype=torch.long), r"input_ids must hold at least one prompt of at least one token.*\(1, 0\)"),
    (torch.zeros(0, 3, dtype=torch.long), r"input_ids must hold at least one prompt"),
    (torch.tensor([[5, 256]]), r"input_ids holds token id 256; ids must be in \[0, 256\) \(vocab_size=256\)"),
    (torch.tensor([[-1, 5]]), r"input_ids holds token id -1; ids must be in \[0, 256\)"),
    (torch.tensor([5, 6]), r"input_ids must be a \(batch, length\) tensor"),
    (torch.tensor([[0.5, 1.0]]), r"input_ids must hold integer token ids"),
    ([[1, 2], [300]], r"input_ids holds token id 300"),
    ([[1, 2], []], r"input_ids: generate needs at least one prompt and every prompt at least one token"),
])
def test_bad_prompts_are_refused_naming_input_ids(input_ids, match):
    model = _model()
    with pytest.raises(ValueError, match=match):
        model.generate(input_ids, max_new_tokens=2)


def test_bad_mask_and_pad_token_are_refused():
    model = _model()
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"attention_mask has shape \(1, 2\), input_ids \(1, 3\)"):
        model.generate(ids, attention_mask=torch.ones(1, 2, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask: prompt\(s\) \[0\] have no real token"):
        model.generate(ids, attention_mask=torch.zeros(1, 3, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"pad_token_id must be a token id in \[0, 256\)"):
        model.generate([[1, 2], [3]], pad_token_id=256, max_new_tokens=2)
    import numpy as np

    assert model.generate([[1, 2], [3]], pad_token_id=np.int64(7), max_new_tokens=2).shape == (2, 4)
