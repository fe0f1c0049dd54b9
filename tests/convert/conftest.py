"""Conversion tests run single-threaded (see tests/models/conftest.py: on the shared 2-core
machine one thread is faster for tiny models) and build tiny models from configs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
