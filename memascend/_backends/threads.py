"""The portable backend: positioned reads and writes in a small thread pool.

For machines where io_uring is unavailable (Docker's default seccomp profile, the
``io_uring_disabled`` sysctl, old kernels, liburing missing at build time). Each request runs
``common.transfer`` on one worker; Python releases the GIL inside ``preadv``/``pwritev``, so
``threads`` workers give that many requests in flight.
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from ..background import run_in_background
from .common import FaultFn, Work, transfer


class ThreadsBackend:
    """See the module docstring."""

    name = "threads"

    def __init__(self, workers: int, fault: Optional[FaultFn] = None):
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="memascend-io")
        self._fault = fault
        self._mu = threading.Lock()
        self._stats: dict[str, int] = {"submit_calls": 0, "short_resubmits": 0, "retries": 0}

    def set_file(self, slot: int, fd: int, path: str) -> None:
        """Nothing to register: workers use the descriptor directly."""

    def register_buffer(self, index: int, address: int, nbytes: int) -> bool:
        """Fixed buffers are an io_uring feature: always False here."""
        return False

    def submit(self, works: list[Work]) -> None:
        """Queue every request on the pool."""
        with self._mu:
            self._stats["submit_calls"] += 1
        for w in works:
            try:  # at interpreter shutdown the pool takes no work: a thread of its own
                run_in_background(self._pool, self._run, w, name="memascend-io-exit")
            except RuntimeError:
                self._run(w)  # not even a thread: in the caller

    def _run(self, w: Work) -> None:
        local: dict[str, int] = {}
        try:
            res = transfer(w, self._fault, local)
        except Exception:  # never lose a completion: report the failure on the request
            res = -5
        with self._mu:
            for k, v in local.items():
                self._stats[k] = self._stats.get(k, 0) + v
        w.done_cb(res)

    def stats(self) -> dict[str, int]:
        """Backend counters: submit calls, short resubmits, retries."""
        with self._mu:
            return dict(self._stats, fixed_ops=0)

    def close(self) -> None:
        """Finish queued requests and stop the workers."""
        self._pool.shutdown(wait=True)
