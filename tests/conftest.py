"""Shared fixtures: pools that are always closed; small swap-file growth for tests."""
from __future__ import annotations

import os

import pytest

# Swap stores grow in 256 MiB steps by default; tests make many small stores, so keep each
# one small (explicit grow_bytes= arguments still win).
os.environ.setdefault("MEMASCEND_STORE_GROW_BYTES", "4MiB")

from memascend import PinnedPool


@pytest.fixture
def make_pool():
    """Factory for pools that the test tears down (releasing stragglers first)."""
    pools: list[PinnedPool] = []

    def make(**kw):
        pool = PinnedPool(**kw)
        pools.append(pool)
        return pool

    yield make
    import gc

    gc.collect()
    for pool in pools:
        pool.close()
