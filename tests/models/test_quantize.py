"""models/quantize.py and the checkpoint format: quantize_model on decoder models, the
config.json record, save/load round trips (bit-exact, never re-quantized), load_quantized from
moekit and Hugging Face folders, generation, and the errors."""

import json

import pytest
import torch

from moekit.checkfiles import CheckpointError
from moekit.layers.moe import MoE
from moekit.layers.quantized import QuantizedExperts, QuantizedLinear
from moekit.models import build_model, get_preset
from moekit.models.io import load_checkpoint, save_model_checkpoint
from moekit.models.quantize import TARGETS, QuantSpec, load_quantized, prepare_quantized, quantize_model, state_bytes
from moekit.ops import quant
from moekit.ops.quant import dequantize

ALL = ("experts", "shared_experts", "dense_ffn", "attention", "head")


def _model(preset="tiny-qwen2-moe", seed=0):
    torch.manual_seed(seed)
    return build_model(get_preset(preset)).eval()


def _quantized(bits, preset="tiny-qwen2-moe", targets=ALL):
    return quantize_model(_model(preset), bits, 32, targets)


def _dequantized_float(qmodel, preset="tiny-qwen2-moe"):
    """The float model holding exactly the dequantized weights of `qmodel`."""
    model = _model(preset)
    state = model.state_dict()
    for name, mod in qmodel.named_modules():
        if isinstance(mod, QuantizedLinear):
            state[f"{name}.weight"] = dequantize(mod.qweight())
        elif isinstance(mod, QuantizedExperts):
            w_in, w_out = mod.weights(torch.float32)
            state[f"{name}.w_in"], state[f"{name}.w_out"] = w_in, w_out
    for key, value in qmodel.state_dict().items():
        if key in state and not key.endswith(("_q", "_scale")):
            state[key] = value
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2-moe", "tiny-deepseek"])
def test_quantized_decoder_runs_every_target_quantized(preset, bits):
    have = {"tiny": ("experts", "attention", "head"), "tiny-deepseek": ("experts", "shared_experts", "dense_ffn",
            "attention", "head")}
    targets = have.get(preset, ALL)
    qmodel = _quantized(bits, preset, targets)
    kinds = {type(m).__name__ for m in qmodel.modules()}
    assert {"QuantizedExperts", "QuantizedLinear"} <= kinds
    assert not any(type(m) is torch.nn.Linear and m.out_features > 1 for m in qmodel.modules())  # only 1-row gates
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        out = qmodel(ids).logits
        # exact in the numbers: the float model with the dequantized weights gives the same logits
        torch.testing.assert_close(out, _dequantized_float(qmodel, preset)(ids).logits, rtol=1e-5, atol=1e-5)
        ref = _model(preset)(ids).logits
    # close to the float model: measured max |diff| 0.0054-0.0078 (int8) and 0.10-0.13 (4-bit)
    # on logits of magnitude ~0.65 (tiny random models, block 32)
    assert (out - ref).abs().max().item() < (0.02 if bits == 8 else 0.25)
    assert state_bytes(qmodel) < state_bytes(_model(preset)) * (0.5 if bits == 8 else 0.4)


def test_record_and_checkpoint_round_trip_is_bit_exact(tmp_path, monkeypatch):
    qmodel = _quantized(4)
    save_model_checkpoint(qmodel, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"] == {"format": "moekit-q/1", "bits": 4, "block": 32, "targets": list(ALL),
                                      "scale_dtype": "float32"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("blocks.1.ffn.experts.w_in_q").dtype == torch.uint8
        assert f.get_tensor("blocks.1.ffn.experts.w_in_scale").dtype == torch.float32
    assert "blocks.1.ffn.experts.w_in" not in keys and "lm_head.weight" not in keys

    def refuse(*args, **kwargs):
        raise AssertionError("loading re-quantized a weight")

    monkeypatch.setattr(quant, "quantize", refuse)
    monkeypatch.setattr("moekit.layers.quantized.quantize", refuse)
    back = load_checkpoint(tmp_path / "q")
    assert back.quantization == qmodel.quantization
    a, b = qmodel.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    ids = torch.randint(0, 256, (1, 7))
    with torch.no_grad():
        assert torch.equal(qmodel(ids).logits, back(ids).logits)


def test_generate_on_a_quantized_model(tmp_path):
    qmodel = _quantized(8)
    out = qmodel.generate([[1, 2, 3], [4]], max_new_tokens=6)
    assert out.shape == (2, 9)
    save_model_checkpoint(qmodel, tmp_path / "q")
    assert torch.equal(load_checkpoint(tmp_path / "q").generate([[1, 2, 3], [4]], max_new_tokens=6), out)
    # greedy decode with the KV cache agrees with recomputing the whole sequence
    assert torch.equal(qmodel.generate([[1, 2, 3], [4]], max_new_tokens=6, use_cache=False), out)


def test_tied_head_gets_its_own_quantized_copy(tmp_path):
    cfg = get_preset("tiny")
    cfg.tie_embeddings = True
    torch.manual_seed(0)
    qmodel = quantize_model(build_model(cfg).eval(), 8, 32, ("head",))
    assert isinstance(qmodel.lm_head, QuantizedLinear) and qmodel.embed.weight.dtype == torch.float32
    save_model_checkpoint(qmodel, tmp_path / "q")
    back = load_checkpoint(tmp_path / "q")
    ids = torch.randint(0, 256, (1, 5))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, qmodel(ids).logits)


