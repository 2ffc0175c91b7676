"""Shared fixtures: pools that are always closed, and /proc readings."""
from __future__ import annotations

import pytest

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
