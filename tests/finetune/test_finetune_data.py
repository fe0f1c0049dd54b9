"""Fine-tuning data: JSONL errors naming FILE:LINE, the loss mask of each kind of example, packing
into windows, the split by content, and the step-addressed batch order the trainer resumes by."""

from __future__ import annotations

import json
import random

import pytest
import torch
from ftkit import pairs, small_run, write_jsonl

from moekit.finetune.data import FinetuneData, encode_example, pack, read_examples, split_examples
from moekit.tokenizer import ByteTokenizer, load_hf_tokenizer
from moekit.train.data import StepSampler
from moekit.train.steps import IGNORE


@pytest.mark.parametrize("line, expected", [
    ('{"text": "a"', "not valid JSON"),
    ('["text", "a"]', "a JSON list, not an object"),
    ('{"prompt": "a"}', "missing key 'response'"),
    ('{"text": "a", "label": 1}', "unknown key 'label'"),
    ('{"text": "a", "prompt": "b"}', "both 'text' and 'prompt'"),
    ('{"prompt": "a", "response": 3}', "'response' is a JSON number, not a string"),
    ('{"text": null}', "'text' is a JSON null, not a string"),
    ('{"text": ""}', "empty 'text'"),
    ('{"prompt": "a", "response": ""}', "empty 'response'"),
])
def test_a_bad_line_is_an_error_naming_file_and_line(tmp_path, line, expected):
    path = write_jsonl(tmp_path / "d.jsonl", ['{"text": "ok"}', "", line])
    with pytest.raises(ValueError, match="^" + str(path) + ":3: ") as err:
        read_examples(path)
    assert expected in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_a_file_without_examples_is_an_error(tmp_path, content):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=f"^{path}: no examples"):
        read_examples(path)


def test_prompt_longer_than_the_context_names_line_and_lengths_a_text_is_packed(tmp_path):
    tok = ByteTokenizer()
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "x" * 33, "response": "y"}])
    ex, = read_examples(path)
    with pytest.raises(ValueError, match=f"^{path}:1: the prompt is 33 tokens, longer than the context of 32 "):
        encode_example(tok, ex, 32, f"{path}:1")
    encode_example(tok, read_examples(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 32, "response": "y"}]))[0],
                   32, "p.jsonl:1")  # exactly the context fits
    text = read_examples(write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 40}]))[0]
    ids, trained = encode_example(tok, text, 32, "t.jsonl:1")  # longer than a window: cut across windows
    assert len(ids) == 40 and sum(trained) == 39
    packed = pack([encode_example(tok, text, 32, "t.jsonl:1")], 32, 0)
    assert packed.windows() == 2


def test_masks_bytes_train_the_response_and_all_but_the_first_text_token(tmp_path):
    tok = ByteTokenizer()
    pr, tx = read_examples(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "ab", "response": "cd"}, {"text": "xyz"}]))
    assert encode_example(tok, pr, 8, "") == ([97, 98, 99, 100], [False, False, True, True])
    assert encode_example(tok, tx, 8, "") == ([120, 121, 122], [False, True, True])


def test_masks_hf_tokenizer_bos_untrained_eos_trained(tmp_path, hf_tokenizer_folder):
    from _hf_tokenizer import BOS, IM_END

    tok = load_hf_tokenizer(hf_tokenizer_folder)
    pr, tx = read_examples(write_jsonl(tmp_path / "d.jsonl", [{"prompt": "def f(", "response": "x):"},
                                                             {"text": "import os"}]))
    p_ids = tok.encode_text("def f(")
    r_ids = tok.encode_text("x):", add_special_tokens=False)
    ids, trained = encode_example(tok, pr, 64, "")
    assert p_ids[0] == BOS and BOS not in r_ids
    assert ids == p_ids + r_ids + [IM_END]
    assert trained == [False] * len(p_ids) + [True] * (len(r_ids) + 1)
    ids, trained = encode_example(tok, tx, 64, "")
    assert ids == tok.encode_text("import os") + [IM_END] and trained == [False] + [True] * (len(ids) - 1)


