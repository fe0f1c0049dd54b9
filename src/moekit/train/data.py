"""Training data: a deterministic text corpus, a tokenizer, and step-addressed batches.

Shape legend: B sequences per micro-batch, L tokens per sequence.

Default corpus: the Python standard library's own `.py` source of the running interpreter (it
ships with every Python, so no download). Files are collected in sorted path order, tests
excluded, and split into train, validation and test *by file* (hashes of the relative path
decide), so no held-out file is ever partly seen in training. Validation is chosen exactly as
before the test split existed (SHA-256 of the path below val_fraction), so validation numbers of
earlier runs stay comparable; a second, independent hash ("test:" + path) then picks the test
files among the rest (`split_files`). The test split is read only by the final test evaluation
(testeval.py).

Batches are a pure function of (seed, step, micro-batch, rank): sample number f of the run is
window perm_epoch[f mod n] of the train stream, where perm_epoch is a permutation seeded by
(seed, epoch). Resuming at step N therefore needs no sampler state to reproduce the data order,
and ranks take disjoint interleaved slices of each global batch (what DistributedSampler does).
"""

from __future__ import annotations

import copy
import hashlib
import math
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer  # noqa: F401  (re-exported)
from moekit.train.config import DataConfig

# Folders never part of a corpus: installed third-party packages and bytecode caches.
ALWAYS_SKIPPED = {"site-packages", "dist-packages", "__pycache__"}
TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_test_path(parts: tuple[str, ...]) -> bool:
    name = parts[-1]
    return any(p in TEST_DIRS for p in parts[:-1]) or name.startswith("test_") or name.endswith("_test.py")