@pytest.mark.parametrize("bad, match", [
    (dict(bits=3), r"bits must be one of \[8, 4\], got 3"),
    (dict(block=0), "block must be an even integer from 2 to 4096, got 0"),
    (dict(targets=("experts", "mlp")), "targets: 'mlp' is not a target; allowed: experts, shared_experts, "
                                       "dense_ffn, attention, head"),
    (dict(targets="experts,,head"), "targets: '' is not a target"),
    (dict(targets=()), "targets must name at least one"),
])
def test_bad_arguments(bad, match):
    with pytest.raises(ValueError, match=match):
        quantize_model(_model(), **(dict(bits=8, block=32, targets=("experts",)) | bad))


def test_a_missing_target_or_a_second_quantization_is_refused():
    with pytest.raises(ValueError, match="has no shared_experts to quantize; it has: experts, attention, head"):
        quantize_model(_model("tiny"), 8, 32, ("experts", "shared_experts"))
    qmodel = _quantized(8, targets=("experts",))
    with pytest.raises(ValueError, match="quantized already"):
        quantize_model(qmodel, 8, 32, ("attention",))
    assert QuantSpec(4, 64, "head, experts").targets == ("experts", "head")
    assert TARGETS == ALL


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config["quantization"].update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, match", [
    (dict(format="moekit-q/2"), r"unknown quantization format 'moekit-q/2'; this moekit reads 'moekit-q/1'"),
    (dict(format="gguf-q4_0"), "unknown quantization format 'gguf-q4_0'"),
    (dict(bits=3), r"quantization: bits must be one of \[8, 4\], got 3"),
    (dict(scale_dtype="float16"), "scale_dtype 'float16'"),
    (dict(targets=["experts", "mlp"]), "targets: 'mlp' is not a target"),
])
def test_an_unreadable_record_is_a_checkpoint_error_naming_the_file(tmp_path, changes, match):
    save_model_checkpoint(_quantized(8), tmp_path / "q")
    _edit_config(tmp_path / "q", **changes)
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(tmp_path / "q", verify=False)
    assert str(tmp_path / "q" / "config.json") in str(err.value)


def test_prepare_builds_the_structure_on_meta_without_data(tmp_path):
    """What a memory-mapped loader needs: the quantized modules with empty (meta) buffers."""
    save_model_checkpoint(_quantized(4), tmp_path / "q")
    with torch.device("meta"):
        model = build_model(get_preset("tiny-qwen2-moe"))
    model = prepare_quantized(model, tmp_path / "q" / "config.json")
    state = model.state_dict()
    assert state["blocks.1.ffn.experts.w_in_q"].device.type == "meta"
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in _quantized(4).state_dict().items()}
    plain = _model()
    save_model_checkpoint(plain, tmp_path / "f")
    assert prepare_quantized(plain, tmp_path / "f" / "config.json") is plain


def test_load_quantized_from_moekit_and_hf_folders(tmp_path):
    from moekit.hf import to_hf

    model = _model()
    save_model_checkpoint(model, tmp_path / "f")
    q = load_quantized(tmp_path / "f", bits=4, block=32, targets=("experts", "head"))
    assert q.quantization["bits"] == 4 and isinstance(q.lm_head, QuantizedLinear)
    expected = _quantized(4, targets=("experts", "head")).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in q.state_dict().items())
    to_hf(model, tmp_path / "hf")
    qh = load_quantized(tmp_path / "hf", bits=8)
    assert isinstance(qh.blocks[1].ffn.experts, QuantizedExperts)
    save_model_checkpoint(q, tmp_path / "q")
    assert load_quantized(tmp_path / "q", 4, 32, ("head", "experts")).quantization == q.quantization
    with pytest.raises(ValueError, match="quantized already"):
        load_quantized(tmp_path / "q", 8)
    with pytest.raises(ValueError, match="bits must be one of"):
        load_quantized(tmp_path / "does-not-exist", 3)  # checked before the path is read


def test_a_failed_quantization_leaves_the_model_as_it_was():
    """Non-finite weights in the second MoE layer: nothing is swapped, and the model can be fixed
    and quantized afterwards."""
    torch.manual_seed(0)
    model = build_model(get_preset("tiny")).eval()
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(layers) >= 2
    with torch.no_grad():
        layers[1].experts.w_in[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_model(model, bits=8, targets="experts")
    assert not any(isinstance(m, QuantizedExperts) for m in model.modules())
    assert getattr(model, "quantization", None) is None
    with torch.no_grad():
        layers[1].experts.w_in[0, 0, 0] = 0.0
    quantize_model(model, bits=8, targets="experts")
    assert sum(isinstance(m, QuantizedExperts) for m in model.modules()) == len(layers)
