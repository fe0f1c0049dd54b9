"""Tokenizers: one id per byte, a byte-level BPE, or a Hugging Face folder's own tokenizer; loading
the one saved beside a checkpoint; and incremental decoding for streamed text.

A leaf module (numpy, plus `tokenizers` for BPE and `transformers` for a Hugging Face tokenizer,
both imported only when used): training writes `tokenizer.json` next to each checkpoint, and every
command that reads a checkpoint (generate, chat, inspect) loads it back from here.
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

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Ids must be bytes (0..255): an id past them is an error naming it, not a silent skip."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are not bytes: the byte tokenizer decodes ids 0..255 only")
        return bytes(ids).decode("utf-8", errors="replace")

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

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

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


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizers

# What a folder needs for `load_hf_tokenizer`, for the error that says what is missing.
HF_TOKENIZER_NEEDS = ("tokenizer.json (+ tokenizer_config.json, special_tokens_map.json), or tokenizer.model + "
                      "tokenizer_config.json, or vocab.json + merges.txt + tokenizer_config.json")


def has_hf_tokenizer(directory: Path) -> bool:
    """Whether a folder holds the files of a Hugging Face tokenizer (tokenizer_config.json, a
    sentencepiece tokenizer.model, or a GPT-2 style vocab.json + merges.txt)."""
    d = Path(directory)
    return (d / "tokenizer_config.json").is_file() or (d / "tokenizer.model").is_file() or (
        (d / "vocab.json").is_file() and (d / "merges.txt").is_file())


class HFTokenizer:
    """A Hugging Face folder's tokenizer, through `transformers.AutoTokenizer`: text is encoded as
    `tokenizer(text)` does (a bos token where the tokenizer adds one), decoded as
    `tokenizer.decode`, and a conversation is rendered by the folder's chat template exactly as
    `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` renders it.

    eos_token_ids: the ids that end a reply (the folder's generation_config.json / config.json
    eos_token_id; the tokenizer's eos token when none is given)."""

    kind = "hf"

    def __init__(self, tokenizer, eos_token_ids=(), source: str = ""):
        self.tk = tokenizer
        self.source = source
        self.vocab_size = len(tokenizer)
        eos = tuple(int(i) for i in eos_token_ids)
        if not eos and tokenizer.eos_token_id is not None:
            eos = (int(tokenizer.eos_token_id),)
        self.eos_token_ids = eos

    @property
    def chat_template(self):
        return self.tk.chat_template or None

    def encode_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """`tokenizer(text)`'s ids; without `add_special_tokens` no bos (a continuation)."""
        return [int(i) for i in self.tk(text, add_special_tokens=add_special_tokens)["input_ids"]]

    def encode(self, data: bytes) -> np.ndarray:
        return np.asarray(self.encode_text(BPETokenizer._text(data)), dtype=np.int64)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for, for bits per byte: special tokens (bos, eos) stand
        for none; a byte-level BPE's token covers one byte per character of its string (as
        BPETokenizer counts); other tokens count the UTF-8 bytes they decode to."""
        v = self.vocab_size
        out = np.zeros(v, dtype=np.int64)
        special = set(self.tk.all_special_ids) | {
            i for i, t in getattr(self.tk, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
        backend = getattr(self.tk, "backend_tokenizer", None)
        decoder = (json.loads(backend.to_str()).get("decoder") or {}) if backend is not None else {}
        byte_level = decoder.get("type") == "ByteLevel"
        pieces = self.tk.convert_ids_to_tokens(list(range(v))) if byte_level else \
            self.tk.batch_decode([[i] for i in range(v)])
        for i, piece in enumerate(pieces):
            if i not in special and piece is not None:
                out[i] = len(piece) if byte_level else len(piece.encode("utf-8"))
        return out

    def to_dict(self) -> dict:
        return {"kind": "hf", "vocab_size": self.vocab_size, "source": self.source}

    def save(self, directory: Path) -> None:
        """The tokenizer's files (transformers' save_pretrained) into `directory`, each file
        replaced atomically, so `checkpoint_tokenizer` finds it there."""
        import os
        import tempfile

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=directory, prefix=".tok-") as tmp:
            self.tk.save_pretrained(tmp)
            for f in sorted(Path(tmp).iterdir()):
                os.replace(f, directory / f.name)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """The ids of `messages` rendered by the chat template, with the assistant's turn opened."""
        if not self.chat_template:
            raise ValueError(f"{self.source or 'the tokenizer'} has no chat template (tokenizer_config.json "
                             f"\"chat_template\" or chat_template.jinja); use a plain prompt instead")
        try:
            ids = self.tk.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        except Exception as err:  # jinja2's TemplateError (a template's raise_exception), and the like
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            where = self.source or "the tokenizer"
            raise ValueError(f"{where}: the chat template refused the messages: {first}") from None
        return [int(i) for i in ids]