def _hash_unit(text: str) -> float:
    """A stable number in [0, 1) from a path (not Python's salted hash())."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16) / 16**12


# The test split grows past data.test_fraction toward data.test_min_bytes only while it holds at
# most this share of the non-validation bytes, so a small corpus keeps most of its text for training.
MAX_TEST_SHARE = 0.25


@dataclass
class Corpus:
    root: str
    train_files: list[tuple[str, bytes]]  # (relative path, content)
    val_files: list[tuple[str, bytes]]
    info: dict = field(default_factory=dict)  # size, hash, source: recorded in run metadata
    test_files: list[tuple[str, bytes]] = field(default_factory=list)  # only the final test evaluation reads these


def _test_bytes_wanted(cfg: DataConfig, available: int) -> int:
    """Bytes the test split aims at when the share of files falls short: data.test_min_bytes,
    capped at MAX_TEST_SHARE of the `available` (non-validation) bytes."""
    return min(cfg.test_min_bytes, int(MAX_TEST_SHARE * available))


def _test_tail(cfg: DataConfig, size: int) -> int:
    """Bytes of a training file's tail held out for test when files cannot be split by file:
    test_fraction of them, or more toward test_min_bytes (within MAX_TEST_SHARE); at least one
    byte, and at least one byte left for training."""
    if size < 2:
        return 0
    n_test = max(math.ceil(cfg.test_fraction * size), _test_bytes_wanted(cfg, size))
    return min(max(n_test, 1), size - 1)


def split_files(cfg: DataConfig, files: list[tuple[str, bytes]]):
    """(train, validation, test) lists of (relative path, content).

    Validation: the files whose SHA-256 unit of the path is below val_fraction (unchanged since
    before the test split existed). Test, among the other files: those whose unit of "test:" +
    path is below test_fraction, then further files in that order (skipping any that would take
    the split past MAX_TEST_SHARE of the non-validation bytes) until it holds test_min_bytes.
    A corpus of one file is split by position instead: train | test | validation, validation
    being the same tail as before."""
    want_test = cfg.test_fraction > 0 or cfg.test_min_bytes > 0
    if len(files) == 1:
        # One file cannot be split by file: hold out its tail for validation, and the bytes just
        # before it for test.
        rel, content = files[0]
        cut = max(1, int(len(content) * (1 - cfg.val_fraction)))
        n_test = _test_tail(cfg, cut) if want_test else 0
        train = [(rel, content[: cut - n_test])]
        test = [(rel + "#test", content[cut - n_test : cut])] if n_test else []
        return train, [(rel + "#tail", content[cut:])], test
    units = [_hash_unit(rel) for rel, _ in files]
    val_mask = [u < cfg.val_fraction for u in units]
    if not any(val_mask):  # tiny corpora: hold out the file with the smallest hash
        val_mask[int(np.argmin(units))] = True
    if all(val_mask):
        val_mask[int(np.argmax(units))] = False
    val = [f for f, v in zip(files, val_mask, strict=True) if v]
    rest = [f for f, v in zip(files, val_mask, strict=True) if not v]
    test_names: set[str] = set()
    if want_test and len(rest) == 1:  # one file left for training: its tail is the test split
        (rel, content), = rest
        n_test = _test_tail(cfg, len(content))
        train = [(rel, content[: len(content) - n_test])]
        return train, val, [(rel + "#test", content[len(content) - n_test :])] if n_test else []
    if want_test and len(rest) > 1:
        order = sorted(rest, key=lambda f: _hash_unit("test:" + f[0]))
        test_names = {rel for rel, _ in order if _hash_unit("test:" + rel) < cfg.test_fraction}
        available = sum(len(c) for _, c in rest)
        target, cap = _test_bytes_wanted(cfg, available), int(MAX_TEST_SHARE * available)
        held = sum(len(c) for rel, c in rest if rel in test_names)
        for rel, content in order:
            if held >= target:
                break
            if rel not in test_names and held + len(content) <= cap:
                test_names.add(rel)
                held += len(content)
        if not test_names:  # tiny corpora: the file with the smallest test hash
            test_names.add(order[0][0])
        if len(test_names) == len(rest):  # keep at least one file for training
            test_names.discard(order[-1][0])
    train = [f for f in rest if f[0] not in test_names]
    test = [f for f in rest if f[0] in test_names]
    return train, val, test


def _check_utf8(files: list[tuple[str, bytes]], base: Path) -> None:
    """The BPE tokenizer works on text: a file that is not UTF-8 would reach it altered (each bad
    byte replaced by U+FFFD), and bits per byte would be measured on other bytes. Refuse instead."""
    bad = []
    for rel, content in files:
        try:
            content.decode("utf-8")
        except UnicodeDecodeError as err:
            bad.append((rel, err.start, content[err.start : err.start + 4]))
    if bad:
        rel, offset, head = bad[0]
        more = f" (and {len(bad) - 1} more files)" if len(bad) > 1 else ""
        raise ValueError(
            f"data: {base / rel} is not UTF-8 text (byte offset {offset}: {head!r}){more}; data.tokenizer=bpe "
            f"needs UTF-8: use data.tokenizer=byte (lossless on any bytes) or leave the file out"
        )


def collect_corpus(cfg: DataConfig) -> Corpus:
    """Read the files named by `cfg`, deterministically, and split them by file."""
    if cfg.path is None:
        root, source = stdlib_root(), f"python-stdlib-{sys.version_info.major}.{sys.version_info.minor}"
        pattern = "*.py"
    else:
        root, source, pattern = Path(cfg.path).expanduser(), "path", cfg.include
        if not root.exists():
            raise FileNotFoundError(f"data.path: {root} does not exist")
    if root.is_file():
        paths, base = [root], root.parent
    else:
        base = root
        paths = []
        for p in sorted(root.rglob(pattern)):
            rel = p.relative_to(root).parts
            if not p.is_file() or any(part in ALWAYS_SKIPPED for part in rel):
                continue
            if cfg.exclude_tests and is_test_path(rel):
                continue
            paths.append(p)
    files: list[tuple[str, bytes]] = []
    total = 0
    for p in paths:
        if cfg.max_bytes is not None and total >= cfg.max_bytes:
            break
        try:
            content = p.read_bytes()
        except OSError as err:
            raise ValueError(
                f"data.path: cannot read {p} ({err.strerror or err}); make it readable, or leave it out "
                f"(data.path, data.include)"
            ) from None
        if not content:
            continue
        files.append((p.relative_to(base).as_posix(), content))
        total += len(content)
    if not files:
        raise ValueError(f"data: no non-empty files matching {pattern!r} under {root}")
    if cfg.tokenizer == "bpe":
        _check_utf8(files, base)
    digest = hashlib.sha256()
    for rel, content in files:
        digest.update(rel.encode() + b"\0" + content + b"\0")
    train, val, test = split_files(cfg, files)
    info = {
        "source": source,
        "root": str(root),
        "include": pattern,
        "files": len(files),
        "bytes": total,
        "train_files": len(train),
        "train_bytes": sum(len(c) for _, c in train),
        "val_files": len(val),
        "val_bytes": sum(len(c) for _, c in val),
        "test_files": len(test),
        "test_bytes": sum(len(c) for _, c in test),
        "sha256": digest.hexdigest(),
    }
    return Corpus(str(root), train, val, info, test)


# ----------------------------------------------------------------------------- tokenizers


def build_tokenizer(cfg: DataConfig, corpus: Corpus, cache_dir: Path | None = None, write_cache: bool = True):
    """The run's tokenizer; a BPE is trained once per (vocabulary size, corpus) and cached in
    `cache_dir` (written atomically, and only when `write_cache`: under torchrun only rank 0 writes)."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    key = f"bpe-{cfg.bpe_vocab_size}-{corpus.info['sha256'][:16]}.json"
    cached = Path(cache_dir) / key if cache_dir is not None else None
    if cached is not None and cached.exists():
        return BPETokenizer.load(cached)
    tok = BPETokenizer.train([BPETokenizer._text(c) for _, c in corpus.train_files], cfg.bpe_vocab_size)
    if cached is not None and write_cache:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tok.write(cached)
    return tok


