"""Fine-tuning data: JSONL examples, tokenized with the checkpoint's tokenizer, split by example,
packed into windows with a loss mask; the trainer reads it in place of `moekit.train.data.LMData`.

Shape legend: B windows per batch, L tokens per window (data.seq_len).

Each line of the file is one example, a JSON object of one of two kinds:

    {"text": "..."}                          the loss is on every token of the text
    {"prompt": "...", "response": "..."}     the loss is on the response only

followed by the tokenizer's end-of-sequence token where it has one (trained too: the model
learns where a response ends). The first token of an example is never trained: nothing of the
example comes before it (a Hugging Face tokenizer's bos is that token, so its first word is
trained). Blank lines are skipped; anything else that is not an example is an error naming
FILE:LINE, and so is a prompt or text longer than the context (data.seq_len): the model could
not see all of it while predicting what follows.

Splits are by example: SHA-256 of the example's content decides, so the split does not depend on
the order of the lines, a duplicated example lands in one split only, and the test split is read
only by the final test evaluation (testeval.py). Each split's examples are packed, in file order,
into one stream cut into windows of seq_len + 1 tokens (overlapping by one, as LMData's), the last
one padded; targets not trained are -100 (IGNORE, torch cross_entropy's ignore_index). Examples
share windows: a window's later examples attend to its earlier ones, as in pretraining's packing.
The train windows are sampled in LMData's step-addressed order (StepSampler), so a resumed run
reads exactly the batches of the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from moekit.train.config import DataConfig
from moekit.train.data import StepSampler
from moekit.train.steps import IGNORE

TEXT_KEYS = ("text",)
PAIR_KEYS = ("prompt", "response")


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line number in the file
    text: str | None = None
    prompt: str | None = None
    response: str | None = None

    @property
    def key(self) -> str:
        """The content the split hashes (not the line number: moving a line keeps its split)."""
        return json.dumps([self.text, self.prompt, self.response], ensure_ascii=False)


def read_examples(path: str | Path) -> list[Example]:
    """The examples of a JSONL file; a line that is not one is a ValueError naming FILE:LINE."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"--data {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--data {path}: a folder; give a JSONL file (one JSON object per line)") from None
    examples = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}: not UTF-8 (byte {err.start} of the line); save the file as UTF-8") from None
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); each line must be one "
                             f'JSON object: {{"text": ...}} or {{"prompt": ..., "response": ...}}') from None
        examples.append(_example(obj, number, where))
    if not examples:
        raise ValueError(f"{path}: no examples (the file is empty); give one JSON object per line: "
                         f'{{"text": ...}} or {{"prompt": ..., "response": ...}}')
    return examples


