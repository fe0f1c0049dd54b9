"""`moekit finetune` end to end on tiny models: the report, the checkpoints' finetune.json,
`load_finetuned`, resume, a Hugging Face base, and bad inputs (one line, exit 2, nothing lost)."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from cli_errors import last_error_line
from ftkit import pairs, small_model, write_jsonl

from moekit.cli import main
from moekit.finetune.job import FINETUNE_JSON, load_finetuned
from moekit.train import checkpoint as ck
from moekit.train.steps import evaluate

SETS = ["schedule.steps=4", "schedule.warmup_steps=1", "data.seq_len=32", "data.batch_size=4", "lora.rank=4",
        "checkpoint.every=2", "eval.every=2", "logging.progress=false", "logging.tensorboard=off", "threads=1"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A trained-for-two-steps tiny MoE checkpoint (byte tokens) and a JSONL file beside it."""
    from moekit.train.config import DataConfig, EvalConfig, LoggingConfig, RunConfig, ScheduleConfig
    from moekit.train.loop import train

    root = tmp_path_factory.mktemp("ft")
    cfg = RunConfig(model=small_model(), threads=1, data=DataConfig(max_bytes=60_000, seq_len=32, batch_size=2,
                                                                    test_min_bytes=0, test_fraction=0.0),
                    schedule=ScheduleConfig(steps=2, warmup_steps=0), eval=EvalConfig(every=0, batches=1, test=False),
                    logging=LoggingConfig(progress=False, tensorboard="off"))
    train(cfg, root / "base")
    return root / "base", write_jsonl(root / "data.jsonl", pairs())


def _run(capsys, base_dir, data, out, method="lora", *sets, resume=False):
    argv = ["finetune", "--checkpoint", str(base_dir), "--data", str(data), "--method", method, "--out", str(out),
            "--set", *SETS, *sets] + (["--resume"] if resume else [])
    code = main(argv)
    return code, capsys.readouterr()


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_finetune_reports_and_load_finetuned_rebuilds_the_model(tmp_path, capsys, base, method):
    base_dir, data = base
    code, cap = _run(capsys, base_dir, data, tmp_path / "ft", method)
    assert code == 0, cap.err
    assert "trainable parameters" in cap.err and "validation loss" in cap.err and "test bits/byte" in cap.err
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    frac = report["params"]["fraction"]
    assert (frac == 1.0) if method == "full" else (0 < frac < 0.2)
    assert report["before"]["test_bpb"] is not None and report["after"]["test_bpb"] is not None
    assert report["after"]["val_loss"] < report["before"]["val_loss"]
    assert set(report["expert_load"]) == {"0", "1"}
    for layer in report["expert_load"].values():
        assert sum(layer["base"]) == pytest.approx(1.0, abs=1e-12) and 0 <= layer["shift"] <= 1
    folder = ck.latest(tmp_path / "ft" / "checkpoints").path
    rec = json.loads((folder / FINETUNE_JSON).read_text())
    # The base is recorded as the checkpoint the run folder resolved to (a later checkpoint there is another base).
    assert rec["method"] == method and rec["base"]["path"] == str(ck.latest(base_dir / "checkpoints").path.resolve())
    assert FINETUNE_JSON in ck.verify(folder).manifest["files"]
    # The rebuilt model scores the validation batches exactly as the trainer's final evaluation did.
    from moekit.finetune.data import FinetuneData
    from moekit.tokenizer import ByteTokenizer
    from moekit.train.config import DataConfig

    model = load_finetuned(tmp_path / "ft")
    cfg = json.loads((folder / "run_config.json").read_text())
    fdata = FinetuneData(DataConfig(**cfg["data"]), data, ByteTokenizer(), 0)
    val_loss, _ = evaluate(model, fdata.val_batches(cfg["eval"]["batches"]), fdata.token_bytes,
                           torch.device("cpu"), torch.no_grad())
    assert val_loss == report["after"]["val_loss"]
    # The checkpoint's PEFT adapter files hold the trained adapters: loaded into the base with
    # fresh adapters, they give the fine-tuned model's logits (full fine-tuning writes none).
    has = [(folder / n).is_file() for n in ("adapter_config.json", "adapter_model.safetensors")]
    assert has == ([False, False] if method == "full" else [True, True])
    assert report["peft_adapter"] == (method != "full") and report["weight_bytes"] > 0
    if method == "lora":
        from moekit.finetune.lora import LoraSpec, apply_lora
        from moekit.finetune.peft import load_adapter
        from moekit.models.io import load_checkpoint

        fresh = apply_lora(load_checkpoint(ck.latest(base_dir / "checkpoints").path), LoraSpec(**{
            k: (tuple(v) if isinstance(v, list) else v) for k, v in rec["lora"].items()}))
        load_adapter(fresh, folder)
        ids = torch.randint(0, 256, (2, 16))
        with torch.no_grad():
            torch.testing.assert_close(fresh.eval()(ids).logits, model(ids).logits, rtol=0, atol=1e-6)


