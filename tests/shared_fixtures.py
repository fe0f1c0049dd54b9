"""Fixtures more than one test folder uses; a folder's conftest.py imports the ones it wants
(an imported fixture works there as if defined there, autouse included)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: a second intra-op thread buys nothing and, on a shared 2-core machine, its
    spin-waits made each small matmul ~40x slower (measured: 32-token generation 0.35 s with one
    thread, 15 s with two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hf_tokenizer_folder(tmp_path_factory):
    """A folder holding only a trained Hugging Face tokenizer (tests/hf/_hf_tokenizer.py), trained
    once per session."""
    from _hf_tokenizer import save_tokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(folder)
    return folder
