"""What `moekit generate` and `moekit chat` refuse, in one line with exit status 2 and before any
weight is read: a folder without a tokenizer (text) or without a chat template (chat), a prompt
past the model's context, weights larger than the memory available. And what they return when
ids cannot be decoded: the ids, with text null and a note."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _hf_cases import build  # noqa: E402
from _hf_tokenizer import BOS, IM_END, PAD, VOCAB, save_tokenizer  # noqa: E402
from cli_errors import last_error_line as _error  # noqa: E402

from moekit.cli import main  # noqa: E402

CTX = 48


@pytest.fixture(scope="module")
def bare(tmp_path_factory):
    """A tiny Hugging Face folder (qwen3_moe) without any tokenizer file."""
    hf, _ = build("qwen3_moe", vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=IM_END,
                  max_position_embeddings=CTX)
    folder = tmp_path_factory.mktemp("bare")
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def with_tokenizer(bare, hf_tokenizer_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("with_tokenizer")
    for src in (bare, hf_tokenizer_folder):
        for f in src.iterdir():
            shutil.copy(f, folder / f.name)
    return folder


@pytest.fixture
def no_loading(monkeypatch):
    """Loading any weights fails the test: the checks come first."""
    def boom(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("moekit.hf.from_hf", boom)
    monkeypatch.setattr("moekit.models.io.load_model", boom)


def test_no_tokenizer_text_is_an_error_ids_work(bare, capsys, monkeypatch):
    assert main(["generate", "--checkpoint", str(bare), "--prompt", "hello"]) == 2
    line = _error(capsys)
    assert "has no tokenizer" in line and "tokenizer.json" in line and "tokenizer.model" in line
    assert "--prompt-ids" in line
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--checkpoint", str(bare)]) == 2
    assert "has no tokenizer" in _error(capsys)

    assert main(["generate", "--checkpoint", str(bare), "--prompt-ids", "1,2,3", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "(no text: the checkpoint has no tokenizer)" in out and "ids: 1,2,3 | " in out


def test_converted_checkpoint_prompt_ids_come_back(bare, tmp_path, capsys):
    """A checkpoint converted from a folder without a tokenizer: ids in, ids out (it used to fail
    decoding them as bytes)."""
    ck = tmp_path / "ck"
    assert main(["convert", "--from-hf", str(bare), "--out", str(ck)]) == 0
    capsys.readouterr()
    argv = ["generate", "--checkpoint", str(ck), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json",
            "--ignore-eos"]
    assert main(argv) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["prompt_ids"] == [1, 2, 3] and len(r["new_ids"]) == 4
    assert r["text"] is None and "no tokenizer" in r["note"]


def test_byte_tokenizer_with_a_larger_vocabulary(tmp_path, capsys):
    """A moekit checkpoint without tokenizer.json reads bytes; ids past 255 get no text, not a crash."""
    import dataclasses

    from moekit.models import build_model, get_preset, save_model_checkpoint

    torch.manual_seed(0)
    model = build_model(dataclasses.replace(get_preset("tiny"), vocab_size=300))
    ck = save_model_checkpoint(model, tmp_path / "ck")
    assert main(["generate", "--checkpoint", str(ck), "--prompt-ids", "280,290", "--max-new-tokens", "2",
                 "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["prompt_ids"] == [280, 290] and len(r["new_ids"]) == 2
    assert r["text"] is None and "outside the tokenizer's vocabulary" in r["note"]
    assert main(["generate", "--checkpoint", str(ck), "--prompt", "ab", "--max-new-tokens", "2", "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)
    assert r["prompt_ids"] == [97, 98]


def test_no_chat_template(bare, hf_tokenizer_folder, tmp_path, capsys, monkeypatch, no_loading):
    folder = tmp_path / "plain"
    shutil.copytree(bare, folder)
    save_tokenizer(folder, chat_template=None)
    assert not (folder / "chat_template.jinja").exists()
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--checkpoint", str(folder)]) == 2
    line = _error(capsys)
    assert "has no chat template" in line and "moekit generate --prompt" in line
    assert main(["generate", "--checkpoint", str(folder), "--chat", "--prompt", "hi"]) == 2
    assert "no chat template" in _error(capsys)


def test_prompt_past_the_context(with_tokenizer, capsys, no_loading):
    argv = ["generate", "--checkpoint", str(with_tokenizer)]
    n = len(transformers.AutoTokenizer.from_pretrained(with_tokenizer)("def " * 60)["input_ids"])
    assert main([*argv, "--prompt", "def " * 60]) == 2
    line = _error(capsys)
    assert f"the prompt has {n} tokens; with --max-new-tokens 64 that is {n + 64}" in line
    assert f"past the model's context of {CTX} tokens" in line
    assert main([*argv, "--prompt", "hi", "--prompt", "x", "--max-new-tokens", str(CTX)]) == 2
    line = _error(capsys)
    assert "prompt 1 has 2 tokens; with --max-new-tokens 48 that is 50" in line


def test_chat_turn_past_the_context_is_refused(with_tokenizer, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("def " * 60 + "\nhi\n"))
    assert main(["chat", "--checkpoint", str(with_tokenizer), "--max-new-tokens", "4", "--json"]) == 2
    captured = capsys.readouterr()
    assert "past the model's context" in captured.err and "/reset" in captured.err
    turns = [json.loads(line) for line in captured.out.splitlines()]
    assert len(turns) == 1 and len(turns[0]["prompt_ids"]) < 20  # the second turn ran without the first


def test_too_large_for_memory(with_tokenizer, capsys, monkeypatch):
    from moekit.hf import config_from_hf
    from moekit.models import count_parameters

    params = count_parameters(config_from_hf(with_tokenizer))[0]
    monkeypatch.setattr("moekit.machine.available_memory", lambda: params * 3)  # fits bf16, not float32
    argv = ["generate", "--checkpoint", str(with_tokenizer), "--prompt", "hi", "--max-new-tokens", "2", "--json"]
    with monkeypatch.context() as m:
        m.setattr("moekit.hf.from_hf", lambda *a, **k: pytest.fail("weights were loaded"))
        assert main([*argv, "--dtype", "float32"]) == 2
    line = _error(capsys)
    assert f"needs {params * 4 / 2**30:.1f} GiB of float32 weights" in line and "--allow-large" in line
    assert "--dtype bfloat16" in line
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    assert main([*argv, "--dtype", "float32", "--allow-large"]) == 0
    capsys.readouterr()


def test_dtype_reaches_the_model(with_tokenizer, tmp_path, capsys):
    from moekit.cli.common import load_model
    from moekit.models.io import resolve_checkpoint

    ck = tmp_path / "ck"
    assert main(["convert", "--from-hf", str(with_tokenizer), "--out", str(ck)]) == 0
    capsys.readouterr()
    for folder in (with_tokenizer, ck):
        ref = resolve_checkpoint(folder)
        for dtype in ("bfloat16", "float16"):
            model = load_model(ref, "cpu", dtype)
            assert model.embed.weight.dtype == getattr(torch, dtype), (folder, dtype)
        # The converted checkpoint keeps the tokenizer files: same prompt ids as the folder.
        assert main(["generate", "--checkpoint", str(folder), "--prompt", "Grüße", "--max-new-tokens", "1",
                     "--json"]) == 0
        (r,) = json.loads(capsys.readouterr().out)
        assert r["prompt_ids"][0] == BOS and r["text"].startswith("<s>Grüße")


def test_a_chat_template_that_refuses_is_a_one_line_error(bare, tmp_path, capsys, monkeypatch):
    """Templates call raise_exception for messages they do not take (Mistral's and Gemma's refuse
    a system message): one line naming the folder, exit 2, no traceback."""
    folder = tmp_path / "strict"
    shutil.copytree(bare, folder)
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}"
              "{{ raise_exception('System role not supported') }}{% endif %}"
              "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
              "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    save_tokenizer(folder, chat_template=strict)
    argv = ["generate", "--checkpoint", str(folder), "--chat", "--system", "Be terse", "--prompt", "hi"]
    assert main(argv) == 2
    line = _error(capsys)
    assert f"{folder}: the chat template refused the messages: System role not supported" in line
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert main(["chat", "--checkpoint", str(folder), "--system", "Be terse", "--max-new-tokens", "2"]) == 2
    assert "the chat template refused the messages" in _error(capsys)
