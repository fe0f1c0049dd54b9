"""`moekit quantize`: the written checkpoint, the one-line summary, the output-folder rules and
the user errors (one line, exit code 2, no traceback)."""

import json

import pytest
import torch

from moekit.cli import main
from moekit.layers.quantized import QuantizedExperts
from moekit.models import build_model, get_preset
from moekit.models.io import load_checkpoint, save_model_checkpoint


@pytest.fixture
def float_ckpt(tmp_path):
    torch.manual_seed(0)
    save_model_checkpoint(build_model(get_preset("tiny-qwen2-moe")), tmp_path / "float",
                          extra={"note": {"kept": True}})
    return tmp_path / "float"


def test_quantize_writes_a_loadable_checkpoint(float_ckpt, tmp_path, capsys):
    out = tmp_path / "q4"
    rc = main(["quantize", "--checkpoint", str(float_ckpt), "--bits", "4", "--out", str(out),
               "--targets", "experts,attention,head"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(printed) == 1
    assert printed[0].startswith(f"quantized experts,attention,head of {float_ckpt} to 4-bit (block 32): ")
    assert " MB -> " in printed[0] and f"wrote {out}" in printed[0]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["note"] == {"kept": True}
    model = load_checkpoint(out)
    assert isinstance(model.blocks[1].ffn.experts, QuantizedExperts)
    assert main(["generate", "--checkpoint", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "4",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result[0]["new_ids"]) == 4


def test_quantize_reads_a_hugging_face_folder(float_ckpt, tmp_path, capsys):
    from moekit.hf import to_hf

    to_hf(load_checkpoint(float_ckpt), tmp_path / "hf")
    assert main(["quantize", "--checkpoint", str(tmp_path / "hf"), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["hf_source"]["model_type"] == "qwen2_moe" and config["quantization"]["targets"] == ["experts"]
    load_checkpoint(tmp_path / "q")


@pytest.mark.parametrize("args, message", [
    (["--bits", "3"], r"bits must be one of [8, 4], got 3"),
    (["--bits", "8", "--block", "0"], "block must be an even integer from 2 to 4096, got 0"),
    (["--bits", "8", "--targets", "experts,mlp"], "targets: 'mlp' is not a target; allowed: experts, "
                                                  "shared_experts, dense_ffn, attention, head"),
])
def test_bad_arguments_are_one_line_errors(float_ckpt, tmp_path, capsys, args, message):
    rc = main(["quantize", "--checkpoint", str(float_ckpt), "--out", str(tmp_path / "q"), *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "q").exists()


def test_output_folder_rules(float_ckpt, tmp_path, capsys):
    def run(out, *extra):
        rc = main(["quantize", "--checkpoint", str(float_ckpt), "--bits", "8", "--out", str(out), *extra])
        return rc, capsys.readouterr().err

    rc, err = run(float_ckpt)
    assert rc == 2 and "is the source" in err and "quantize writes a new folder" in err
    rc, err = run(float_ckpt / "inside")
    assert rc == 2 and "is inside the source" in err
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("mine")
    rc, err = run(tmp_path / "junk", "--overwrite")
    assert rc == 2 and "holds no model" in err and (tmp_path / "junk" / "notes.txt").read_text() == "mine"
    assert run(tmp_path / "q")[0] == 0
    rc, err = run(tmp_path / "q")
    assert rc == 2 and "pass --overwrite" in err
    assert run(tmp_path / "q", "--overwrite")[0] == 0
    rc = main(["quantize", "--checkpoint", str(tmp_path / "q"), "--bits", "8", "--out", str(tmp_path / "qq")])
    assert rc == 2 and "quantized already" in capsys.readouterr().err


def test_a_damaged_quantized_config_is_a_one_line_error(float_ckpt, tmp_path, capsys):
    assert main(["quantize", "--checkpoint", str(float_ckpt), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    path = tmp_path / "q" / "config.json"
    config = json.loads(path.read_text())
    config["quantization"]["format"] = "moekit-q/9"
    path.write_text(json.dumps(config))
    from moekit.checkfiles import write_manifest

    write_manifest(tmp_path / "q", {"kind": "model"})  # a consistent folder, with a format we cannot read
    capsys.readouterr()
    rc = main(["generate", "--checkpoint", str(tmp_path / "q"), "--prompt-ids", "1", "--max-new-tokens", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0 and "unknown quantization format 'moekit-q/9'" in err and str(path) in err


def test_generate_quantizes_on_load_as_quantize_does(float_ckpt, tmp_path, capsys):
    """`generate --bits 4` gives the tokens of the checkpoint `moekit quantize --bits 4` writes."""
    args = ["--prompt-ids", "5,6,7", "--max-new-tokens", "6", "--json"]
    targets = ["--quant-targets", "experts,attention"]
    assert main(["generate", "--checkpoint", str(float_ckpt), "--bits", "4", *targets, *args]) == 0
    on_load = json.loads(capsys.readouterr().out)[0]["new_ids"]
    assert main(["quantize", "--checkpoint", str(float_ckpt), "--bits", "4", "--targets", "experts,attention",
                 "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(tmp_path / "q"), *args]) == 0
    assert json.loads(capsys.readouterr().out)[0]["new_ids"] == on_load
    rc = main(["generate", "--checkpoint", str(tmp_path / "q"), "--bits", "8", *args])
    assert rc == 2 and "quantized already" in capsys.readouterr().err
    rc = main(["generate", "--checkpoint", str(float_ckpt), "--bits", "3", *args])
    assert rc == 2 and "bits must be one of [8, 4], got 3" in capsys.readouterr().err


def test_quantize_keeps_the_stored_dtype_of_what_it_does_not_quantize(tmp_path, capsys):
    """A bfloat16 checkpoint quantized: the embedding (never quantized) stays bfloat16, no larger
    than in the source."""
    from safetensors import safe_open

    torch.manual_seed(0)
    src = save_model_checkpoint(build_model(get_preset("tiny")).to(torch.bfloat16), tmp_path / "bf16")
    assert main(["quantize", "--checkpoint", str(src), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    with safe_open(str(tmp_path / "q" / "model.safetensors"), "pt") as f:
        assert f.get_slice("embed.weight").get_dtype() == "BF16"
    assert load_checkpoint(tmp_path / "q", dtype="auto").embed.weight.dtype == torch.bfloat16


def test_generate_bits_problems_are_refused_before_loading(float_ckpt, tmp_path, capsys, monkeypatch):
    import moekit.cli.generate as gen

    assert main(["quantize", "--checkpoint", str(float_ckpt), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()

    def no_load(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(gen, "load_model", no_load)
    args = ["--prompt-ids", "5,6", "--max-new-tokens", "2"]
    assert main(["generate", "--checkpoint", str(tmp_path / "q"), "--bits", "8", *args]) == 2
    assert "quantized already" in capsys.readouterr().err
    torch.manual_seed(0)
    dense = save_model_checkpoint(build_model(get_preset("tiny-dense")), tmp_path / "dense")
    assert main(["generate", "--checkpoint", str(dense), "--bits", "4", *args]) == 2
    err = capsys.readouterr().err
    assert "--quant-targets: this model has no experts to quantize; it has: dense_ffn, attention, head" in err, err


def test_info_shows_the_quantization_and_the_bytes_on_disk(float_ckpt, tmp_path, capsys):
    from moekit.tensorfile import read_header

    assert main(["quantize", "--checkpoint", str(float_ckpt), "--bits", "4", "--out", str(tmp_path / "q"),
                 "--targets", "experts,attention"]) == 0
    capsys.readouterr()
    assert main(["info", "--checkpoint", str(tmp_path / "q"), "--json"]) == 0
    stored = json.loads(capsys.readouterr().out)["checkpoint"]
    infos = read_header(tmp_path / "q" / "model.safetensors").values()
    assert stored["weight_bytes"] == sum(i.nbytes for i in infos)
    assert stored["quantization"]["bits"] == 4 and stored["quantization"]["targets"] == ["experts", "attention"]
    assert main(["info", "--checkpoint", str(tmp_path / "q")]) == 0
    out = capsys.readouterr().out
    assert "moekit-q/1: 4-bit, block 32, experts, attention" in out and "weights on disk" in out
    assert main(["info", "--checkpoint", str(float_ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["checkpoint"]["quantization"] is None
