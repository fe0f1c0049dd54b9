"""Shared fixtures of the trainer tests."""

from __future__ import annotations

import pytest
from trainkit import small_run


@pytest.fixture(scope="session")
def small_data():
    """One loaded corpus for the whole session (reading the stdlib tree is the slow part)."""
    from moekit.train.data import LMData

    cfg = small_run()
    return LMData.from_config(cfg.data, cfg.seed)
