"""Tokenizers: one id per byte, or a byte-level BPE; and loading the one saved beside a checkpoint.

A leaf module (numpy, plus `tokenizers` for BPE): training writes `tokenizer.json` next to each
checkpoint, and every command that reads a checkpoint (generate, inspect) loads it back from here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from moekit.checkfiles import write_atomic


class ByteTokenizer:
    """One id per byte: vocabulary 256, bits per byte is simply loss / ln 2."""

    kind = "byte"
    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def encode_with_offsets(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Ids and the byte offset where each token starts."""
        return self.encode(data), np.arange(len(data), dtype=np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> np.ndarray:
        return np.ones(256, dtype=np.int64)

    def to_dict(self) -> dict:
        return {"kind": "byte", "vocab_size": 256}

    def save(self, directory: Path) -> None:
        self.write(Path(directory) / "tokenizer.json")

    def write(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_dict()))


class BPETokenizer:
    """Byte-level BPE trained with the `tokenizers` library on the training files only.

    ByteLevel maps every byte to one printable character, so a token's string length is the
    number of bytes it covers: that is how bits per byte stays comparable with byte models.
    """

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tk = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        try:
            from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        except ImportError as err:  # pragma: no cover - tokenizers is in the `train` extra
            raise ImportError("data.tokenizer=bpe needs the `tokenizers` package (pip install tokenizers)") from err
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
            special_tokens=[],
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    @staticmethod
    def _text(data: bytes) -> str:
        # Strict: a replaced byte would make the tokens cover other bytes than the data's, and
        # bits per byte would be measured on a different text (the byte tokenizer takes any bytes).
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(
                f"the BPE tokenizer needs UTF-8 text; these bytes are not UTF-8 at byte offset {err.start} "
                f"({data[err.start : err.start + 4]!r}): use the byte tokenizer (data.tokenizer=byte)"
            ) from None

    def encode(self, data: bytes) -> np.ndarray:
        return np.asarray(self.tk.encode(self._text(data)).ids, dtype=np.int64)

    def encode_with_offsets(self, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        text = self._text(data)
        enc = self.tk.encode(text)
        # Offsets are in characters of `text`; convert to byte offsets of its UTF-8 encoding.
        char_to_byte = np.zeros(len(text) + 1, dtype=np.int64)
        char_to_byte[1:] = np.cumsum([len(ch.encode("utf-8")) for ch in text])
        starts = np.asarray([char_to_byte[s] for s, _ in enc.offsets], dtype=np.int64)
        return np.asarray(enc.ids, dtype=np.int64), starts

    def decode(self, ids) -> str:
        return self.tk.decode([int(i) for i in ids])

    def token_bytes(self) -> np.ndarray:
        out = np.ones(self.vocab_size, dtype=np.int64)
        for token, idx in self.tk.get_vocab().items():
            out[idx] = max(1, len(token))
        return out

    def to_dict(self) -> dict:
        return {"kind": "bpe", "vocab_size": self.vocab_size}

    def save(self, directory: Path) -> None:
        self.write(Path(directory) / "tokenizer.json")

    def write(self, path: Path) -> None:
        write_atomic(path, self.tk.to_str(pretty=True))


def load_tokenizer(directory: Path):
    """The tokenizer saved next to a checkpoint or run (byte-level when none was saved)."""
    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        return ByteTokenizer()
    meta = json.loads(path.read_text())
    if meta.get("kind") == "byte":
        return ByteTokenizer()
    return BPETokenizer.load(path)
