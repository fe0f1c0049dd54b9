"""Model tests run single-threaded: on the shared 2-core machine a 2-thread OpenMP pool spends
most of its time waiting for a core (a tiny training step measured 0.24 s with 2 threads under
load, 0.014 s with 1). The setting is restored after each test."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
