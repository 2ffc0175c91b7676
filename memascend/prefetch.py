"""Learned prefetching: the access order of a training step, and how far ahead to read.

:class:`AccessPlan` records the order in which keys are asked for during the first pass and
replays it afterwards: knowing where in the pass the consumer is, it names the next keys, and
how far away a key's next use is (the eviction rule keeps the buffers needed soonest). A pass
ends at an explicit :meth:`AccessPlan.mark_pass` or, failing that, when the first key of the
recorded order comes back. When the consumer strays from the plan, the plan resynchronises on
the next occurrence of the key and learns keys it has never seen.

:class:`DepthController` sets the prefetch depth: it grows while the consumer has to wait for
I/O, and shrinks when prefetched buffers are evicted without having been used.
"""
from __future__ import annotations

import math


class AccessPlan:
    """Order of accesses learned on the first pass (see module docstring)."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.learning = True
        self.pos = -1
        self.passes = 0
        self.resyncs = 0

    def observe(self, key: str) -> None:
        """Record that ``key`` is being accessed now."""
        if self.learning:
            if self.order and key == self.order[0] and len(self.order) > 1:
                self._end_learning()
            else:
                self.order.append(key)
                self.pos = len(self.order) - 1
                return
        n = len(self.order)
        nxt = (self.pos + 1) % n
        if self.order[nxt] == key:
            self.pos = nxt
        else:
            self.resyncs += 1
            for step in range(2, n + 1):
                i = (self.pos + step) % n
                if self.order[i] == key:
                    self.pos = i
                    break
            else:  # a key the plan has never seen: learn it here
                self.order.insert(nxt, key)
                self.pos = nxt
        if self.pos == n - 1:
            self.passes += 1

    def mark_pass(self) -> None:
        """Declare the end of a pass (e.g. after an optimizer step)."""
        if self.learning and self.order:
            self._end_learning()
            self.pos = -1
        elif not self.learning:
            self.pos = -1

    def _end_learning(self) -> None:
        self.learning = False
        self.passes = 1
        self.pos = 0

    def upcoming(self, n: int) -> list[str]:
        """The next ``n`` distinct keys after the current position (empty while learning)."""
        if self.learning or not self.order or n <= 0:
            return []
        out: list[str] = []
        size = len(self.order)
        for step in range(1, size + 1):
            k = self.order[(self.pos + step) % size]
            if k not in out:
                out.append(k)
                if len(out) == n:
                    break
        return out

    def next_use(self, key: str) -> float:
        """Accesses until ``key`` is needed again (``inf`` if unknown)."""
        if self.learning or not self.order:
            return math.inf
        size = len(self.order)
        for step in range(1, size + 1):
            if self.order[(self.pos + step) % size] == key:
                return step
        return math.inf


class DepthController:
    """Prefetch depth that grows on waits and shrinks on wasted prefetches."""

    def __init__(self, start: int = 2, lo: int = 1, hi: int = 64):
        self.depth = max(lo, min(start, hi))
        self.lo, self.hi = lo, hi
        self.history: list[tuple[int, int]] = [(0, self.depth)]

    def _set(self, depth: int, at: int) -> None:
        depth = max(self.lo, min(depth, self.hi))
        if depth != self.depth:
            self.depth = depth
            self.history.append((at, depth))

    def waited(self, at: int) -> None:
        """The consumer waited for I/O at access ``at``: read further ahead."""
        self._set(self.depth + 1, at)

    def wasted(self, at: int) -> None:
        """A prefetched buffer was evicted unused: read less far ahead."""
        self._set(self.depth - 1, at)