# ----------------------------------------------------------------------------- batches


def _encode_files(tokenizer, files: list[tuple[str, bytes]]) -> Tensor:
    parts = [tokenizer.encode(content) for _, content in files]
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    dtype = torch.uint8 if tokenizer.vocab_size <= 256 else torch.int32
    return torch.from_numpy(ids).to(dtype)


class StepSampler:
    """The step-addressed batch order LMData and the fine-tuning data share: sample f of the run
    is window perm_epoch[f mod n], perm_epoch a permutation seeded by (seed, epoch). A subclass
    sets `cfg` (seq_len, batch_size), `seed` and `num_train_windows`."""

    cfg: DataConfig
    seed: int
    num_train_windows: int
    _perm_epoch: int = -1
    _perm: np.ndarray | None = None

    def with_seed(self, seed: int):
        """The same data with another seed's batch order (no re-encoding)."""
        other = copy.copy(self)
        other.seed, other._perm_epoch, other._perm = seed, -1, None
        return other

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, epoch, 0x5EED])
            self._perm = rng.permutation(self.num_train_windows)
            self._perm_epoch = epoch
        return self._perm

    def train_window_indices(self, step: int, micro: int, grad_accum: int, rank: int = 0, world: int = 1) -> list[int]:
        """The train windows of one micro-batch of one rank, in order."""
        bsz = self.cfg.batch_size
        global_batch = bsz * grad_accum * world
        first = step * global_batch + (micro * world + rank) * bsz
        out = []
        for f in range(first, first + bsz):
            epoch, pos = divmod(f, self.num_train_windows)
            out.append(int(self._permutation(epoch)[pos]))
        return out

    def epoch_of_step(self, step: int, grad_accum: int, world: int = 1) -> float:
        return step * self.cfg.batch_size * grad_accum * world / self.num_train_windows

    def val_window_indices(self, num_batches: int, num_val_windows: int) -> list[int]:
        """Fixed, evenly spaced validation windows: the same for every model and every eval."""
        count = min(num_batches * self.cfg.batch_size, num_val_windows)
        return [int(i) for i in np.unique(np.linspace(0, num_val_windows - 1, count).round().astype(np.int64))]


