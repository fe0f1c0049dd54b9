import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Two cores on CI; more threads only adds contention.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# Property tests (hypothesis) run the same examples on every run by default: the "ci" profile is
# derandomized (its seed derives from each test) and reads no example database, so a run cannot
# pass or fail by chance. To search for new failures, pick the "explore" profile: random examples,
# ten times as many, failures kept in .hypothesis/ and replayed first next time:
#   python -m pytest tests/layers/test_properties.py --hypothesis-profile=explore
# (or MOEKIT_HYPOTHESIS_PROFILE=explore). A failure found there is shown with its example; add it
# with @example(...) so the ci profile runs it from then on.
_HYPOTHESIS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, database=None, max_examples=150, **_HYPOTHESIS)
settings.register_profile("explore", derandomize=False, max_examples=1500, **_HYPOTHESIS)
settings.load_profile(os.environ.get("MOEKIT_HYPOTHESIS_PROFILE", "ci"))  # --hypothesis-profile overrides


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
