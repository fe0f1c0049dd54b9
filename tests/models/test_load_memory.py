"""Loading without holding the weights twice: straight into the target dtype, optionally as
copy-on-write views of the file, and the peak memory it takes (measured in fresh processes)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from ckpt_helpers import tiny

from moekit.checkfiles import CheckpointError, verify_manifest
from moekit.models import build_model, get_preset
from moekit.models.io import load_checkpoint, save_model_checkpoint

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "load_memory.py"


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))


def test_loads_straight_into_the_target_dtype(tmp_path):
    model = tiny(0)
    ck = save_model_checkpoint(model, tmp_path / "ck")
    for dtype in (torch.bfloat16, "bfloat16", torch.float16):
        loaded = load_checkpoint(ck, dtype=dtype)
        want = torch.bfloat16 if dtype == "bfloat16" else dtype
        for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert b.dtype == want and torch.equal(b, a.to(want)), name
    plain = load_checkpoint(ck)  # default: float32, bit-equal outputs
    assert all(p.dtype == torch.float32 for p in plain.parameters())
    assert torch.equal(plain.eval()(_ids()).logits, model(_ids()).logits)


def test_auto_keeps_the_stored_dtype(tmp_path):
    ck = save_model_checkpoint(tiny(0).to(torch.bfloat16), tmp_path / "ck")
    assert {p.dtype for p in load_checkpoint(ck, dtype="auto").parameters()} == {torch.bfloat16}
    assert {p.dtype for p in load_checkpoint(ck).parameters()} == {torch.float32}


@pytest.mark.parametrize("bad", ["int8", torch.int8, "fp33"])
def test_bad_dtype_is_named(tmp_path, bad):
    ck = save_model_checkpoint(tiny(0), tmp_path / "ck")
    with pytest.raises(ValueError, match="dtype must be"):
        load_checkpoint(ck, dtype=bad)


def test_mmap_views_the_file_and_never_writes_it(tmp_path):
    model = tiny(0)
    ck = save_model_checkpoint(model, tmp_path / "ck")
    weights = ck / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    mapped = load_checkpoint(ck, mmap=True).eval()
    # Views of the file: no storage of its own (torch.frombuffer storages are not resizable).
    w = mapped.blocks[0].ffn.experts.w_in
    assert not w.untyped_storage().resizable()
    assert (mapped(_ids()).logits - model(_ids()).logits).abs().max() < 1e-6
    with torch.no_grad():
        for p in mapped.parameters():
            p.add_(1.0)  # copy-on-write: the page is copied, the file is not touched
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == digest
    verify_manifest(ck)
    again = load_checkpoint(ck)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    shutil.rmtree(ck)  # the mapping outlives the folder
    assert torch.isfinite(mapped(_ids()).logits).all()


def test_mmap_of_a_tied_model_keeps_the_tie(tmp_path):
    model = build_model(dataclasses.replace(get_preset("tiny"), tie_embeddings=True)).eval()
    ck = save_model_checkpoint(model, tmp_path / "ck")
    mapped = load_checkpoint(ck, mmap=True)
    assert mapped.lm_head.weight is mapped.embed.weight
    assert torch.equal(mapped.embed.weight, model.embed.weight)


def test_peak_memory_while_loading_is_the_weights_once(tmp_path):
    """Measured as the resident high-water mark of a fresh process (reset before the load). The
    old way (load_file + load_state_dict) is measured too, to show the measurement sees a copy."""
    sys.path.insert(0, str(BENCH.parent))
    try:
        from load_memory import build_checkpoints
        from load_memory import peak_in_fresh_process as _peak
    finally:
        sys.path.pop(0)
    ck, hf = build_checkpoints(tmp_path, d_model=256, d_ff=512, experts=8, layers=4)
    new, old = _peak("moekit", ck), _peak("load_file (old)", ck)
    assert new["weight_bytes"] > 40 * 2**20
    assert new["ratio"] < 1.1, new
    assert old["ratio"] > 1.8, old
    cast = _peak("hf", hf, "bfloat16")  # float32 on disk, cast chunk by chunk on the way in
    assert cast["weight_bytes"] == new["weight_bytes"] // 2
    assert cast["ratio"] < 1.1, cast


def test_float32_kept_on_purpose_stays_float32(tmp_path):
    """A bf16 DeepSeek-V3 folder keeps its router in float32 (as transformers does); converted to a
    moekit checkpoint and loaded in bfloat16 (or "auto"), the router stays float32 and the model
    equals from_hf of the folder. A float32 checkpoint asked for bfloat16 is cast whole."""
    from moekit.hf import from_hf, to_hf

    torch.manual_seed(0)
    model = build_model(get_preset("tiny-deepseek")).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(getattr(m, "expert_bias", None), torch.Tensor):
                m.expert_bias.normal_(0, 0.013)
    hf = from_hf(to_hf(model, tmp_path / "hf", dtype="bfloat16"))
    ck = save_model_checkpoint(hf, tmp_path / "ck", extra={"hf_source": hf.hf_source})
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for dtype in ("auto", "bfloat16", torch.bfloat16):
        loaded = load_checkpoint(ck, dtype=dtype).eval()
        for key, t in hf.state_dict().items():
            assert loaded.state_dict()[key].dtype == t.dtype, (dtype, key)
        assert torch.equal(loaded(x).logits, hf(x).logits)
    cast = load_checkpoint(save_model_checkpoint(model, tmp_path / "f32"), dtype="bfloat16")
    assert {t.dtype for t in cast.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}


def test_a_wrapper_prefix_may_not_name_a_tensor_twice(tmp_path):
    from safetensors.torch import load_file, save_file

    ck = save_model_checkpoint(tiny(0), tmp_path / "ck")
    state = load_file(str(ck / "model.safetensors"))
    state["module.lm_head.weight"] = torch.zeros_like(state["lm_head.weight"])
    save_file(state, str(ck / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"'lm_head.weight' and 'module.lm_head.weight' both name"):
        load_checkpoint(ck, verify=False)


def test_generate_mmap(tmp_path, capsys, monkeypatch):
    """`generate --mmap` maps a moekit checkpoint (same greedy ids here) and refuses what it cannot map."""
    import moekit.models.io as io
    from moekit.cli import main
    from moekit.hf import to_hf

    mapped = []
    real = io.MappedFile
    monkeypatch.setattr(io, "MappedFile", lambda path: mapped.append(path) or real(path))

    ck = save_model_checkpoint(tiny(0), tmp_path / "ck")
    args = ["generate", "--checkpoint", str(ck), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)[0]["new_ids"]
    assert mapped == []
    assert main([*args, "--mmap"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["new_ids"] == plain
    assert mapped == [ck / "model.safetensors"]
    hf = to_hf(tiny(0), tmp_path / "hf", model_type="mixtral")
    assert main(["generate", "--checkpoint", str(hf), "--prompt-ids", "1,2", "--mmap"]) == 2
    assert "--mmap: " in capsys.readouterr().err
