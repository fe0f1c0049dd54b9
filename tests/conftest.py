import os

import pytest
import torch

# Two cores on CI; more threads only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def native_kernel():
    """The native kernel library (ops/native.py) for tests that need it. Where it cannot be built
    the test is skipped, except under `MOEKIT_NATIVE=require` (set by .ci/run), where loading it
    raises instead: CI fails rather than passing with the kernel's tests skipped. Fixtures that
    need it only for some parameters ask for it with `request.getfixturevalue("native_kernel")`."""
    from moekit.ops import native

    lib = native.library()  # raises under MOEKIT_NATIVE=require where the kernel cannot be built
    if lib is None:
        if native.native_mode() == "require":  # only where a test turned it off by hand
            pytest.fail("MOEKIT_NATIVE=require, but the native kernel is turned off in this process")
        pytest.skip(f"no native kernel here: {native._STATE['why'] or 'MOEKIT_NATIVE=0'}")
    return lib
