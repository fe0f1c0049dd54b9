"""Conversion tests run single-threaded (see tests/models/conftest.py: on the shared 2-core
machine one thread is faster for tiny models) and build tiny models from configs."""

from shared_fixtures import _one_thread  # noqa: F401  (a fixture of this folder)
