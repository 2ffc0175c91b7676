"""The swapper's buffer pool: pinned leases recycled per size class, under a byte budget.

Every buffer the swapper uses is a lease from a :class:`~memascend.pool.PinnedPool`, sized
exactly (rounded to 4096) for a real tensor, never a fixed slot. A freed buffer goes to the
free list of its size class and serves the next tensor of that size without a new mapping.
A free buffer of another class may serve a request if it is at most ``slack`` (default 1/4)
larger: a little internal waste is far cheaper than mapping, populating and locking a new
arena (about 0.7 ms per MiB). The sum of all leases held — in use and free — never exceeds
``budget_bytes``; when a new size is needed and the budget is full, free buffers of other
sizes are returned to the pool first. A pool capped at a fixed arena (``limit_bytes``, as
``offload_model`` sets it) may be too fragmented for a request the budget allows: then every
free buffer goes back so the arena's free space coalesces, and if it still does not fit the
request is taken from an ``overflow`` pool when there is one (and counted), else refused like
a full budget. Deciding what to evict, and waiting, is the swapper's
job: this class never blocks. The free lists are :class:`memascend.recycle.FreeLeases`, the
structure the DeepSpeed drop-in's runtime recycles its leases with too.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import PoolExhaustedError
from .extents import round_up
from .pool import Lease, PinnedPool
from .recycle import FreeLeases


@dataclass
class BufferStats:
    """Counters of a :class:`BufferPool` (bytes unless named otherwise)."""

    pinned_bytes: int = 0       # held leases, in use or free
    pinned_peak: int = 0
    free_bytes: int = 0         # held but on free lists
    leases_created: int = 0
    leases_reused: int = 0
    leases_returned: int = 0    # given back to the pinned pool to make room
    overflow_leases: int = 0    # taken from the overflow pool: the capped one was fragmented


class BufferPool:
    """Budgeted, size-class-recycled leases (see module docstring). Not thread-safe: the
    swapper calls it under its own lock.

    Parameters
    ----------
    pool:
        Where leases come from.
    budget_bytes:
        Most bytes held at once.
    overflow:
        Where a lease comes from when ``pool`` is capped (``limit_bytes``) and too fragmented
        for it even with every free buffer returned (default: nowhere, the request waits).
    """

    def __init__(self, pool: PinnedPool, budget_bytes: int, slack: float = 0.25,
                 overflow: PinnedPool | None = None):
        self.pool = pool
        self.overflow = overflow
        self.budget = budget_bytes
        self.slack = slack
        self._free = FreeLeases()  # keyed by size class (= the lease's size)
        self.stats = BufferStats()

    @staticmethod
    def size_class(nbytes: int) -> int:
        """The size class of a tensor of ``nbytes``: rounded up to 4096."""
        return round_up(nbytes)

    def try_acquire(self, nbytes: int) -> Lease | None:
        """A buffer of at least ``nbytes`` (its size class, or a free one up to ``slack``
        larger), or None if the budget is full."""
        size = self.size_class(nbytes)
        kept = self._free.take(size, self.slack)
        if kept is not None:
            self.stats.free_bytes -= kept.size
            self.stats.leases_reused += 1
            return kept
        if self.stats.pinned_bytes + size > self.budget:
            self._shed(self.stats.pinned_bytes + size - self.budget, keep=size)
        if self.stats.pinned_bytes + size > self.budget:
            return None
        try:
            lease = self.pool.lease(size)
        except PoolExhaustedError as exc:
            if exc.reason != "limit":
                raise
            # A pool capped at its arena (see offload_model) is fragmented: give every free
            # buffer back so free space coalesces, then try once more; None makes the caller
            # evict or wait.
            self.trim()
            try:
                lease = self.pool.lease(size)
            except PoolExhaustedError as exc2:
                if exc2.reason != "limit" or self.overflow is None:
                    raise
                lease = self.overflow.lease(size)  # counted: a mapping outside the arena
                self.stats.overflow_leases += 1
        self.stats.pinned_bytes += size
        self.stats.pinned_peak = max(self.stats.pinned_peak, self.stats.pinned_bytes)
        self.stats.leases_created += 1
        return lease

    def put(self, lease: Lease) -> None:
        """Return a buffer to its free list."""
        self._free.put(lease.size, lease)
        self.stats.free_bytes += lease.size

    def _shed(self, need: int, keep: int) -> None:
        """Give free buffers of other size classes back to the pool until ``need`` is freed."""
        self._give_back(self._free.shed(need, keep=keep))

    def shed_to(self, budget: int) -> None:
        """Give free buffers back to the pool until at most ``budget`` bytes are held (or
        none is free)."""
        self._shed(self.stats.pinned_bytes - budget, keep=-1)

    def trim(self) -> None:
        """Give every free buffer back to the pool."""
        self._give_back(self._free.drain())

    def _give_back(self, leases: list[Lease]) -> None:
        """Release free buffers taken off the free lists to the pinned pool."""
        for lease in leases:
            lease.release()
            self.stats.free_bytes -= lease.size
            self.stats.pinned_bytes -= lease.size
            self.stats.leases_returned += 1
