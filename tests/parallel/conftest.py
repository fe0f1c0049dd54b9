import pytest
from _ep_pool import close_pools, get_pool


@pytest.fixture(scope="session", autouse=True)
def _close_worker_pools():
    yield
    close_pools()


@pytest.fixture
def pool2():
    return get_pool(2)


@pytest.fixture
def pool4():
    return get_pool(4)
