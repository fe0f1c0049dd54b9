"""Bad input: every broken Hugging Face folder is refused with the file and the tensor named, and
before a single weight is read (nothing is half-loaded). Checkpoints here are written by to_hf
from small moekit models, so these tests need no transformers."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from _hf_cases import deepseek_like, qwen2_moe_like
from safetensors.torch import load_file, save_file

from moekit.hf import SUPPORTED_MODEL_TYPES, CheckpointError, NotRepresentable, from_hf, to_hf
from moekit.hf import shards as shards_mod
from moekit.models import DecoderConfig, build_model

INDEX = "model.safetensors.index.json"


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    model = build_model(qwen2_moe_like())
    folder = to_hf(model, tmp_path / "hf", max_shard_size="3KB")
    return folder, model


def _index(folder):
    return json.loads((folder / INDEX).read_text())


def _rewrite(folder, file, change):
    """Apply change(dict of tensors) to one shard and keep the index in step."""
    tensors = load_file(str(folder / file))
    change(tensors)
    save_file(tensors, str(folder / file), metadata={"format": "pt"})
    index = _index(folder)
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != file}
    index["weight_map"].update({k: file for k in tensors})
    (folder / INDEX).write_text(json.dumps(index))


@pytest.fixture
def no_reads(monkeypatch):
    """Fail the test if any tensor data is read."""
    calls = []
    real = shards_mod.ShardSet.fill

    def spy(self, keys, dest):
        calls.append(keys)
        return real(self, keys, dest)

    monkeypatch.setattr(shards_mod.ShardSet, "fill", spy)
    return calls


def test_round_trip_without_transformers(ckpt):
    folder, model = ckpt
    assert len(_index(folder)["weight_map"]) > 0 and len(list(folder.glob("model-*.safetensors"))) > 2
    again = from_hf(folder)
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_unsupported_model_type_lists_supported(ckpt):
    folder, _ = ckpt
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        from_hf(folder)
    msg = str(err.value)
    assert "'gpt2'" in msg and all(t in msg for t in SUPPORTED_MODEL_TYPES)


def test_missing_shard_names_file_and_tensors(ckpt, no_reads):
    folder, _ = ckpt
    index = _index(folder)["weight_map"]
    victim = sorted(set(index.values()))[1]
    (folder / victim).unlink()
    with pytest.raises(CheckpointError) as err:
        from_hf(folder)
    msg = str(err.value)
    held = sorted(k for k, v in index.items() if v == victim)
    assert victim in msg and held[0] in msg
    assert no_reads == []


def test_wrong_shape_names_file_tensor_and_shapes(ckpt, no_reads):
    folder, _ = ckpt
    key = "model.layers.0.self_attn.q_proj.weight"
    file = _index(folder)["weight_map"][key]
    _rewrite(folder, file, lambda t: t.__setitem__(key, torch.zeros(24, 23)))
    with pytest.raises(CheckpointError) as err:
        from_hf(folder)
    msg = str(err.value)
    assert file in msg and key in msg and "[24, 23]" in msg and "[24, 24]" in msg
    assert "nothing was loaded" in msg and no_reads == []


def test_truncated_file_names_file_and_tensor(ckpt, no_reads):
    folder, _ = ckpt
    file = sorted(set(_index(folder)["weight_map"].values()))[0]
    path = folder / file
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    path.write_bytes(raw[:-7])
    with pytest.raises(CheckpointError) as err:
        from_hf(folder)
    msg = str(err.value)
    assert file in msg and last in msg and "truncated" in msg
    assert no_reads == []
    path.write_bytes(raw[:5])  # not even a header
    with pytest.raises(CheckpointError, match=file):
        from_hf(folder)


def test_unmapped_key_names_file_and_tensor(ckpt, no_reads):
    folder, _ = ckpt
    file = sorted(set(_index(folder)["weight_map"].values()))[-1]
    _rewrite(folder, file, lambda t: t.__setitem__("model.layers.0.mlp.mystery.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError) as err:
        from_hf(folder)
    msg = str(err.value)
    assert file in msg and "model.layers.0.mlp.mystery.weight" in msg and "maps to nothing" in msg
    assert no_reads == []


def test_tensor_for_a_layer_the_config_lacks(ckpt):
    folder, _ = ckpt
    file = sorted(set(_index(folder)["weight_map"].values()))[-1]
    key = "model.layers.7.input_layernorm.weight"
    _rewrite(folder, file, lambda t: t.__setitem__(key, torch.ones(24)))
    with pytest.raises(CheckpointError, match=r"layers\.7\.input_layernorm.*blocks\.7\.attn_norm\.weight"):
        from_hf(folder)


def test_missing_expert_tensor_is_named(ckpt, no_reads):
    folder, _ = ckpt
    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    file = _index(folder)["weight_map"][key]
    _rewrite(folder, file, lambda t: t.pop(key))
    with pytest.raises(CheckpointError) as err:
        from_hf(folder)
    assert f"missing tensor '{key}'" in str(err.value) and "blocks.2.ffn.experts.w_in" in str(err.value)
    assert no_reads == []


def test_index_and_file_disagree(ckpt):
    folder, _ = ckpt
    index = _index(folder)
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == files[0])
    index["weight_map"][key] = files[1]
    (folder / INDEX).write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as err:
        from_hf(folder)
    assert key in str(err.value) and files[1] in str(err.value)  # where the index wrongly puts it


def test_same_weights_given_twice(ckpt):
    folder, model = ckpt
    file = sorted(set(_index(folder)["weight_map"].values()))[-1]
    fused = model.blocks[2].ffn.experts.w_in.detach().clone()
    _rewrite(folder, file, lambda t: t.__setitem__("model.layers.2.mlp.experts.gate_up_proj", fused))
    with pytest.raises(CheckpointError, match=r"blocks\.2\.ffn\.experts\.w_in is given more than once.*gate_up_proj"):
        from_hf(folder)


def test_fused_expert_form_loads(ckpt):
    folder, model = ckpt
    per_expert = [k for k in _index(folder)["weight_map"] if ".mlp.experts." in k and "layers.2." in k]
    file = sorted(set(_index(folder)["weight_map"].values()))[-1]
    e = model.blocks[2].ffn.experts

    def fuse(t):
        t["model.layers.2.mlp.experts.gate_up_proj"] = e.w_in.detach().clone()
        t["model.layers.2.mlp.experts.down_proj"] = e.w_out.detach().clone()

    _rewrite(folder, file, fuse)
    for f in sorted(set(_index(folder)["weight_map"].values())):
        _rewrite(folder, f, lambda t: [t.pop(k) for k in per_expert if k in t])
    again = from_hf(folder)
    loaded = again.blocks[2].ffn.experts
    assert torch.equal(loaded.w_in, e.w_in) and torch.equal(loaded.w_out, e.w_out)


def test_no_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        from_hf(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: convert them to safetensors"):
        from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        from_hf(tmp_path / "nowhere")


@pytest.mark.parametrize("change, message", [
    ({"hidden_act": "gelu"}, "hidden_act='gelu' is not supported"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}},
     "type 'dynamic' is not supported.*'linear', 'yarn', 'llama3'"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"rope_scaling\['factor'\] is required"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantized checkpoints .*'fp8'"),
    ({"num_experts_per_tok": 9}, "top_k"),
])
def test_config_errors_name_the_field(ckpt, change, message):
    folder, _ = ckpt
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(change)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        from_hf(folder)


def test_sliding_window_caps_context(ckpt):
    folder, _ = ckpt
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(use_sliding_window=True, sliding_window=16)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="sliding-window"):
        model = from_hf(folder)
    assert model.cfg.max_seq_len == 16


def test_to_hf_refuses_what_no_family_expresses(tmp_path):
    switch = DecoderConfig(vocab_size=61, d_model=24, n_layers=1, n_heads=4,
                           moe=dict(d_ff=10, num_experts=4, top_k=1, router="switch"))
    with pytest.raises(NotRepresentable) as err:
        to_hf(build_model(switch), tmp_path / "x")
    msg = str(err.value)
    assert all(f"{t}:" in msg for t in SUPPORTED_MODEL_TYPES) and "router must be one of" in msg
    with pytest.raises(NotRepresentable, match="mixtral: renormalises the top-k weights"):
        to_hf(build_model(qwen2_moe_like()), tmp_path / "y", model_type="mixtral")
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported; supported: .*deepseek_v3, llama"):
        to_hf(build_model(qwen2_moe_like()), tmp_path / "z", model_type="gpt2")
    assert not (tmp_path / "x").exists()


def test_dtype_and_float32_router(tmp_path):
    torch.manual_seed(0)
    model = build_model(deepseek_like())
    with torch.no_grad():
        model.blocks[1].ffn.router.expert_bias.normal_()
    folder = to_hf(model, tmp_path / "ds", dtype="bfloat16", max_shard_size="2KB")
    stored = {}
    for f in folder.glob("*.safetensors"):
        stored.update(load_file(str(f)))
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert stored["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert stored["model.layers.1.self_attn.q_a_proj.weight"].dtype == torch.bfloat16
    assert json.loads((folder / "config.json").read_text())["torch_dtype"] == "bfloat16"
    loaded = from_hf(folder)  # dtype None: as stored
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert loaded.blocks[1].ffn.router.weight.dtype == torch.float32
    assert torch.equal(loaded.blocks[1].ffn.router.expert_bias, model.blocks[1].ffn.router.expert_bias)
    assert from_hf(folder, dtype=torch.float32).embed.weight.dtype == torch.float32
    out = loaded(torch.randint(0, 61, (1, 5)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    with pytest.raises(ValueError, match="dtype must be"):
        from_hf(folder, dtype="int8")


def test_mtp_layers_and_tied_head_are_skipped(tmp_path):
    cfg = deepseek_like()
    cfg.tie_embeddings = True
    cfg = DecoderConfig(**{**cfg.__dict__})
    torch.manual_seed(0)
    model = build_model(cfg)
    folder = to_hf(model, tmp_path / "ds")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.2.self_attn.kv_b_proj.weight"] = torch.zeros(3, 3)  # an MTP layer (num_hidden_layers=2)
    tensors["model.layers.2.enorm.weight"] = torch.zeros(3)
    tensors["lm_head.weight"] = torch.zeros(61, 24)  # tied: transformers ignores it as well
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    again = from_hf(folder)
    assert torch.equal(again.lm_head.weight, model.embed.weight)
    assert again.lm_head.weight is again.embed.weight


def test_tensors_are_read_straight_into_the_model(ckpt, monkeypatch):
    """from_hf reads every tensor into the model's own storage: no second copy of a weight."""
    folder, _ = ckpt
    real = shards_mod.read_into
    storages = []

    def spy(fh, info, dest, *args, **kwargs):
        storages.append(dest.untyped_storage().data_ptr())
        return real(fh, info, dest, *args, **kwargs)

    monkeypatch.setattr(shards_mod, "read_into", spy)
    model = from_hf(folder)
    own = {t.untyped_storage().data_ptr() for t in model.state_dict(keep_vars=True).values()}
    assert len(storages) > 20 and set(storages) <= own


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own imports
def test_to_hf_unwraps_compiled_models(tmp_path):
    torch.manual_seed(0)
    model = build_model(qwen2_moe_like())
    folder = to_hf(torch.compile(model), tmp_path / "c")  # compiled, never run: nothing is traced
    again = from_hf(folder)
    a, b = model.state_dict(), again.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
