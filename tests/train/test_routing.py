"""Byte classes from Python's tokenize, and the routing counts behind the specialisation plot."""

from __future__ import annotations

import numpy as np
import torch
from trainkit import small_model

from moekit.train.data import ByteTokenizer
from moekit.train.routing import CLASSES, collect_routing, label_python, label_text, labelled_tokens


def _classes_of(src: bytes) -> str:
    return "".join(CLASSES[c][0] for c in label_python(src))


def test_labels_follow_python_tokens():
    src = b'if x1 == 0x1F:  # hi\n    s = "a b"\n'
    got = _classes_of(src)
    #      i f _ x 1 _ = = _ 0 x 1 F : _ _ # _ h i \n
    assert got[:20] == "kkwiiwoowddddowwcccc"
    assert got[20] == "w"  # the newline
    assert got[21:25] == "wwww"  # indentation
    assert got[25:27] == "iw" and got[27] == "o"
    assert got[29:34] == "sssss"  # the whole string literal, its space included


def test_non_ascii_and_unparsable_text():
    src = 'x = "é"\n'.encode()
    labels = label_python(src)
    assert len(labels) == len(src) and CLASSES[labels[5]] == "string" and CLASSES[labels[6]] == "string"
    assert label_python(b"def (:\n  )))\n") is None
    fallback = label_text(b"abc 12 ;")
    assert [CLASSES[c] for c in fallback] == ["identifier"] * 3 + ["whitespace", "digits", "digits", "whitespace",
                                                                   "operator"]


def test_routing_counts_every_assignment_once():
    from moekit.models import build_model

    torch.manual_seed(0)
    model = build_model(small_model())
    files = [("a.py", b"def f(x):\n    return x + 1  # one\n" * 8)]
    ids, classes = labelled_tokens(ByteTokenizer(), files, 10_000)
    assert len(ids) == len(classes) == len(files[0][1])
    summary = collect_routing(model, ids, classes, seq_len=32, batch_size=2)
    routed = (len(ids) // 32) * 32
    assert summary.layers == [0, 1]
    for layer in summary.layers:
        counts = summary.counts[layer]
        assert counts.shape == (len(CLASSES), 4)
        assert counts.sum() == routed * 2  # top-2, dropless
        assert summary.tokens_per_expert[layer].sum() == routed * 2
        np.testing.assert_allclose(summary.share(layer)[summary.class_tokens > 0].sum(axis=1), 1.0)
    assert summary.class_tokens.sum() == routed
    assert model.training  # the mode is restored
