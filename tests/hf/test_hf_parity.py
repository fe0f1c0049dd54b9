"""Parity with transformers on tiny random models of every supported family (no network).

For each architecture: save_pretrained in several shards -> from_hf -> logits, routing and greedy
generation equal transformers'; to_hf -> from_pretrained -> the same weights, keys and logits.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

transformers = pytest.importorskip("transformers")

from _hf_cases import ARCHS, V, build  # noqa: E402

from moekit.hf import from_hf, to_hf  # noqa: E402

TOL = 1e-4
SHARD = "40KB"  # a few tensors per shard: every tiny model spans several files


def _keys(folder):
    keys = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as fh:
            keys.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    return keys


def _prompts():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :3], mask[1, :3] = 0, 0  # second prompt is 6 tokens, left-padded
    return ids, mask


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (transformers model, its save_pretrained folder); built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            hf, model_type = build(name)
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder, max_shard_size=SHARD)
            cache[name] = (hf, model_type, folder)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ARCHS)
def test_from_hf_logits_and_routing(name, saved):
    hf, model_type, folder = saved(name)
    assert (folder / "model.safetensors.index.json").is_file(), "the fixture must produce a sharded checkpoint"
    assert len(list(folder.glob("model-*.safetensors"))) > 1
    ours = from_hf(folder)
    assert ours.hf_source["model_type"] == model_type
    assert not ours.training

    # Routing: record the experts transformers' router and ours pick, layer by layer.
    picked_hf, picked_ours, hooks = {}, {}, []
    for i, block in enumerate(ours.blocks):
        if block.is_moe:
            gate = hf.model.layers[i].mlp.gate
            hooks.append(gate.register_forward_hook(lambda m, a, out, i=i: picked_hf.__setitem__(i, out[2])))
            hooks.append(block.ffn.register_forward_hook(
                lambda m, a, out, i=i: picked_ours.__setitem__(i, out.routing.expert_idx_TK)))
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids).logits
    for h in hooks:
        h.remove()
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"{name}: max |logit diff| {diff:.2e}"
    assert sorted(picked_hf) == sorted(picked_ours) == ours.cfg.moe_layers
    for i in picked_hf:
        a, b = picked_hf[i].sort(-1).values, picked_ours[i].sort(-1).values
        assert torch.equal(a, b), f"{name}: layer {i} routes {int((a != b).any(-1).sum())} tokens differently"


# One per family (the config variants above share their generation code path).
@pytest.mark.parametrize("name", [n for n in ARCHS if n not in ("qwen2_moe_step2", "deepseek_v3_noqlora")])
def test_greedy_generation_token_for_token(name, saved):
    """32 greedy tokens, a left-padded batch, both models with their own KV caches."""
    hf, _, folder = saved(name)
    ours = from_hf(folder)
    prompt, mask = _prompts()
    hf.generation_config.eos_token_id = None
    with torch.no_grad():
        want = hf.generate(input_ids=prompt, attention_mask=mask, max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=0)
    have = ours.generate(prompt, attention_mask=mask, max_new_tokens=32)
    assert want.shape == have.shape == (2, 9 + 32)
    assert torch.equal(have[:, 9:], want[:, 9:]), f"{name}: generations differ\n{have[:, 9:]}\n{want[:, 9:]}"


@pytest.mark.parametrize("name", ARCHS)
def test_to_hf_loads_in_transformers(name, saved, tmp_path):
    hf, model_type, folder = saved(name)
    ours = from_hf(folder)
    out = to_hf(ours, tmp_path / "out", max_shard_size=SHARD)
    assert (out / "model.safetensors.index.json").is_file()
    # Same tensor names as transformers' own save_pretrained (per-expert layout included).
    assert set(_keys(out)) == set(_keys(folder))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == model_type and cfg["eos_token_id"] == 2

    back, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, attn_implementation="eager", experts_implementation="eager", output_loading_info=True
    )
    assert type(back) is type(hf)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    want_sd, got_sd = hf.state_dict(), back.state_dict()
    assert set(want_sd) == set(got_sd)
    for k in want_sd:
        assert torch.equal(want_sd[k], got_sd[k]), f"{name}: {k} changed in the round trip"
    ids = torch.randint(0, V, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        diff = (back.eval()(input_ids=ids).logits - hf(input_ids=ids).logits).abs().max().item()
    assert diff <= TOL

    # And back into moekit: the same tensors, bit for bit.
    again = from_hf(out)
    a, b = ours.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3"])
def test_transformers_in_memory_layout_loads(name, saved, tmp_path):
    """transformers 5 holds experts fused (mlp.experts.gate_up_proj / down_proj) and renames
    Mixtral's block_sparse_moe to mlp; a state dict saved as is loads to the same model."""
    from safetensors.torch import save_file

    hf, _, folder = saved(name)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in sd)
    if hf.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["lm_head.weight"].clone()  # safetensors refuses shared storage
    save_file(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    a, b = from_hf(tmp_path).state_dict(), from_hf(folder).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
