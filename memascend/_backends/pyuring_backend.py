"""Backend over the optional ``pyuring`` package (zero-copy ``read_async_ptr``/``write_async_ptr``).

pyuring's context must be used from one thread and submits one request per call, so this
backend owns a single I/O thread: it takes requests from a queue, keeps up to ``depth`` in
flight, reaps completions with ``wait_completion`` (ctypes releases the GIL there), and
resubmits the remainder of short transfers itself. Retries and errors follow the same rules
as the other backends.
"""
from __future__ import annotations

import ctypes
import errno
import queue
import threading
from typing import Optional

from .common import MAX_RETRIES, FaultFn, Work


def available() -> tuple[bool, str]:
    """Whether pyuring can be imported and can set up a ring here."""
    try:
        import pyuring
    except Exception as exc:  # not installed, or its native library fails to load
        return False, f"pyuring not importable ({exc.__class__.__name__}: {exc})"
    try:
        ctx = pyuring.UringCtx(entries=2)
        ctx.close()
    except Exception as exc:
        return False, f"pyuring cannot create a ring ({exc})"
    return True, f"pyuring {getattr(pyuring, '__version__', '?')}"


class _Op:
    __slots__ = ("work", "done", "retries")

    def __init__(self, work: Work):
        self.work = work
        self.done = 0
        self.retries = 0


class PyuringBackend:
    """See the module docstring."""

    name = "pyuring"

    def __init__(self, depth: int, fault: Optional[FaultFn] = None):
        import pyuring

        self._pyuring = pyuring
        self._depth = depth
        self._fault = fault
        self._q: "queue.Queue[Optional[Work]]" = queue.Queue()
        self._stats = {"submit_calls": 0, "short_resubmits": 0, "retries": 0, "fixed_ops": 0}
        self._mu = threading.Lock()
        ready = threading.Event()
        self._init_error: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, args=(ready,),
                                        name="memascend-pyuring", daemon=True)
        self._thread.start()
        ready.wait()
        if self._init_error:
            raise self._init_error[0]

    def set_file(self, slot: int, fd: int, path: str) -> None:
        """Requests use the descriptor directly."""

    def register_buffer(self, index: int, address: int, nbytes: int) -> bool:
        """Not supported through pyuring's asynchronous API."""
        return False

    def submit(self, works: list[Work]) -> None:
        """Hand requests to the I/O thread."""
        for w in works:
            self._q.put(w)

    def _issue(self, ctx, op: _Op, tag: int) -> None:
        w = op.work
        ptr = ctypes.c_void_p(w.address + op.done)
        fn = ctx.read_async_ptr if w.op == "read" else ctx.write_async_ptr
        fn(w.fd, ptr, w.nbytes - op.done, w.offset + op.done, tag)
        self._stats["submit_calls"] += 1

    def _loop(self, ready: threading.Event) -> None:
        try:
            ctx = self._pyuring.UringCtx(entries=max(2, self._depth))
        except BaseException as exc:
            self._init_error.append(exc)
            ready.set()
            return
        ready.set()
        inflight: dict[int, _Op] = {}
        backlog: list[Work] = []
        tag = 0
        closing = False
        try:
            while True:
                # take new work: block only when nothing is in flight
                try:
                    while True:
                        item = self._q.get(block=not inflight and not backlog and not closing)
                        if item is None:
                            closing = True
                            break
                        backlog.append(item)
                        if not self._q.qsize():
                            break
                except queue.Empty:
                    pass
                while backlog and len(inflight) < self._depth:
                    w = backlog.pop(0)
                    tag += 1
                    op = _Op(w)
                    try:
                        self._issue(ctx, op, tag)
                        inflight[tag] = op
                    except Exception as exc:
                        w.done_cb(-(getattr(exc, "errno", None) or errno.EIO))
                if not inflight:
                    if closing and not backlog:
                        return
                    continue
                ud, res = ctx.wait_completion()
                op = inflight.pop(ud, None)
                if op is None:
                    continue
                self._complete(ctx, op, ud, res, inflight)
        finally:
            try:
                ctx.close()
            except Exception:
                pass

    def _complete(self, ctx, op: _Op, ud: int, res: int, inflight: dict) -> None:
        w = op.work
        if self._fault is not None:
            res = self._fault(w.op, w.path, w.offset, w.nbytes, op.done, res)
        if res in (-errno.EAGAIN, -errno.EINTR) and op.retries < MAX_RETRIES:
            op.retries += 1
            self._stats["retries"] += 1
        elif res < 0:
            w.done_cb(res)
            return
        elif res == 0:
            w.done_cb(op.done if w.op == "read" else -errno.EIO)
            return
        else:
            if op.done + res < w.nbytes:
                self._stats["short_resubmits"] += 1
            op.done += res
            if op.done >= w.nbytes:
                w.done_cb(op.done)
                return
        try:
            self._issue(ctx, op, ud)
            inflight[ud] = op
        except Exception as exc:
            w.done_cb(-(getattr(exc, "errno", None) or errno.EIO))

    def stats(self) -> dict[str, int]:
        """Backend counters."""
        return dict(self._stats)

    def close(self) -> None:
        """Finish queued requests, then stop the I/O thread."""
        self._q.put(None)
        self._thread.join()