def test_split_is_by_content_deterministic_and_refuses_empty_splits(tmp_path):
    rows = pairs(200) + [{"text": "the same line twice\n"}] * 2
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    train, val, test = split_examples(read_examples(path), 0.1, 0.1, str(path))
    assert (len(train), len(val), len(test)) == (166, 20, 16)  # pinned: the split must not move between versions
    shuffled = rows[:]
    random.Random(0).shuffle(shuffled)
    again = split_examples(read_examples(write_jsonl(tmp_path / "b.jsonl", shuffled)), 0.1, 0.1, "b")
    for a, b in zip((train, val, test), again, strict=True):
        assert sorted(e.key for e in a) == sorted(e.key for e in b)
    twice = [e for e in train + val + test if e.text == "the same line twice\n"]
    assert len({id(s) for s in (train, val, test) for e in s if e in twice}) == 1  # one split holds both
    few = read_examples(write_jsonl(tmp_path / "few.jsonl", pairs(4)))
    with pytest.raises(ValueError, match=r"few.jsonl: the validation split of its 4 examples is empty; raise "
                                         r"data.val_fraction \(now 0.1\) or add examples"):
        split_examples(few, 0.1, 0.1, str(tmp_path / "few.jsonl"))
    assert split_examples(read_examples(path), 0.1, 0.0, "a")[2] == []  # test_fraction 0: no test split


def _data(tmp_path, rows, *sets, seed=0) -> FinetuneData:
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = small_run(path, *sets)
    return FinetuneData(cfg.data, path, ByteTokenizer(), seed)


def test_windows_hold_every_trained_target_once_with_its_token(tmp_path):
    """All train windows of one epoch together: each trained target of the packed examples
    appears once, at its place, with the inputs before it; everything else is IGNORE."""
    data = _data(tmp_path, pairs())
    seq = data.cfg.seq_len
    train_keys = {e.key for e in split_examples(read_examples(data.path), 0.1, 0.1, "")[0]}
    encoded = [encode_example(data.tokenizer, ex, seq, "") for ex in read_examples(data.path) if ex.key in train_keys]
    packed = pack(encoded, seq, 0)  # prompt/response examples start a window where they would straddle one
    assert packed.tokens.numel() > sum(len(e) for e, _ in encoded)  # (this data does straddle)
    expected_ids, expected_trained = packed.tokens.tolist(), packed.trained.tolist()
    x_WL, y_WL = data._rows(data.train, list(range(data.num_train_windows)), seq)  # (W, L)
    assert x_WL.flatten().tolist() == expected_ids[:-1]
    want = [i if t else IGNORE for i, t in zip(expected_ids[1:], expected_trained[1:], strict=True)]
    assert y_WL.flatten().tolist() == want
    assert data.num_train_windows == packed.windows()
    assert int((y_WL != IGNORE).sum()) == sum(t for _, m in encoded for t in m[1:]) == data.info["train_trained_tokens"]


def test_batches_follow_the_lm_sampler_and_are_a_function_of_the_step(tmp_path):
    data = _data(tmp_path, pairs(), "optim.grad_accum=2")
    assert isinstance(data, StepSampler)
    x0, y0 = data.train_batch(5, 1, 2)
    fresh = _data(tmp_path, pairs(), "optim.grad_accum=2")
    x1, y1 = fresh.train_batch(5, 1, 2)  # no state: the same step gives the same batch
    assert torch.equal(x0, x1) and torch.equal(y0, y1)
    idx = data.train_window_indices(5, 1, 2)
    assert torch.equal(x0, data._rows(data.train, idx, data.cfg.seq_len)[0])
    assert data.with_seed(1).train_window_indices(5, 1, 2) != idx
    val = data.val_batches(100)  # more batches than windows: every validation window once
    assert sum(len(x) for x, _ in val) == data.num_val_windows
    assert sum(int((y != IGNORE).sum()) for _, y in val) == data.info["val_trained_tokens"]
    test = data.test_batches(4)
    assert sum(int((y != IGNORE).sum()) for _, y in test) == int(data._test.trained.sum())
    assert data.test_info() == {"test_examples": data._test.examples} and data._test.examples > 0
    assert json.dumps(data.info)  # recorded in run.json


def test_packing_keeps_each_response_in_the_window_of_its_prompt():
    seq = 8
    # 5 + 6 tokens: the second example would straddle the boundary at 8, so it starts there
    first = ([1, 2, 3, 4, 5], [False, False, True, True, True])
    second = ([6, 7, 8, 9, 10, 11], [False, False, False, True, True, True])
    packed = pack([first, second], seq, 0)
    tokens = packed.tokens.tolist()
    assert tokens[:8] == [1, 2, 3, 4, 5, 0, 0, 0] and tokens[8:14] == [6, 7, 8, 9, 10, 11]
    trained = packed.trained.tolist()
    for k in range(packed.windows()):  # every trained target's window starts at or before its example
        for p in range(k * seq + 1, k * seq + seq + 1):
            if trained[p]:
                example_start = 0 if p < 8 else 8
                assert k * seq <= example_start
    # texts are cut across windows as they come (no padding)
    text = ([1, 2, 3, 4, 5, 6], [False] + [True] * 5)
    assert pack([first, text], seq, 0).tokens.tolist()[:11] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5, 6]
