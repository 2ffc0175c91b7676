"""The swapper's read-ahead: :class:`Prefetching`, mixed into
:class:`memascend.swapper.TensorSwapper`.

Keys to read ahead come from the consumer (:meth:`Prefetching.prefetch`, an explicit queue) or
from the learned access plan within the current prefetch depth. One prefetch thread per
swapper submits them, one read per lock hold, so submission stays off the consumer's thread
and the consumer never waits behind a batch; it wakes on every kick (a completion, a release)
and every 50 ms. Prefetch threads still running at interpreter exit are stopped first.
"""
from __future__ import annotations

import atexit
import threading
import weakref
from typing import Any, Iterable, Optional

# Prefetch threads still running at interpreter exit are stopped first (before the engines
# close: handlers run last-registered first). A daemon thread that drops a tensor view while
# the interpreter finalizes is killed inside torch's destructor and aborts the process.
_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()


@atexit.register
def _stop_live_prefetchers() -> None:
    for sw in list(_LIVE):
        try:
            sw._stop_prefetcher(timeout=5.0)
        except Exception:  # best effort at exit
            pass


class Prefetching:
    """Read-ahead of the swapper (see the module docstring); state is the swapper's."""

    def prefetch(self, keys: Iterable[str]) -> None:
        """Read these keys ahead, in order, as the budget allows (never blocks).

        Raises
        ------
        KeyNotFoundError
            A key is neither registered nor stored.
        """
        self._check_open()
        with self._cv:
            for k in keys:
                self._meta_of(k)
                self._queue.append(k)
        self._kick()

    def mark_pass(self) -> None:
        """Mark the end of a pass (e.g. a training step) for the learned prefetch plan."""
        with self._cv:
            self.plan.mark_pass()
            self._pass += 1
            self._prefetch_failed.clear()
        self._kick()

    def _kick(self) -> None:
        """Wake the prefetch thread (it submits reads off the consumer's thread)."""
        self._kick_ev.set()

    def _pump(self) -> bool:
        """Start at most one prefetch read: the explicit queue first, then the plan's next
        keys within the current depth. True if one started (call again for more)."""
        while self._queue:
            k = self._queue.popleft()
            if k in self._res:
                continue
            if self._start_load(k, blocking=False, prefetched=True) is None:
                self._queue.appendleft(k)  # no budget now; a completion or release kicks again
                return False
            return True
        if not self.config.plan_prefetch:
            return False
        for k in self.plan.upcoming(self.depth.depth):
            if k in self._res or k in self._prefetch_failed:
                continue
            if k not in self._meta and k not in self.store:
                continue
            try:
                r = self._start_load(k, blocking=False, prefetched=True,
                                     before=self.plan.next_use(k))
            except Exception:
                # The consumer's own swap_in of this key will raise the error; do not retry
                # it in the background until the next pass.
                self._prefetch_failed.add(k)
                self._c["prefetch_errors"] += 1
                return True
            return r is not None
        return False

    def _prefetch_loop(self) -> None:
        """The prefetch thread: on every kick (and every 50 ms), start reads one at a time,
        taking the lock once per read so the consumer never waits behind a batch."""
        while True:
            self._kick_ev.wait(0.05)
            self._kick_ev.clear()
            while True:
                with self._cv:
                    if self._stopping:
                        return
                    try:
                        started = self._pump()
                    except Exception:  # e.g. a queued key that vanished: drop it, go on
                        self._c["prefetch_errors"] += 1
                        started = True
                if not started:
                    break

    def _stop_prefetcher(self, timeout: Optional[float] = None) -> None:
        with self._cv:
            self._stopping = True
        self._kick()
        if self._prefetcher is not threading.current_thread():
            self._prefetcher.join(timeout)
