"""The drop-in's shared runtime recycles pinned leases without raising the pinned peak.

Mapping and locking a fresh lease costs about 0.7 ms per MiB, so the runtime keeps freed
leases for the next lease of the same size, but only while the leases in use plus those kept
stay within the most that was in use at once since the last trim, and never one that a
tensor still views (such a lease waits until its views are gone, then is kept or released). No DeepSpeed needed: the runtime is plain memascend.
"""
from __future__ import annotations

import torch

from memascend.integrations.deepspeed.runtime import Options, Runtime

MIB = 1 << 20


def _rt() -> Runtime:
    return Runtime(Options(lock="off"), {"queue_depth": 8, "chunk_bytes": MIB}, "off")


def test_a_freed_lease_serves_the_next_of_its_size():
    rt = _rt()
    try:
        a = rt.lease(4 * MIB)
        addr = a.address
        rt.free(a)
        assert rt.lease_stats()["kept_bytes"] == 4 * MIB
        b = rt.lease(4 * MIB)
        assert b.address == addr  # recycled, not mapped again
        assert rt.lease_stats() == {"in_use_bytes": 4 * MIB, "kept_bytes": 0,
                                    "peak_bytes": 4 * MIB, "viewed_bytes": 0}
        c = rt.lease(4 * MIB + 8)  # another size: a new lease
        assert c.address != addr
        rt.free(b)
        rt.free(c)
    finally:
        rt.close()


def test_kept_plus_in_use_never_exceeds_the_peak():
    rt = _rt()
    try:
        big = rt.lease(8 * MIB)
        rt.free(big)  # peak 8 MiB: kept
        small = [rt.lease(3 * MIB) for _ in range(2)]  # 6 in use + 8 kept > 8: it gives way
        st = rt.lease_stats()
        assert st == {"in_use_bytes": 6 * MIB, "kept_bytes": 0, "peak_bytes": 8 * MIB,
                      "viewed_bytes": 0}
        # freeing the small ones keeps only what fits under the peak
        for lease in small:
            rt.free(lease)
        st = rt.lease_stats()
        assert st["in_use_bytes"] + st["kept_bytes"] <= st["peak_bytes"]
        rt.trim()
        assert rt.lease_stats() == {"in_use_bytes": 0, "kept_bytes": 0, "peak_bytes": 0,
                                    "viewed_bytes": 0}
    finally:
        rt.close()


def test_a_lease_still_viewed_is_released_not_kept():
    rt = _rt()
    try:
        a = rt.lease(2 * MIB)
        view = a.as_tensor(torch.float32)
        view[:4] = 7.0
        rt.free(a)  # a tensor still views it: not handed out while it does
        assert rt.lease_stats()["kept_bytes"] == 0
        assert rt.lease_stats()["viewed_bytes"] == 2 * MIB
        b = rt.lease(2 * MIB)
        assert b.address != a.address
        b.as_tensor(torch.float32).fill_(0)
        assert float(view[0]) == 7.0
        del view
        rt.free(b)
    finally:
        rt.close()


def test_a_lease_freed_while_viewed_is_kept_once_the_views_go():
    """DeepSpeed drops its last view of a partition after the swapper releases it; the
    lease is then kept for the next lease of its size, not mapped afresh."""
    rt = _rt()
    try:
        a = rt.lease(2 * MIB)
        view = a.as_tensor(torch.float32)
        rt.free(a)
        assert rt.lease_stats()["viewed_bytes"] == 2 * MIB
        mapped = rt.pool.stats().arenas_mapped_total
        del view
        b = rt.lease(2 * MIB)  # the views are gone: a is kept, and serves this lease
        assert b.address == a.address
        assert rt.pool.stats().arenas_mapped_total == mapped
        st = rt.lease_stats()
        assert st["viewed_bytes"] == 0 and st["in_use_bytes"] + st["kept_bytes"] <= st["peak_bytes"]
        rt.free(b)
        # one still viewed past the peak is released once its views go, not kept
        c = rt.lease(2 * MIB)
        v2 = c.as_tensor(torch.float32)
        rt.free(c)
        d = rt.lease(2 * MIB)  # c is viewed: d is another lease, in use at the peak
        del v2
        e = rt.lease(MIB)  # c's views are gone but in use + kept would pass the peak
        st = rt.lease_stats()
        assert st["viewed_bytes"] == 0 and st["in_use_bytes"] + st["kept_bytes"] <= st["peak_bytes"]
        assert c.released
        rt.free(d)
        rt.free(e)
    finally:
        rt.close()
