"""Hypothesis state machine over lease/release: the pool's invariants hold at every step.

Invariants: live leases never overlap and are aligned; every lease still holds the pattern
written into it; the stats equal the sums over live leases; locked bytes equal reserved
bytes when mlock is allowed; after releasing everything (and trimming) reserved bytes are
back at zero.
"""
from __future__ import annotations

import hypothesis.strategies as st
from hypothesis import settings
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, invariant, rule,
                                 precondition)

from memascend import PinnedPool

SIZES = st.one_of(st.integers(1, 4096 * 3), st.integers(1, 300_000),
                  st.integers(200_000, 6 << 20))


class PoolMachine(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.pool = PinnedPool(lock="auto", arena_bytes="1MiB", large_threshold="256KiB",
                               retain_bytes="512KiB")
        self.live: dict[int, tuple[object, int]] = {}
        self.counter = 0

    @rule(target=leases, nbytes=SIZES)
    def lease(self, nbytes):
        lease = self.pool.lease(nbytes)
        self.counter = (self.counter + 1) % 251
        mv = lease.memoryview()
        mv[0] = self.counter
        mv[nbytes - 1] = self.counter
        self.live[lease.address] = (lease, self.counter)
        return lease

    @rule(lease=consumes(leases))
    def release(self, lease):
        _lease, tag = self.live.pop(lease.address)
        mv = lease.memoryview()
        assert mv[0] == tag and mv[lease.nbytes - 1] == tag, "lease content was overwritten"
        del mv
        lease.release()

    @precondition(lambda self: not self.live)
    @rule()
    def trim(self):
        self.pool.trim()
        assert self.pool.stats().reserved == 0

    @invariant()
    def no_overlap_and_aligned(self):
        spans = sorted((l.address, l.size) for l, _ in self.live.values())
        for (a, s), (b, _s2) in zip(spans, spans[1:]):
            assert a + s <= b, "leases overlap"
        assert all(a % 4096 == 0 for a, _ in spans)

    @invariant()
    def stats_match_live_leases(self):
        s = self.pool.stats()
        leases = [l for l, _ in self.live.values()]
        assert s.leases == len(leases)
        assert s.requested == sum(l.nbytes for l in leases)
        assert s.in_use == sum(l.size for l in leases)
        assert s.reserved >= s.in_use
        assert s.retained <= 512 << 10
        if s.lock_failures == 0:
            assert s.locked == s.reserved

    def teardown(self):
        for lease, _ in list(self.live.values()):
            lease.release()
        self.live.clear()
        self.pool.trim()
        s = self.pool.stats()
        assert s.reserved == 0 and s.locked == 0 and s.leases == 0
        self.pool.close()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