def test_resume_reproduces_the_uninterrupted_run(tmp_path, capsys, base):
    base_dir, data = base
    assert _run(capsys, base_dir, data, tmp_path / "ft")[0] == 0
    full = ck.load_file_state(tmp_path / "ft" / "checkpoints" / "step-00000004")
    shutil.rmtree(tmp_path / "ft" / "checkpoints" / "step-00000004")  # as if killed after step 2's checkpoint
    code, cap = _run(capsys, base_dir, data, tmp_path / "ft", resume=True)
    assert code == 0, cap.err
    again = ck.load_file_state(tmp_path / "ft" / "checkpoints" / "step-00000004")
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)


def test_hf_folder_base_with_its_tokenizer(tmp_path, capsys, hf_tokenizer_folder):
    transformers = pytest.importorskip("transformers")
    from _hf_cases import build
    from _hf_tokenizer import BOS, IM_END, PAD, VOCAB

    hf, _ = build("mixtral", vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=IM_END,
                  max_position_embeddings=64)
    hf.save_pretrained(tmp_path / "hf")
    for f in hf_tokenizer_folder.iterdir():
        shutil.copy(f, tmp_path / "hf" / f.name)
    data = write_jsonl(tmp_path / "d.jsonl", pairs())
    code, cap = _run(capsys, tmp_path / "hf", data, tmp_path / "ft", "lora", "lora.targets=experts")
    assert code == 0, cap.err
    report = json.loads((tmp_path / "ft" / "report.json").read_text())
    assert report["base"]["kind"] == "hf" and len(report["expert_load"]) == 3
    assert report["after"]["val_loss"] < report["before"]["val_loss"]
    assert transformers.AutoTokenizer.from_pretrained(ck.latest(tmp_path / "ft" / "checkpoints").path)
    assert isinstance(load_finetuned(tmp_path / "ft"), torch.nn.Module)


