"""Corpus collection, file split, tokenizers, and the step-addressed sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moekit.train.config import DataConfig
from moekit.train.data import ByteTokenizer, LMData, bits_per_byte, collect_corpus, is_test_path


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    cfg = DataConfig(max_bytes=300_000)
    a, b = collect_corpus(cfg), collect_corpus(cfg)
    assert a.info["sha256"] == b.info["sha256"] and a.info["bytes"] >= 300_000
    train_names = {n for n, _ in a.train_files}
    val_names = {n for n, _ in a.val_files}
    assert train_names and val_names and not train_names & val_names
    names = [n for n, _ in a.train_files + a.val_files + a.test_files]
    assert not any(is_test_path(tuple(n.split("/"))) for n in names)
    assert all(n.endswith(".py") for n in names)
    assert a.info["train_bytes"] + a.info["val_bytes"] + a.info["test_bytes"] == a.info["bytes"]


def test_test_paths_are_recognised():
    assert is_test_path(("test", "test_os.py"))
    assert is_test_path(("idlelib", "idle_test", "x.py"))
    assert is_test_path(("foo_test.py",))
    assert not is_test_path(("unittest", "case.py"))


def test_custom_path_single_file_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("other text\n" * 200)
    single = collect_corpus(DataConfig(path=str(tmp_path / "a.txt"), val_fraction=0.1))
    assert single.info["files"] == 1 and single.val_files and single.train_files and single.test_files
    assert single.info["val_bytes"] == pytest.approx(0.1 * single.info["bytes"], abs=2)
    many = collect_corpus(DataConfig(path=str(tmp_path), include="*.txt"))
    assert many.info["files"] == 2 and len(many.val_files) == 1 and len(many.train_files) == 1
    assert many.test_files[0][0] == many.train_files[0][0] + "#test"  # the other file's tail
    with pytest.raises(FileNotFoundError, match="data.path"):
        collect_corpus(DataConfig(path=str(tmp_path / "missing")))
    with pytest.raises(ValueError, match="no non-empty files"):
        collect_corpus(DataConfig(path=str(tmp_path), include="*.md"))


def test_batches_are_a_pure_function_of_step(small_data):
    x1, y1 = small_data.train_batch(5, 1, 2)
    small_data.train_batch(0, 0, 1)  # touching other steps must not change step 5
    x2, y2 = small_data.train_batch(5, 1, 2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the next tokens
    fresh = LMData(small_data.cfg, small_data.corpus, small_data.tokenizer, small_data.seed)
    assert torch.equal(fresh.train_batch(5, 1, 2)[0], x1)
    other_seed = LMData(small_data.cfg, small_data.corpus, small_data.tokenizer, seed=1)
    assert not torch.equal(other_seed.train_batch(5, 1, 2)[0], x1)


def test_ranks_split_each_global_batch_like_accumulation(small_data):
    """Rank r of 2 (no accumulation) reads what micro-batch r reads on one process with 2 micro-batches."""
    for step in (0, 3):
        for r in range(2):
            assert torch.equal(small_data.train_batch(step, 0, 1, rank=r, world=2)[0],
                               small_data.train_batch(step, r, 2)[0])
    r0 = small_data.train_batch(0, 0, 1, rank=0, world=2)[0]
    r1 = small_data.train_batch(0, 0, 1, rank=1, world=2)[0]
    assert not torch.equal(r0, r1)


def test_one_epoch_visits_every_window_once(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(256)) * 8)
    cfg = DataConfig(path=str(tmp_path / "a.txt"), seq_len=16, batch_size=4, val_fraction=0.2)
    data = LMData.from_config(cfg, seed=0)
    n = data.num_train_windows
    starts = []
    for step in range(math.ceil(n / 4)):
        x, _ = data.train_batch(step, 0, 1)
        starts.extend(x[:, 0].tolist())
    first_epoch = starts[:n]
    expected = [int(data.train_tokens[i * 16]) for i in range(n)]
    assert sorted(first_epoch) == sorted(expected)


def test_validation_windows_are_fixed(small_data):
    a = small_data.val_batches(2)
    b = small_data.val_batches(2)
    assert len(a) == 2 and all(torch.equal(x, y) for (x, _), (y, _) in zip(a, b, strict=True))


def test_bits_per_byte_for_bytes_is_nats_over_ln2():
    assert bits_per_byte(math.log(2) * 10, 10) == pytest.approx(1.0)
    assert np.all(ByteTokenizer().token_bytes() == 1)


def test_bpe_tokenizer_counts_bytes_exactly(tmp_path):
    pytest.importorskip("tokenizers")
    text = "def foo(bar):\n    return bar + 1  # comment é\n" * 300
    (tmp_path / "a.py").write_text(text[: len(text) // 2])
    (tmp_path / "b.py").write_text(text[len(text) // 2:])
    cfg = DataConfig(path=str(tmp_path), tokenizer="bpe", bpe_vocab_size=300, seq_len=8, batch_size=2,
                     val_fraction=0.4)
    data = LMData.from_config(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert data.tokenizer.vocab_size <= 300 and data.train_tokens.dtype == torch.int32
    # The byte lengths of the tokens of a file add up to the file's byte length.
    content = data.corpus.train_files[0][1]
    ids = data.tokenizer.encode(content)
    assert int(data.token_bytes[torch.from_numpy(ids)].sum()) == len(content)
    assert data.tokenizer.decode(ids) == content.decode()
    assert list((tmp_path / "cache").glob("bpe-300-*.json"))  # trained once, cached


def test_bpe_refuses_data_that_is_not_utf8_and_bytes_stay_lossless(tmp_path):
    """BPE decodes text: a non-UTF-8 byte used to become U+FFFD, and bits per byte was measured on
    other bytes than the data's. Refused, naming the file and the byte offset; the byte tokenizer
    takes the same files exactly."""
    pytest.importorskip("tokenizers")
    (tmp_path / "a.py").write_text("x = 1\n" * 400)
    (tmp_path / "b.py").write_bytes("café = 2\n".encode("latin-1") * 400)  # é is 0xe9, alone
    with pytest.raises(ValueError, match=rf"data: {tmp_path / 'b.py'} is not UTF-8 text \(byte offset 3: "
                                         r"b'\\xe9 = ' *\).*data.tokenizer=byte"):
        collect_corpus(DataConfig(path=str(tmp_path), tokenizer="bpe"))
    cfg = DataConfig(path=str(tmp_path), tokenizer="byte", seq_len=8, batch_size=2, val_fraction=0.5)
    data = LMData.from_config(cfg, seed=0)
    files = data.corpus.train_files + data.corpus.val_files
    assert any(content.startswith(b"caf\xe9") for _, content in files)
    streams = bytes(data.train_tokens.tolist()) + bytes(data.val_tokens.tolist())
    assert streams == b"".join(c for _, c in data.corpus.train_files) + b"".join(c for _, c in data.corpus.val_files)
    from moekit.tokenizer import BPETokenizer

    tok = BPETokenizer.train(["x = 1\n" * 50], 260)
    with pytest.raises(ValueError, match="not UTF-8 at byte offset 3.*byte tokenizer"):
        tok.encode(b"caf\xe9")


def test_the_default_corpus_is_utf8_so_bpe_accepts_it():
    """The Python stdlib source (tests excluded) passes the UTF-8 check. (With data.exclude_tests=false
    it does not: test/encoded_modules/ holds Latin-1 and KOI8-R modules on purpose.)"""
    corpus = collect_corpus(DataConfig(tokenizer="bpe"))
    assert corpus.info["files"] > 100


def test_only_the_writing_rank_caches_the_bpe(tmp_path):
    pytest.importorskip("tokenizers")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.py").write_text("def f(x):\n    return x\n" * 200)
    cfg = DataConfig(path=str(tmp_path / "data"), tokenizer="bpe", bpe_vocab_size=280, seq_len=8, batch_size=2)
    LMData.from_config(cfg, seed=0, cache_dir=tmp_path / "cache", write_cache=False)
    assert not (tmp_path / "cache").exists()
    a = LMData.from_config(cfg, seed=0, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [f"bpe-280-{a.corpus.info['sha256'][:16]}.json"]
    b = LMData.from_config(cfg, seed=0, cache_dir=tmp_path / "cache", write_cache=False)  # reads it
    assert torch.equal(a.train_tokens, b.train_tokens)
