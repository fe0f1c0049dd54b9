"""Shared fixtures of the fine-tuning tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent.parent / "hf"))  # _hf_tokenizer: a real trained HF tokenizer


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second intra-op thread only adds contention on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_tokenizer_folder(tmp_path_factory):
    """A folder holding only a trained Hugging Face tokenizer (tests/hf/_hf_tokenizer.py)."""
    pytest.importorskip("transformers")
    from _hf_tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(folder)
    return folder
