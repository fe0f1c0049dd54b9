"""Train / validation / test split by file, and the test split's isolation (issue 18)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from moekit.train.config import DataConfig, EvalConfig
from moekit.train.data import MAX_TEST_SHARE, LMData, collect_corpus, split_files
from moekit.train.testeval import all_windows


def _old_split(cfg: DataConfig, files):
    """The train/validation assignment as it was before the test split (commit 928417f), copied
    here so the test does not depend on the code it checks."""
    def unit(text):
        return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12

    if len(files) == 1:
        rel, content = files[0]
        cut = max(1, int(len(content) * (1 - cfg.val_fraction)))
        return [(rel, content[:cut])], [(rel + "#tail", content[cut:])]
    units = [unit(rel) for rel, _ in files]
    val_mask = [u < cfg.val_fraction for u in units]
    if not any(val_mask):
        val_mask[int(np.argmin(units))] = True
    if all(val_mask):
        val_mask[int(np.argmax(units))] = False
    return ([f for f, v in zip(files, val_mask, strict=True) if not v],
            [f for f, v in zip(files, val_mask, strict=True) if v])


def _names(files):
    return [n for n, _ in files]


@pytest.fixture(scope="module")
def stdlib():
    return collect_corpus(DataConfig())  # the default corpus, whole (12 MB on CPython 3.11)


def test_splits_are_disjoint_deterministic_and_cover_the_corpus(stdlib):
    again = collect_corpus(DataConfig())
    train, val, test = (set(_names(f)) for f in (stdlib.train_files, stdlib.val_files, stdlib.test_files))
    assert train and val and test
    assert not train & val and not train & test and not val & test
    assert (_names(again.train_files), _names(again.val_files), _names(again.test_files)) == (
        _names(stdlib.train_files), _names(stdlib.val_files), _names(stdlib.test_files))
    info = stdlib.info
    assert info["train_bytes"] + info["val_bytes"] + info["test_bytes"] == info["bytes"]
    assert info["train_files"] + info["val_files"] + info["test_files"] == info["files"]


def test_validation_files_are_those_chosen_before_the_test_split(stdlib, tmp_path):
    files = stdlib.train_files + stdlib.val_files + stdlib.test_files
    files.sort()
    cfg = DataConfig()
    old_train, old_val = _old_split(cfg, files)
    assert _names(stdlib.val_files) == _names(old_val)
    assert set(_names(stdlib.train_files)) | set(_names(stdlib.test_files)) == set(_names(old_train))
    # other fractions and the fallbacks of tiny corpora (the smallest/largest hash) as well
    for val_fraction in (0.01, 0.2, 0.5):
        c = DataConfig(val_fraction=val_fraction, test_fraction=0.3)
        assert _names(split_files(c, files)[1]) == _names(_old_split(c, files)[1])
    for few in (files[:2], files[:3], files[100:104]):
        assert _names(split_files(cfg, few)[1]) == _names(_old_split(cfg, few)[1])
    # one file: the validation tail is the same bytes as before; test comes just before it
    one = [("a.txt", bytes(range(256)) * 40)]
    train, val, test = split_files(cfg, one)
    assert val == _old_split(cfg, one)[1]
    assert train[0][1] + test[0][1] + val[0][1] == one[0][1]
    assert 0 < len(test[0][1]) <= MAX_TEST_SHARE * (len(one[0][1]) - len(val[0][1])) + 1


def test_test_split_holds_a_megabyte_of_the_default_corpus_and_a_quarter_at_most_of_small_ones(stdlib):
    nonval = stdlib.info["bytes"] - stdlib.info["val_bytes"]
    assert 1_000_000 <= stdlib.info["test_bytes"] <= MAX_TEST_SHARE * nonval
    small = collect_corpus(DataConfig(max_bytes=300_000))
    small_nonval = small.info["bytes"] - small.info["val_bytes"]
    assert 0 < small.info["test_bytes"] <= MAX_TEST_SHARE * small_nonval
    assert small.info["train_bytes"] >= 0.75 * small_nonval
    # test_fraction alone (no minimum): about that share of the files, by the second hash
    share = collect_corpus(DataConfig(test_fraction=0.2, test_min_bytes=0))
    n_rest = share.info["files"] - share.info["val_files"]
    assert 0.15 * n_rest < share.info["test_files"] < 0.25 * n_rest
    none = split_files(DataConfig(test_fraction=0.0, test_min_bytes=0), stdlib.train_files[:20])
    assert none[2] == [] and len(none[0]) + len(none[1]) == 20


def test_two_files_split_the_remaining_file_by_position(tmp_path):
    files = [("a.py", b"a" * 1000), ("b.py", b"b" * 3000)]
    train, val, test = split_files(DataConfig(), files)
    assert len(val) == 1 and len(train) == 1 and len(test) == 1
    assert test[0][0] == train[0][0] + "#test" and train[0][1] + test[0][1] in (b"a" * 1000, b"b" * 3000)


def test_new_fields_are_validated_with_their_names():
    with pytest.raises(ValueError, match=r"data.test_fraction must be in \[0, 0.5\], got 0.7"):
        DataConfig(test_fraction=0.7)
    with pytest.raises(ValueError, match=r"data.test_min_bytes must be >= 0"):
        DataConfig(test_min_bytes=-1)
    with pytest.raises(TypeError, match="eval.test must be True or False"):
        EvalConfig(test="yes")


def test_windows_score_every_token_once():
    tokens = torch.arange(23, dtype=torch.uint8)
    batches = list(all_windows(tokens, seq_len=5, batch_size=2))
    assert [tuple(x.shape) for x, _ in batches] == [(2, 5), (2, 5), (1, 2)]
    targets = torch.cat([y.flatten() for _, y in batches])
    assert torch.equal(targets, tokens[1:].long())
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    exact = list(all_windows(torch.arange(11), seq_len=5, batch_size=4))  # 10 targets, no short tail
    assert [tuple(x.shape) for x, _ in exact] == [(2, 5)]


def test_nothing_but_the_test_evaluation_reads_the_test_split(tmp_path, small_data, monkeypatch):
    """Loading data, batches, validation and a whole run with eval.test=false never encode the test
    split; with eval.test on, the test evaluation reads it exactly once."""
    from trainkit import small_run

    from moekit.train.loop import train

    data = LMData(small_data.cfg, small_data.corpus, small_data.tokenizer, small_data.seed)
    data.train_batch(0, 0, 1)
    data.val_batches(2)
    assert data._test_tokens is None and "test_tokens" not in data.info
    calls = []
    original = LMData.test_tokens
    monkeypatch.setattr(LMData, "test_tokens", lambda self: calls.append(1) or original(self))
    train(small_run("schedule.steps=2", "eval.test=false"), tmp_path / "off", data=data)
    assert calls == []
    result = train(small_run("schedule.steps=2"), tmp_path / "on", data=data)
    assert calls == [1] and result.test["test_bytes"] == len(data.test_tokens()) - 1
