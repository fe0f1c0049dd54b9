"""Cached and uncached generation agree for every router a decoder accepts, with capacity too
(the causal capacity counts ride in the KV cache), and a left-padded batch equals each prompt
alone: the padding routes nothing and takes no capacity."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moekit.models import build_model, get_preset

PROMPTS = [[5, 17, 99, 3, 200, 41, 9, 9], [7, 8], [250, 1, 2, 3, 4]]
ROUTERS = {
    "softmax_topk": dict(top_k=2),
    "switch": dict(top_k=1),
    "gshard": dict(top_k=2),
    "sigmoid_bias": dict(top_k=2),
    "noisy_topk": dict(top_k=2),
    "dense": dict(top_k=2),
}


def _tiny(router: str, capacity: float | None, seed: int = 0):
    cfg = get_preset("tiny")
    moe = dict(d_ff=64, num_experts=8, router=router, capacity_factor=capacity, init_std=0.2, **ROUTERS[router])
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(cfg, moe=moe)).eval()


# the dense gate never drops, so it has no capacity factor to try
CASES = [(r, c) for r in ROUTERS for c in (None, 1.0, 0.5) if r != "dense" or c is None]


@pytest.mark.parametrize("router,capacity", CASES)
def test_cached_equals_uncached_for_every_router(router, capacity):
    model = _tiny(router, capacity)
    cached = model.generate(PROMPTS, max_new_tokens=16, use_cache=True)
    uncached = model.generate(PROMPTS, max_new_tokens=16, use_cache=False)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("capacity", [None, 0.5])
def test_left_padded_batch_equals_each_prompt_alone_with_capacity(capacity):
    model = _tiny("softmax_topk", capacity, seed=1)
    batch = model.generate(PROMPTS, max_new_tokens=12)
    width = max(len(p) for p in PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        alone = model.generate([prompt], max_new_tokens=12)
        assert torch.equal(batch[i, width:], alone[0, len(prompt):]), i


def test_capacity_drops_in_generation():
    """The cases above do exercise capacity: at factor 0.5 the layers drop assignments."""
    model = _tiny("softmax_topk", 0.5)
    ids = torch.tensor([PROMPTS[0]])
    drops = [float(m["drop_fraction"]) for _, m in model(ids).layer_metrics]
    assert max(drops) > 0