def _example(obj, number: int, where: str) -> Example:
    kinds = '{"text": ...} or {"prompt": ..., "response": ...}'
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: a JSON {type(obj).__name__}, not an object; each line must be {kinds}")
    keys = set(obj)
    unknown = sorted(keys - set(TEXT_KEYS) - set(PAIR_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r}; each line must be {kinds}")
    if "text" in keys and keys & set(PAIR_KEYS):
        raise ValueError(f"{where}: both 'text' and {sorted(keys & set(PAIR_KEYS))[0]!r}; each line must be {kinds}")
    wanted = TEXT_KEYS if "text" in keys else PAIR_KEYS
    for key in wanted:
        if key not in obj:
            raise ValueError(f"{where}: missing key {key!r}; each line must be {kinds}")
        if not isinstance(obj[key], str):
            raise ValueError(f"{where}: {key!r} is a JSON {_json_type(obj[key])}, not a string")
    for key in ("text", "response"):
        if key in obj and not obj[key]:
            raise ValueError(f"{where}: empty {key!r}; there is nothing to train on: drop the line or fill it")
    return Example(number, **{k: obj[k] for k in wanted})


def _json_type(value) -> str:
    return {bool: "boolean", int: "number", float: "number", list: "array", dict: "object",
            type(None): "null"}.get(type(value), type(value).__name__)


# ----------------------------------------------------------------------------- tokenizing


def eos_id(tokenizer) -> int | None:
    """The id that ends an example: a Hugging Face tokenizer's first eos; byte and moekit BPE
    tokenizers have none."""
    ids = tuple(getattr(tokenizer, "eos_token_ids", ()))
    return int(ids[0]) if ids else None


def _encode(tokenizer, text: str, start: bool) -> list[int]:
    """Ids of `text`; `start`: the example's first piece (a Hugging Face tokenizer adds its bos)."""
    if hasattr(tokenizer, "encode_text"):
        return tokenizer.encode_text(text, add_special_tokens=start)
    return [int(i) for i in tokenizer.encode(text.encode("utf-8"))]


def encode_example(tokenizer, ex: Example, seq_len: int, where: str) -> tuple[list[int], list[bool]]:
    """(ids, trained) of one example, its eos included; an error naming `where` (FILE:LINE) when
    a prompt does not fit the context (a text may be longer: packing cuts it across windows)."""
    if ex.text is not None:  # plain text of any length: packing cuts it across windows
        first, rest = _encode(tokenizer, ex.text, True), []
    else:
        first, rest = _encode(tokenizer, ex.prompt, True), _encode(tokenizer, ex.response, False)
        if not rest:
            raise ValueError(f"{where}: the response has no tokens; drop the line or fill it")
        if len(first) > seq_len:  # the response could never be predicted with its prompt in view
            raise ValueError(f"{where}: the prompt is {len(first)} tokens, longer than the context of {seq_len} "
                             f"tokens (data.seq_len): shorten it")
    eos = eos_id(tokenizer)
    ids = first + rest + ([eos] if eos is not None else [])
    trained = [ex.text is not None] * len(first) + [True] * (len(ids) - len(first))
    trained[0] = False  # nothing of the example comes before its first token
    return ids, trained


# ----------------------------------------------------------------------------- splits


def _unit(key: str) -> float:
    """A stable number in [0, 1) from an example's content (not Python's salted hash())."""
    return int(hashlib.sha256(("finetune:" + key).encode()).hexdigest()[:12], 16) / 16**12


def split_examples(examples: list[Example], val_fraction: float, test_fraction: float, source: str):
    """(train, validation, test): validation where the content's unit is below val_fraction, test
    where it is at or above 1 - test_fraction. An empty split (train, validation, or test when
    test_fraction > 0) is an error saying what to change."""
    splits: tuple[list[Example], list[Example], list[Example]] = ([], [], [])
    for ex in examples:
        u = _unit(ex.key)
        splits[1 if u < val_fraction else 2 if u >= 1 - test_fraction else 0].append(ex)
    hints = {"training": "lower data.val_fraction and data.test_fraction",
             "validation": f"raise data.val_fraction (now {val_fraction})",
             "test": f"raise data.test_fraction (now {test_fraction}; 0 = no test split)"}
    for name, split in zip(hints, splits, strict=True):
        if not split and not (name == "test" and test_fraction == 0):
            raise ValueError(f"{source}: the {name} split of its {len(examples)} examples is empty; "
                             f"{hints[name]} or add examples")
    return splits


# ----------------------------------------------------------------------------- packed streams


@dataclass
class Packed:
    """One split packed: `tokens` (N,) and `trained` (N,), (N - 1) a multiple of seq_len."""

    tokens: Tensor
    trained: Tensor
    examples: int
    seq_len: int

    def windows(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len


def pack(encoded: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int) -> Packed:
    """Examples end to end, padded (untrained) up to whole windows of seq_len + 1 tokens.

    Window k reads tokens [k L, k L + L) and predicts [k L + 1, k L + L] (L = seq_len). A
    prompt/response example that would straddle a window boundary starts at the next window
    instead (padding before it), when it fits one: then every response token is predicted with
    its whole prompt in view. Texts (trained throughout) are cut across windows as they come.
    """
    ids: list[int] = []
    trained: list[bool] = []
    for e, m in encoded:
        start, n = len(ids), len(e)
        has_prompt = not all(m[1:])
        # the window of the example's last target must be the one its first token starts in
        if has_prompt and n <= seq_len + 1 and start > 0 and (start + n - 2) // seq_len * seq_len > start:
            gap = -start % seq_len
            ids += [pad_id] * gap
            trained += [False] * gap
        ids += e
        trained += m
    pad = (-(len(ids) - 1)) % seq_len if len(ids) > seq_len else seq_len + 1 - len(ids)
    ids += [pad_id] * pad
    trained += [False] * pad
    return Packed(torch.tensor(ids, dtype=torch.int64), torch.tensor(trained, dtype=torch.bool), len(encoded),
                  seq_len)


class FinetuneData(StepSampler):
    """The fine-tuning splits as the trainer reads them (LMData's interface). `sets_vocab` is
    False: the model keeps its vocabulary (a Hugging Face tokenizer may have fewer ids)."""

    sets_vocab = False

    def __init__(self, cfg: DataConfig, path: Path, tokenizer, seed: int):
        self.cfg, self.path, self.tokenizer, self.seed = cfg, Path(path), tokenizer, seed
        examples = read_examples(path)
        raw = self.path.read_bytes()
        splits = split_examples(examples, cfg.val_fraction, cfg.test_fraction, str(path))
        eos = eos_id(tokenizer)
        pad_id = eos if eos is not None else 0
        packed = []
        for split in splits:
            encoded = [encode_example(tokenizer, ex, cfg.seq_len, f"{path}:{ex.line}") for ex in split]
            packed.append(pack(encoded, cfg.seq_len, pad_id) if encoded else None)
        self.train, self.val, self._test = packed
        for name, p in (("training", self.train), ("validation", self.val)):
            if not bool(p.trained.any()):
                raise ValueError(f"{path}: the {name} split has no trained token (every example is one token "
                                 f"long); add longer examples")
        self.token_bytes = torch.from_numpy(np.asarray(tokenizer.token_bytes(), dtype=np.int64))
        self.num_train_windows = self.train.windows()
        self.num_val_windows = self.val.windows()
        self._perm_epoch, self._perm = -1, None
        self._info = {
            "source": "jsonl", "path": str(self.path), "bytes": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest(), "examples": len(examples),
            **{f"{name}_examples": (p.examples if p is not None else 0)
               for name, p in (("train", self.train), ("val", self.val), ("test", self._test))},
        }

    def max_id(self) -> int:
        """The largest token id of any split (checked against the model's vocabulary)."""
        return max(int(p.tokens.max()) for p in (self.train, self.val, self._test) if p is not None)

    @property
    def info(self) -> dict:
        return {
            **self._info,
            "tokenizer": self.tokenizer.to_dict(),
            "train_tokens": len(self.train.tokens),
            "train_trained_tokens": int(self.train.trained.sum()),
            "val_tokens": len(self.val.tokens),
            "val_trained_tokens": int(self.val.trained.sum()),
            "train_windows": self.num_train_windows,
            "val_windows": self.num_val_windows,
        }

    @staticmethod
    def _rows(packed: Packed, indices, seq: int) -> tuple[Tensor, Tensor]:
        """Inputs and targets (B, L) of windows `indices`: untrained targets are IGNORE."""
        starts = torch.tensor([i * seq for i in indices])[:, None]
        pos_BL1 = starts + torch.arange(seq + 1)  # (B, L+1)
        w_BL1, keep_BL1 = packed.tokens[pos_BL1], packed.trained[pos_BL1]
        y_BL = torch.where(keep_BL1[:, 1:], w_BL1[:, 1:], torch.full_like(w_BL1[:, 1:], IGNORE))
        return w_BL1[:, :-1].contiguous(), y_BL.contiguous()

    def train_batch(self, step: int, micro: int, grad_accum: int, rank: int = 0,
                    world: int = 1) -> tuple[Tensor, Tensor]:
        """Inputs and targets (B, L) for one micro-batch of one rank."""
        indices = self.train_window_indices(step, micro, grad_accum, rank, world)
        return self._rows(self.train, indices, self.cfg.seq_len)

    def _batches(self, packed: Packed, indices: list[int], batch_size: int) -> list[tuple[Tensor, Tensor]]:
        return [self._rows(packed, indices[s : s + batch_size], self.cfg.seq_len)
                for s in range(0, len(indices), batch_size)]

    def val_batches(self, num_batches: int) -> list[tuple[Tensor, Tensor]]:
        """Fixed, evenly spaced validation windows (all of them when num_batches * batch_size
        covers them): the same for every model and every evaluation."""
        idx = self.val_window_indices(num_batches, self.num_val_windows)
        return self._batches(self.val, idx, self.cfg.batch_size)

    def test_batches(self, batch_size: int) -> list[tuple[Tensor, Tensor]] | None:
        """Every window of the test split (every trained target once), or None without one.
        Only the final test evaluation (testeval.py) reads the test split."""
        if self._test is None:
            return None
        return self._batches(self._test, list(range(self._test.windows())), batch_size)

    def test_info(self) -> dict:
        return {"test_examples": self._test.examples if self._test is not None else 0}
