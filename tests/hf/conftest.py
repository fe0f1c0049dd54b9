"""Hugging Face tests run single-threaded and share one trained tokenizer (tests/shared_fixtures.py)."""

from shared_fixtures import _one_thread, hf_tokenizer_folder  # noqa: F401  (fixtures of this folder)