class LMData(StepSampler):
    """Token streams plus the step-addressed sampler and the fixed validation windows."""

    def __init__(self, cfg: DataConfig, corpus: Corpus, tokenizer, seed: int):
        self.cfg, self.corpus, self.tokenizer, self.seed = cfg, corpus, tokenizer, seed
        self.train_tokens = _encode_files(tokenizer, corpus.train_files)
        self.val_tokens = _encode_files(tokenizer, corpus.val_files)
        self.token_bytes = torch.from_numpy(tokenizer.token_bytes())
        seq = cfg.seq_len
        self.num_train_windows = (len(self.train_tokens) - 1) // seq
        self.num_val_windows = (len(self.val_tokens) - 1) // seq
        if self.num_train_windows < 1:
            raise ValueError(
                f"data: the training split has {len(self.train_tokens)} tokens, fewer than data.seq_len+1="
                f"{seq + 1}; use more data or a shorter data.seq_len"
            )
        if self.num_val_windows < 1:
            raise ValueError(
                f"data: the validation split has {len(self.val_tokens)} tokens, fewer than data.seq_len+1="
                f"{seq + 1}; raise data.val_fraction or shorten data.seq_len"
            )
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        self._test_tokens: Tensor | None = None  # encoded on first use: only the final test evaluation

    def test_tokens(self) -> Tensor:
        """The test split's token stream. Only the final test evaluation (testeval.py) calls this:
        nothing in training, validation or any choice may read the test split."""
        if self._test_tokens is None:
            self._test_tokens = _encode_files(self.tokenizer, self.corpus.test_files)
        return self._test_tokens

    def test_batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor]] | None:
        """Batches scoring every token of the test split once (testeval.py), or None without one."""
        tokens = self.test_tokens()
        return all_windows(tokens, self.cfg.seq_len, batch_size) if len(tokens) >= 2 else None

    def test_info(self) -> dict:
        """What the test record says about the split besides its tokens and bytes."""
        return {"test_files": len(self.corpus.test_files)}

    @classmethod
    def from_config(cls, cfg: DataConfig, seed: int, cache_dir: Path | None = None,
                    write_cache: bool = True) -> LMData:
        corpus = collect_corpus(cfg)
        return cls(cfg, corpus, build_tokenizer(cfg, corpus, cache_dir, write_cache), seed)

    @property
    def info(self) -> dict:
        return {
            **self.corpus.info,
            "tokenizer": self.tokenizer.to_dict(),
            "train_tokens": len(self.train_tokens),
            "val_tokens": len(self.val_tokens),
            "train_windows": self.num_train_windows,
            "val_windows": self.num_val_windows,
        }

    def _window(self, tokens: Tensor, index: int) -> Tensor:
        seq = self.cfg.seq_len
        return tokens[index * seq : index * seq + seq + 1]

    def train_batch(
        self, step: int, micro: int, grad_accum: int, rank: int = 0, world: int = 1
    ) -> tuple[Tensor, Tensor]:
        """Inputs and next-token targets (B, L) for one micro-batch of one rank."""
        indices = self.train_window_indices(step, micro, grad_accum, rank, world)
        rows = [self._window(self.train_tokens, i) for i in indices]
        w_BL1 = torch.stack(rows).long()  # (B, L+1)
        return w_BL1[:, :-1].contiguous(), w_BL1[:, 1:].contiguous()

    def val_batches(self, num_batches: int) -> list[tuple[Tensor, Tensor]]:
        """Fixed, evenly spaced validation windows: the same for every model and every eval."""
        idx = self.val_window_indices(num_batches, self.num_val_windows)
        windows = torch.stack([self._window(self.val_tokens, i) for i in idx]).long()
        out = []
        for start in range(0, len(windows), self.cfg.batch_size):
            w = windows[start : start + self.cfg.batch_size]
            out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
        return out


def all_windows(tokens: Tensor, seq_len: int, batch_size: int) -> Iterator[tuple[Tensor, Tensor]]:
    """(inputs, targets) batches covering every target position 1..len(tokens)-1 once: full
    windows of `seq_len` in batches of `batch_size`, then the shorter last window on its own."""
    n_targets = len(tokens) - 1
    full = n_targets // seq_len
    for start in range(0, full, batch_size):
        rows = range(start, min(start + batch_size, full))
        w_BL1 = torch.stack([tokens[i * seq_len : i * seq_len + seq_len + 1] for i in rows]).long()  # (B, L+1)
        yield w_BL1[:, :-1], w_BL1[:, 1:]
    if n_targets % seq_len:
        w_1L1 = tokens[full * seq_len :].long()[None]  # (1, rest+1)
        yield w_1L1[:, :-1], w_1L1[:, 1:]


def bits_per_byte(nats_sum: float, num_bytes: int) -> float:
    """Cross-entropy in nats summed over tokens -> bits per byte of the text they cover."""
    return nats_sum / math.log(2) / max(num_bytes, 1)
