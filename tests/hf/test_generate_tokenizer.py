"""`moekit generate` and `moekit chat` on Hugging Face folders with a real tokenizer and chat
template, token for token against transformers, for every decoder family from_hf loads.

Each family's tiny random model is saved with a byte-level BPE trained on the standard library
(tests/hf/_hf_tokenizer.py). Greedy decoding stops at the tokenizer's eos (<|im_end|>), as
transformers' generate does from generation_config.json. Prompts of different lengths run as one
left-padded batch on both sides.
"""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from _hf_cases import build  # noqa: E402
from _hf_tokenizer import BOS, IM_END, PAD, VOCAB  # noqa: E402

from moekit.cli import main  # noqa: E402

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama", "qwen2"]
PROMPTS = ["def main(", "Grüße aus 日本 🙂", "import os\nimport sys\n\n\nclass Parser:\n    def"]
N = 10  # new tokens
CTX = 128
TURNS = ["Hello there", "What is a shlex token?"]
SYSTEM = "Answer in one line."


@pytest.fixture(scope="module")
def saved(tmp_path_factory, hf_tokenizer_folder):
    """name -> (transformers model, its tokenizer, the folder holding both); built once per module."""
    cache = {}

    def get(name):
        if name not in cache:
            hf, _ = build(name, vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=IM_END,
                          max_position_embeddings=CTX)
            folder = tmp_path_factory.mktemp(name)
            hf.save_pretrained(folder)
            for f in hf_tokenizer_folder.iterdir():
                shutil.copy(f, folder / f.name)
            tok = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
            cache[name] = (hf, tok, folder)
        return cache[name]

    return get


def _until_eos(ids: list[int], eos=(IM_END,)) -> list[int]:
    cut = next((j for j, t in enumerate(ids) if t in eos), None)
    return ids if cut is None else ids[: cut + 1]


def _hf_greedy(hf, ids: list[int], eos=(IM_END,)) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=N, do_sample=False, eos_token_id=list(eos), pad_token_id=PAD)
    return _until_eos(out[0, len(ids):].tolist(), eos)


def _cli_json(capsys, argv) -> list[dict]:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_matches_transformers(name, saved, capsys):
    """CLI (--json, a left-padded batch) and library path (one prompt at a time): the prompt ids are
    the tokenizer's (bos included), the new ids transformers' greedy ones, the text its decode."""
    from moekit.hf import from_hf
    from moekit.tokenizer import load_hf_tokenizer

    hf, tok, folder = saved(name)
    argv = ["generate", "--checkpoint", str(folder), "--max-new-tokens", str(N), "--json"]
    got = _cli_json(capsys, argv + [a for p in PROMPTS for a in ("--prompt", p)])

    enc = tok(PROMPTS, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        want = hf.generate(**enc, max_new_tokens=N, do_sample=False)
    width = enc.input_ids.shape[1]
    for i, r in enumerate(got):
        ids = tok(PROMPTS[i])["input_ids"]
        assert ids[0] == BOS and r["prompt_ids"] == ids
        new = _until_eos(want[i, width:].tolist())
        assert r["new_ids"] == new, f"{name}: prompt {i}"
        assert r["text"] == tok.decode(ids + new)
        assert r["new_text"] == tok.decode(new, skip_special_tokens=True)

    ours, ours_tok = from_hf(folder), load_hf_tokenizer(folder)
    assert ours_tok.eos_token_ids == (IM_END,)
    for text in PROMPTS[:2]:
        ids = ours_tok.encode_text(text)
        out = ours.generate([ids], max_new_tokens=N, stop_tokens=ours_tok.eos_token_ids)
        assert _until_eos(out[0, len(ids):].tolist()) == _hf_greedy(hf, ids), f"{name}: {text!r}"


@pytest.mark.parametrize("name", FAMILIES)
def test_chat_matches_transformers(name, saved, capsys, monkeypatch):
    """`generate --chat` prompts are apply_chat_template(add_generation_prompt=True); `moekit chat`
    with piped stdin replies, turn after turn, what transformers' greedy generate replies to the
    same templated conversation, and streams exactly that text."""
    hf, tok, folder = saved(name)
    argv = ["--checkpoint", str(folder), "--max-new-tokens", str(N), "--system", SYSTEM]

    (r,) = _cli_json(capsys, ["generate", "--chat", "--prompt", TURNS[0], "--json", *argv])
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r["prompt_ids"] == ids and r["new_ids"] == _hf_greedy(hf, ids)

    # transformers, turn by turn: the reply's text (special tokens skipped) joins the history.
    want, history = [], [{"role": "system", "content": SYSTEM}]
    for text in TURNS:
        history.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(history, add_generation_prompt=True, tokenize=True, return_dict=False)
        reply = _hf_greedy(hf, ids)
        answer = tok.decode(reply, skip_special_tokens=True)
        want.append({"prompt_ids": ids, "reply_ids": reply, "text": answer})
        history.append({"role": "assistant", "content": answer})

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TURNS) + "\n"))
    assert main(["chat", "--json", *argv]) == 0
    got = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert got == want, name

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TURNS) + "\n/exit\nnever read\n"))
    assert main(["chat", *argv]) == 0
    assert capsys.readouterr().out == "".join(w["text"] + "\n" for w in want)


def test_generation_stops_at_eos_from_generation_config(saved, capsys, monkeypatch, tmp_path):
    """The default stop tokens are generation_config.json's eos_token_id (here a list naming a token
    the model emits early), as in transformers; --ignore-eos runs to --max-new-tokens."""
    hf, tok, folder = saved("llama")
    ids = tok(PROMPTS[0])["input_ids"]
    with torch.no_grad():
        free = hf.generate(torch.tensor([ids]), max_new_tokens=N, do_sample=False, eos_token_id=None)
    stop = int(free[0, len(ids) + 3])
    eos = [IM_END, stop]
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    gen = json.loads((copy / "generation_config.json").read_text())
    (copy / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": eos}))

    argv = ["generate", "--checkpoint", str(copy), "--prompt", PROMPTS[0], "--max-new-tokens", str(N), "--json"]
    (r,) = _cli_json(capsys, argv)
    assert r["new_ids"] == _hf_greedy(hf, ids, eos) and r["new_ids"][-1] == stop and len(r["new_ids"]) <= 4
    (r,) = _cli_json(capsys, [*argv, "--ignore-eos"])
    assert r["new_ids"] == free[0, len(ids):].tolist()


def test_stream_decoder_keeps_multibyte_characters_whole(hf_tokenizer_folder):
    """Pieces pushed one id at a time never hold a broken character and join to decode(all)."""
    from moekit.tokenizer import ByteTokenizer, StreamDecoder, load_hf_tokenizer

    text = "Grüße aus 日本 🙂 — naïve café"
    for tok in (load_hf_tokenizer(hf_tokenizer_folder), ByteTokenizer()):
        ids = tok.encode(text.encode("utf-8")).tolist()
        dec = StreamDecoder(tok)
        pieces = [dec.push([i]) for i in ids] + [dec.flush()]
        assert not any("\ufffd" in p for p in pieces), pieces
        assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
        assert len([p for p in pieces if p]) > 5  # it streams, not one piece at the end
