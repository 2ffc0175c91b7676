"""The io_uring backend: the native ring (``native/ring.c``) plus one reaper thread.

Any thread submits: a batch becomes one ``ma_ring_submit`` call (one ``io_uring_enter`` for
what fits in the ring, the rest queued natively). The reaper thread blocks in
``ma_ring_reap`` with the GIL released and runs each request's callback with that request's
own result; it sleeps on a condition variable while nothing is in flight. Short transfers,
retries and fixed buffers are handled in C.
"""
from __future__ import annotations

import errno
import os
import threading
from typing import Callable, Optional

from .. import _native
from .._native import require
from ..errors import BackendUnavailableError
from .common import FaultFn, Work

_OPS = {"read": 0, "write": 1}


def available() -> tuple[bool, str]:
    """Whether the native ring can run here, and why not."""
    try:
        _ffi, lib = require()
    except Exception as exc:
        return False, str(exc)
    if not lib.MA_BUILT_WITH_URING:
        return False, "native core built without liburing (install liburing-dev, rebuild)"
    rc = lib.ma_ring_probe()
    if rc != 0:
        why = {errno.ENOSYS: "kernel has no io_uring",
               errno.EPERM: "io_uring is disabled (sysctl kernel.io_uring_disabled, or a "
                            "seccomp filter such as Docker's default profile)"}.get(-rc, "")
        return False, f"io_uring_queue_init failed: {os.strerror(-rc)}" + (f"; {why}" if why else "")
    return True, "io_uring available"


class UringBackend:
    """See the module docstring."""

    name = "uring"

    def __init__(self, depth: int, max_files: int, fault: Optional[FaultFn] = None):
        ffi, lib = require()
        ok, why = available()
        if not ok:
            raise BackendUnavailableError(f"backend 'uring' unavailable: {why}")
        out = ffi.new("ma_ring_t **")
        rc = lib.ma_ring_create(depth, max_files, out)
        if rc != 0:
            raise BackendUnavailableError(f"backend 'uring': ma_ring_create failed: "
                                          f"{os.strerror(-rc)}")
        self._ffi, self._lib, self._ring = ffi, lib, out[0]
        self._paths: dict[int, str] = {}
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._next = 1
        self._cv = threading.Condition()
        self._inflight = 0
        self._closing = False
        self._reap_error: Optional[str] = None
        self._fault = fault
        self._handle = ffi.new_handle(self)
        if fault is not None:
            lib.ma_ring_set_fault(self._ring, lib._ma_fault, self._handle)
        self._thread = threading.Thread(target=self._reap_loop, name="memascend-uring-reaper",
                                        daemon=True)
        self._thread.start()

    def set_file(self, slot: int, fd: int, path: str) -> None:
        """Put ``fd`` in the ring's registered file table (``-1`` clears the slot)."""
        rc = self._lib.ma_ring_set_file(self._ring, slot, fd)
        if rc != 0:
            raise OSError(-rc, f"registering {path} with io_uring: {os.strerror(-rc)}")
        self._paths[slot] = path

    def register_buffer(self, index: int, address: int, nbytes: int) -> bool:
        """Register a fixed buffer; False when the kernel refuses (e.g. memlock limit)."""
        if index >= self._lib.ma_ring_buffer_slots(self._ring):
            return False
        rc = self._lib.ma_ring_register_buffer(self._ring, index,
                                               self._ffi.cast("void *", address), nbytes)
        return rc == 0

    def submit(self, works: list[Work]) -> None:
        """Submit a batch with one native call."""
        ffi, lib = self._ffi, self._lib
        n = len(works)
        arr = ffi.new("ma_io_req_t[]", n)
        with self._cv:
            tokens = []
            for w in works:
                tok = self._next
                self._next += 1
                self._callbacks[tok] = w.done_cb
                tokens.append(tok)
            self._inflight += n
            self._cv.notify()
        for i, (w, tok) in enumerate(zip(works, tokens)):
            q = arr[i]
            q.op = _OPS[w.op]
            q.file = w.slot
            q.buf = ffi.cast("void *", w.address)
            q.len = w.nbytes
            q.offset = w.offset
            q.user_data = tok
        acc = ffi.new("unsigned *")
        rc = lib.ma_ring_submit(self._ring, arr, n, acc)
        if rc != 0 and acc[0] == 0:
            with self._cv:
                for tok in tokens:
                    self._callbacks.pop(tok, None)
                self._inflight -= n
            for w in works:
                w.done_cb(rc)

    def _reap_loop(self) -> None:
        ffi, lib = self._ffi, self._lib
        cap = 64
        out = ffi.new("ma_io_cqe_t[]", cap)
        n = ffi.new("unsigned *")
        while True:
            with self._cv:
                while self._inflight == 0 and not self._closing:
                    self._cv.wait()
                if self._inflight == 0 and self._closing:
                    return
            rc = lib.ma_ring_reap(self._ring, out, cap, 1, 200, n)
            if rc != 0:
                self._reap_error = os.strerror(-rc)
            for i in range(n[0]):
                tok = int(out[i].user_data)
                res = int(out[i].res)
                with self._cv:
                    cb = self._callbacks.pop(tok, None)
                    self._inflight -= 1
                if cb is not None:
                    try:
                        cb(res)
                    except Exception:  # a callback bug must not kill the reaper
                        pass

    def _on_fault(self, req, done: int, res: int) -> int:
        path = self._paths.get(int(req.file), "?")
        op = "read" if req.op == 0 else "write"
        return int(self._fault(op, path, int(req.offset), int(req.len), int(done), int(res)))

    def stats(self) -> dict[str, int]:
        """Native ring counters."""
        s = self._ffi.new("ma_ring_stats_t *")
        self._lib.ma_ring_stats(self._ring, s)
        return {"submit_calls": int(s.enter_calls), "short_resubmits": int(s.short_resubmits),
                "retries": int(s.retries), "fixed_ops": int(s.fixed_ops)}

    def close(self) -> None:
        """Wait for in-flight requests, stop the reaper, destroy the ring."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join()
        self._lib.ma_ring_destroy(self._ring)


if _native.AVAILABLE:
    # Trampoline for the native fault hook; only installed when a test injects faults.
    @_native.ffi.def_extern(error=-errno.EIO)
    def _ma_fault(ctx, req, done, res):
        backend = _native.ffi.from_handle(ctx)
        return backend._on_fault(req, done, res)
