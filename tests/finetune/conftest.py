"""Shared fixtures of the fine-tuning tests."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent.parent / "hf"))  # _hf_tokenizer: a real trained HF tokenizer

from shared_fixtures import _one_thread, hf_tokenizer_folder  # noqa: E402, F401  (fixtures of this folder)
