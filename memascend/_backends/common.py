"""Pieces shared by the Python-side backends: the request record and a checked transfer loop.

``transfer`` moves one request with positioned reads or writes and never reports partial work
as success: a short transfer continues with the remainder, EAGAIN/EINTR are retried a bounded
number of times, any other error ends the request with ``-errno``, and a read that meets end
of file returns the bytes it got (less than asked), which the engine reports as a short read.
An optional fault injector may rewrite every intermediate result, exactly like the native
ring's fault hook.
"""
from __future__ import annotations

import errno
import os
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .. import _native

MAX_RETRIES = 32

#: fault(op, path, offset, nbytes, done, res) -> res, for tests
FaultFn = Callable[[str, str, int, int, int, int], int]


@dataclass
class Work:
    """One request as a backend sees it."""

    op: str          # "read" | "write"
    slot: int        # file slot
    fd: int
    path: str
    address: int
    nbytes: int
    offset: int
    done_cb: Callable[[int], None]


def buffer_at(address: int, nbytes: int) -> memoryview:
    """A writable memoryview over raw memory (the caller keeps the memory alive)."""
    ffi, _lib = _native.require()
    return memoryview(ffi.buffer(ffi.cast("char *", address), nbytes))


def transfer(w: Work, fault: Optional[FaultFn] = None, stats: Optional[dict] = None) -> int:
    """Move all of ``w`` with pread/pwrite; return ``w.nbytes``, fewer at EOF, or ``-errno``."""
    done = 0
    retries = 0
    mv = buffer_at(w.address, w.nbytes)
    while done < w.nbytes:
        piece = mv[done:]
        try:
            if w.op == "read":
                res = os.preadv(w.fd, [piece], w.offset + done)
            else:
                res = os.pwritev(w.fd, [piece], w.offset + done)
        except OSError as exc:
            res = -(exc.errno or errno.EIO)
        if fault is not None:
            res = fault(w.op, w.path, w.offset, w.nbytes, done, res)
        if res in (-errno.EAGAIN, -errno.EINTR) and retries < MAX_RETRIES:
            retries += 1
            if stats is not None:
                stats["retries"] = stats.get("retries", 0) + 1
            time.sleep(0.0005 * retries)
            continue
        if res < 0:
            return res
        if res == 0:
            return done if w.op == "read" else -errno.EIO
        if res < len(piece) and stats is not None:
            stats["short_resubmits"] = stats.get("short_resubmits", 0) + 1
        done += res
    return done
