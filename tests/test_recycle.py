"""memascend.recycle.FreeLeases, the free lists both lease recyclers use: exact and slack
fits, largest-first shedding that spares one key, byte counts, draining; and both owners
(the swapper's BufferPool, the drop-in's Runtime) recycle through it."""
from __future__ import annotations

import pytest

from memascend.buffers import BufferPool
from memascend.pool import PinnedPool
from memascend.recycle import FreeLeases


@pytest.fixture
def pool():
    p = PinnedPool(lock="off")
    yield p
    p.close()


def test_take_exact_then_within_slack(pool):
    fl = FreeLeases()
    a, b = pool.lease(8192), pool.lease(12288)
    fl.put(a.size, a)
    fl.put(b.size, b)
    assert fl.bytes == 8192 + 12288 and len(fl) == 2
    assert fl.take(4096) is None  # 8192 is more than 4096 * 1.25, and no slack asked
    assert fl.take(4096, slack=0.25) is None
    assert fl.take(8192) is a
    assert fl.take(10240, slack=0.25) is b  # 12288 <= 10240 * 1.25
    assert fl.bytes == 0 and len(fl) == 0
    a.release()
    b.release()


def test_shed_largest_first_sparing_a_key(pool):
    fl = FreeLeases()
    leases = [pool.lease(n) for n in (4096, 4096, 8192, 16384)]
    for lease in leases:
        fl.put(lease.size, lease)
    out = fl.shed(10000, keep=16384)
    assert [x.size for x in out] == [8192, 4096]  # largest first, never the kept key
    assert fl.bytes == 4096 + 16384
    out += fl.shed(1)
    assert out[-1].size == 16384
    out += fl.drain()
    assert fl.bytes == 0 and len(fl) == 0 and len(out) == 4
    assert fl.shed(100) == [] and fl.take(4096) is None
    for lease in out:
        lease.release()


def test_buffer_pool_recycles_and_sheds_through_it(pool):
    bp = BufferPool(pool, budget_bytes=5 * 4096)
    a = bp.try_acquire(4096)
    b = bp.try_acquire(3 * 4096)
    bp.put(a)
    bp.put(b)
    assert bp.stats.free_bytes == 4 * 4096 and bp.stats.leases_created == 2
    c = bp.try_acquire(3 * 4096)  # the free one of its class
    assert c is b and bp.stats.leases_reused == 1
    bp.put(c)
    d = bp.try_acquire(2 * 4096)  # needs a new lease: free ones of other sizes go first
    assert d is not None and bp.stats.leases_returned >= 1
    assert bp.stats.pinned_bytes <= 5 * 4096
    assert bp.stats.pinned_bytes == bp.stats.free_bytes + d.size
    bp.put(d)
    bp.trim()
    assert bp.stats.pinned_bytes == 0 and bp.stats.free_bytes == 0
    assert pool.stats().leases == 0 and pool.stats().in_use == 0
