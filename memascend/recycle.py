"""Freed pinned leases kept for reuse: the one free-list structure both recyclers share.

Mapping, populating and locking a fresh lease costs about 0.7 ms per MiB, so a lease that is
given back is better kept for the next request of its size. Two owners do that with different
caps: the swapper's :class:`memascend.buffers.BufferPool` (every lease held, in use or free,
under a byte budget; a free lease up to ``slack`` larger may serve a request) and the DeepSpeed
drop-in's :class:`memascend.integrations.deepspeed.runtime.Runtime` (leases of exactly the
requested size, kept while in-use plus kept bytes stay under the peak in use). What they share
lives here: :class:`FreeLeases` files leases under a size key, finds the best one for a
request, sheds the largest first to free a number of bytes, and counts the bytes it holds.
It never releases a lease itself: shed and drained leases are returned, and the owner releases
them (outside its own lock, and with its own counters). Not thread-safe: owners call it under
their locks.
"""
from __future__ import annotations

from typing import Iterator, Optional

from .pool import Lease


class FreeLeases:
    """Leases kept for reuse, filed by a size key (see the module docstring).

    ``bytes`` is the sum of the kept leases' sizes (``Lease.size``, what each holds).
    """

    def __init__(self) -> None:
        self._lists: dict[int, list[Lease]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return sum(len(lst) for lst in self._lists.values())

    def __iter__(self) -> Iterator[Lease]:
        for lst in self._lists.values():
            yield from lst

    def put(self, key: int, lease: Lease) -> None:
        """Keep ``lease`` under ``key``."""
        self._lists.setdefault(key, []).append(lease)
        self.bytes += lease.size

    def take(self, key: int, slack: float = 0.0) -> Optional[Lease]:
        """A kept lease filed under ``key``, else (with ``slack``) one under the smallest key
        above it and at most ``key * (1 + slack)``; None if there is none."""
        fit: Optional[int] = key if self._lists.get(key) else None
        if fit is None and slack > 0:
            fit = min((k for k, lst in self._lists.items()
                       if lst and key < k <= key * (1 + slack)), default=None)
        if fit is None:
            return None
        lst = self._lists[fit]
        lease = lst.pop()
        if not lst:
            del self._lists[fit]
        self.bytes -= lease.size
        return lease

    def shed(self, need: int, keep: Optional[int] = None) -> list[Lease]:
        """Remove kept leases, those under the largest keys first (never under ``keep``),
        until their sizes add up to at least ``need`` bytes or none is left; returns them
        for the owner to release."""
        out: list[Lease] = []
        for key in sorted(self._lists, reverse=True):
            if need <= 0:
                break
            if key == keep:
                continue
            lst = self._lists[key]
            while lst and need > 0:
                lease = lst.pop()
                self.bytes -= lease.size
                need -= lease.size
                out.append(lease)
            if not lst:
                del self._lists[key]
        return out

    def drain(self) -> list[Lease]:
        """Remove and return every kept lease."""
        out = list(self)
        self._lists.clear()
        self.bytes = 0
        return out