def load_hf_tokenizer(directory: Path, eos_token_ids=(), hint: str = "give token ids with --prompt-ids") -> HFTokenizer:
    """The Hugging Face tokenizer saved in `directory` (no network: local files only). Errors are
    one line naming the folder and what it needs (or `hint`)."""
    from moekit.checkfiles import CheckpointError

    directory = Path(directory)
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is in the `hf` extra
        raise ValueError(f"{directory} holds a Hugging Face tokenizer: reading it needs the `transformers` package "
                         f"(pip install 'moekit[hf]'), or {hint}") from None
    try:
        tk = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as err:  # transformers' errors are long and do not say what to do
        why = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{directory}: cannot load the Hugging Face tokenizer ({why}); it needs "
                              f"{HF_TOKENIZER_NEEDS}, or {hint}") from None
    return HFTokenizer(tk, eos_token_ids, source=str(directory))


# ---------------------------------------------------------------------------------------------
# The tokenizer of a checkpoint (every command that reads one, and fine-tuning)


def load_checkpoint_tokenizer(folder: Path, hint: str = "use --prompt-ids with token ids"):
    """The tokenizer saved beside a checkpoint (bytes when none was saved); a tokenizer.json that
    is not one is an error naming the file and `hint`, not a traceback."""
    from moekit.checkfiles import CheckpointError, read_json

    path = Path(folder) / "tokenizer.json"
    if path.exists():
        read_json(path)  # a JSON object, or an error naming the file
    try:
        return load_tokenizer(folder)
    except Exception as err:  # the tokenizers library's errors do not name the file
        raise CheckpointError(f"{path}: cannot load the tokenizer ({err}); {hint}") from None


def read_checkpoint_json(folder: Path, name: str) -> dict:
    """A JSON object beside a checkpoint ({} when absent); an error naming the file when it is not one."""
    from moekit.checkfiles import read_json

    path = Path(folder) / name
    return read_json(path) if path.exists() else {}


def _converted_from_hf(folder: Path) -> bool:
    """A moekit checkpoint written by `moekit convert --from-hf` (its config.json records the source)."""
    return isinstance(read_checkpoint_json(folder, "config.json").get("hf_source"), dict)


def checkpoint_tokenizer(ref, hint: str = "use --prompt-ids with token ids"):
    """The tokenizer of a checkpoint, or None when it has none: a Hugging Face tokenizer where the
    folder holds one (a Hugging Face folder, or a checkpoint converted from one), else a moekit
    checkpoint's own (tokenizer.json: bytes or BPE; bytes when none was saved). A Hugging Face
    folder without tokenizer files has none: its ids are not bytes."""
    folder = Path(ref.path)
    from_hf = ref.kind == "hf" or _converted_from_hf(folder)
    if has_hf_tokenizer(folder) or (from_hf and (folder / "tokenizer.json").is_file()):
        return load_hf_tokenizer(folder, checkpoint_eos_ids(folder), hint)
    if from_hf:
        return None
    return load_checkpoint_tokenizer(folder, hint)


def _ids(value) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return []


def checkpoint_eos_ids(folder: Path) -> list[int]:
    """The ids that end a generation, as transformers finds them: generation_config.json's
    eos_token_id, else config.json's (a converted checkpoint keeps it under hf_source); [] if none."""
    eos = _ids(read_checkpoint_json(folder, "generation_config.json").get("eos_token_id"))
    if not eos:
        cfg = read_checkpoint_json(folder, "config.json")
        eos = _ids(cfg.get("eos_token_id")) or _ids((cfg.get("hf_source") or {}).get("eos_token_id"))
    return eos


class StreamDecoder:
    """Text of a growing list of ids, piece by piece, for printing tokens as they come.

    Decoding each token alone breaks characters that span tokens (a byte-level BPE splits a
    multi-byte UTF-8 character over several ids) and words whose leading space a tokenizer drops
    at the start of a text. So each piece is the text of a window of recent ids minus the text of
    the same window without the new ones (the window slides, so the cost per token stays small),
    and a piece that ends in an incomplete character (U+FFFD) waits for the next id. The pieces
    joined equal `decode(all ids)`."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # window start: ids before it are printed and give no context any more
        self.read = 0  # ids before it are printed

    def _text(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def push(self, ids) -> str:
        """Add ids; the text they complete (maybe empty)."""
        self.ids.extend(int(i) for i in ids)
        before = self._text(self.ids[self.prefix:self.read])
        now = self._text(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """The text still held back (an incomplete character at the very end)."""
        before = self._text(self.ids[self.prefix:self.read])
        now = self._text(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):]