@pytest.mark.parametrize("rows, sets, expected", [
    (['{"text": "ok"}', '{"prompt": 1, "response": "x"}'], [], r"d.jsonl:2: 'prompt' is a JSON number"),
    ([{"prompt": "x" * 40, "response": "y"}] + pairs(), [], r"d.jsonl:1: the prompt is 40 tokens, longer than the "
                                                            r"context of 32 tokens"),
    (pairs(), ["model.d_model=64"], r"--set model.d_model: not a fine-tuning setting \(the model comes from"),
    (pairs(), ["data.path=x"], r"--set data.path: not a fine-tuning setting \(the data comes from --data\)"),
    (pairs(), ["lora.rank=0"], r"lora.rank must be a positive integer, got 0"),
    (pairs(), ["lora.targets=experts,mlp"], r"lora.targets: 'mlp' is not a target; allowed: experts, "),
    (pairs(), ["qlora.bits=3"], r"qlora.bits must be 4 or 8, got 3"),
    (pairs(), ["optim.lr=-1"], r"optim.lr"),
    (pairs(), ["lora.experts=1,9"], r"lora.experts: expert ids must be in 0..3, got \[1, 9\]"),
    (pairs(), ["routing.bias_update_rate=0"], r"routing.bias_update_rate: this model has no router with a bias"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, capsys, base, rows, sets, expected):
    base_dir, _ = base
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    argv = ["finetune", "--checkpoint", str(base_dir), "--data", str(data), "--method", "qlora",
            "--out", str(tmp_path / "ft"), "--set", *SETS, *sets]
    assert main(argv) == 2
    assert re.search(expected, last_error_line(capsys))
    assert not (tmp_path / "ft").exists()  # nothing was written


def test_resume_with_another_rank_or_base_is_refused_and_nothing_is_lost(tmp_path, capsys, base):
    base_dir, data = base
    assert _run(capsys, base_dir, data, tmp_path / "ft")[0] == 0
    code, cap = _run(capsys, base_dir, data, tmp_path / "ft", "lora", "lora.rank=8", resume=True)
    assert code == 2 and "other lora.* settings" in cap.err.strip().splitlines()[-1]
    code, cap = _run(capsys, base_dir, data, tmp_path / "ft")  # a fresh run into it
    assert code == 2 and "already holds checkpoints" in cap.err
    moved = tmp_path / "base-copy"
    shutil.copytree(base_dir, moved)
    # The same content elsewhere continues the run (two more steps: new checkpoints record the copy).
    code, cap = _run(capsys, moved, data, tmp_path / "ft", "lora", "schedule.steps=6", resume=True)
    assert code == 0, cap.err
    assert json.loads((ck.latest(tmp_path / "ft" / "checkpoints").path / FINETUNE_JSON).read_text())["base"][
        "path"] == str(ck.latest(moved / "checkpoints").path.resolve())
    manifest = ck.latest(moved / "checkpoints").path / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "note": "changed"}))  # still valid
    steps = sorted(p.name for p in (tmp_path / "ft" / "checkpoints").iterdir())
    code, cap = _run(capsys, moved, data, tmp_path / "ft", "lora", "schedule.steps=8", resume=True)
    assert code == 2 and "with another content" in cap.err.strip().splitlines()[-1]
    assert sorted(p.name for p in (tmp_path / "ft" / "checkpoints").iterdir()) == steps
    with pytest.raises(ValueError, match="changed since the fine-tuning"):
        load_finetuned(tmp_path / "ft")
    shutil.rmtree(moved)
    with pytest.raises(ValueError, match="is gone; put it back there"):
        load_finetuned(tmp_path / "ft")


def test_defaults_follow_the_steps_and_the_method(tmp_path):
    from moekit.finetune.job import build_config

    model = small_model()
    cfg = build_config(model, tmp_path / "d.jsonl", "lora", ["schedule.steps=6"])
    assert cfg.run.schedule.warmup_steps == 0 and cfg.run.data.seq_len == model.max_seq_len == 64
    assert build_config(model, tmp_path / "d.jsonl", "lora", []).run.schedule.warmup_steps == 10
    full = build_config(model, tmp_path / "d.jsonl", "full", ["schedule.warmup_steps=3", "lora.rank=2"])
    assert full.run.schedule.warmup_steps == 3 and full.lora.rank == 2 and full.run.optim.lr == 2e-5
    with pytest.raises(ValueError, match="data.seq_len=65: past the model's context of 64 tokens"):
        build_config(model, tmp_path / "d.jsonl", "lora", ["data.seq_len=65"])


def test_a_finetune_run_is_a_base_and_quantizes_but_is_no_plain_checkpoint(tmp_path, capsys, base):
    from moekit.checkfiles import CheckpointError
    from moekit.models.io import load_checkpoint

    base_dir, data = base
    assert _run(capsys, base_dir, data, tmp_path / "ft")[0] == 0
    first = json.loads((tmp_path / "ft" / "report.json").read_text())
    # chained: the fine-tuned model (adapters merged) is the next run's base
    code, cap = _run(capsys, tmp_path / "ft", data, tmp_path / "ft2")
    assert code == 0, cap.err
    second = json.loads((tmp_path / "ft2" / "report.json").read_text())
    assert second["before"]["val_loss"] == pytest.approx(first["after"]["val_loss"], rel=1e-6)
    assert main(["quantize", "--checkpoint", str(tmp_path / "ft"), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    with pytest.raises(CheckpointError, match="a `moekit finetune` checkpoint .* moekit.finetune.load_finetuned"):
        load_checkpoint(tmp_path / "ft")
