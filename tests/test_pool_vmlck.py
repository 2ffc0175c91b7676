"""The pool's locked and reserved bytes agree with the kernel's view in /proc/self/status."""
from __future__ import annotations

import pytest

from memascend import PinnedPool
from memascend.sysinfo import lockable_bytes, proc_status

pytestmark = pytest.mark.skipif(lockable_bytes() is not None,
                                reason="needs CAP_IPC_LOCK or an unlimited memlock limit "
                                       "(the non-root behaviour is in test_pool_nonroot.py)")


def test_locked_bytes_equal_vmlck_growth():
    base = proc_status()["VmLck"]
    with PinnedPool(lock="required") as pool:
        leases = []
        for n in (1, 5000, 300_000, 8 << 20, (40 << 20) + 7, 123_456):
            leases.append(pool.lease(n))
            st = pool.stats()
            assert proc_status()["VmLck"] - base == st.locked
            assert st.locked == st.reserved
        for lease in leases[::2]:
            lease.release()
            assert proc_status()["VmLck"] - base == pool.stats().locked
        for lease in leases[1::2]:
            lease.release()
        pool.trim()
        assert pool.stats().locked == 0
    assert proc_status()["VmLck"] == base


def test_populated_arenas_are_resident():
    before = proc_status()["VmRSS"]
    with PinnedPool(lock="off", populate=True) as pool:
        with pool.lease(64 << 20):
            grown = proc_status()["VmRSS"] - before
            assert grown >= (64 << 20) * 0.98
            assert pool.stats().locked == 0
