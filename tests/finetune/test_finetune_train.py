"""The trainer on fine-tuning data: masked targets through training, validation and the test
evaluation, bit-identical resume; a Hugging Face tokenizer saved into each checkpoint is the one
`checkpoint_tokenizer` finds there again."""

from __future__ import annotations

import pytest
import torch
from faults import Killed, kill_at
from ftkit import pairs, small_run, write_jsonl

from moekit.finetune.data import FinetuneData
from moekit.tokenizer import ByteTokenizer, checkpoint_tokenizer, load_hf_tokenizer
from moekit.train import checkpoint as ck
from moekit.train.loop import train
from moekit.train.steps import IGNORE


def test_finetune_data_trains_evaluates_and_resumes_bit_identically(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", pairs())
    cfg = small_run(path, "optim.grad_accum=2")
    data = FinetuneData(cfg.data, path, ByteTokenizer(), cfg.seed)
    full = train(cfg, tmp_path / "full", data=data)
    with pytest.raises(Killed):
        train(cfg, tmp_path / "cut", data=data, before_step=kill_at(4))
    resumed = train(cfg, tmp_path / "cut", data=data, resume=True)
    assert len(full.losses) == 6 and resumed.losses == full.losses[3:]
    assert resumed.final_val_bpb == full.final_val_bpb and resumed.test_bpb == full.test_bpb
    a = ck.load_file_state(tmp_path / "full" / "checkpoints" / "step-00000006")
    b = ck.load_file_state(tmp_path / "cut" / "checkpoints" / "step-00000006")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # The test evaluation scored the trained targets of the test split only (bytes: one per token).
    trained = int(data._test.trained.sum())
    assert full.test["test_tokens"] == full.test["test_bytes"] == trained < len(data._test.tokens) - 1
    assert full.test["test_examples"] == data._test.examples
    # Bits per byte of byte tokens is the loss over ln 2, on validation and test alike.
    assert full.evals[-1]["val_bpb"] == pytest.approx(full.evals[-1]["val_loss"] / 0.6931471805599453, rel=1e-12)


def test_hf_tokenizer_token_bytes_and_its_copy_in_a_checkpoint(tmp_path, hf_tokenizer_folder):
    from _hf_tokenizer import IM_END, VOCAB

    tok = load_hf_tokenizer(hf_tokenizer_folder)
    text = "Grüße, café 🙂\ndef main(): pass"
    ids = tok.encode_text(text, add_special_tokens=False)
    token_bytes = tok.token_bytes()
    assert len(token_bytes) == VOCAB and int(token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert token_bytes[IM_END] == 0 and token_bytes[tok.encode_text("")[0]] == 0  # eos, bos: no text
    path = write_jsonl(tmp_path / "d.jsonl", pairs())
    cfg = small_run(path, "schedule.steps=1", "schedule.warmup_steps=0", "eval.test=false")
    data = FinetuneData(cfg.data, path, tok, cfg.seed)
    assert data.max_id() < VOCAB and (data.train.tokens == IM_END).any()
    model_vocab = cfg.model.vocab_size  # 256 < the tokenizer's 320: the model keeps its own
    assert data.sets_vocab is False and model_vocab == 256
    cfg = small_run(path, "schedule.steps=1", "schedule.warmup_steps=0", "eval.test=false",
                    f"model.vocab_size={VOCAB}")
    train(cfg, tmp_path / "run", data=data)
    folder = ck.latest(tmp_path / "run" / "checkpoints").path
    again = checkpoint_tokenizer(type("Ref", (), {"path": folder, "kind": "moekit"})())
    assert again.encode_text(text) == tok.encode_text(text) and again.eos_token_ids == (IM_END,)
    x, y = data.train_batch(0, 0, 1)
    assert ((y == IGNORE) | (y >= 0)).all()
