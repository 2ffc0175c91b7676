"""SwapHandle: the future every asynchronous memascend operation returns.

A handle is completed exactly once, with a result or an exception, by whichever thread
finishes the operation (an engine's reaper, a worker). ``done()`` polls, ``wait(timeout)``
blocks and returns the result or raises the operation's error, ``result()`` is ``wait()``.
The blocking form of every async call is that call plus ``.wait()``. ``gather`` joins several
handles into one that completes when all have, with the first error if any failed.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Iterable

_UNSET = object()


class SwapHandle:
    """Future of one asynchronous operation.

    Parameters
    ----------
    what:
        A short description used in timeout messages (e.g. ``"read of 'layer.0.weight'"``).
    """

    __slots__ = ("what", "_event", "_result", "_exc", "_callbacks", "_mu")

    def __init__(self, what: str = "operation"):
        self.what = what
        self._event = threading.Event()
        self._result: Any = _UNSET
        self._exc: BaseException | None = None
        self._callbacks: list[Callable[["SwapHandle"], None]] = []
        self._mu = threading.Lock()

    @classmethod
    def completed(cls, result: Any, what: str = "operation") -> "SwapHandle":
        """A handle that is already done with ``result``."""
        h = cls(what)
        h.set_result(result)
        return h

    def done(self) -> bool:
        """True once the operation has finished (successfully or not)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """Block until done; return the result or raise the operation's error.

        Raises
        ------
        TimeoutError
            Not done within ``timeout`` seconds (the operation goes on).
        """
        if not self._event.wait(timeout):
            raise TimeoutError(f"{self.what} not done after {timeout} s")
        if self._exc is not None:
            raise self._exc
        return self._result

    def result(self, timeout: float | None = None) -> Any:
        """Same as :meth:`wait`."""
        return self.wait(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Block until done and return the error, or None on success."""
        if not self._event.wait(timeout):
            raise TimeoutError(f"{self.what} not done after {timeout} s")
        return self._exc

    def add_done_callback(self, fn: Callable[["SwapHandle"], None]) -> None:
        """Call ``fn(handle)`` when done (at once if already done), in the completing thread."""
        with self._mu:
            if not self._event.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    # ---- completion (for engines and stores) ----
    def set_result(self, result: Any) -> None:
        """Complete successfully. A second completion is ignored."""
        self._finish(result, None)

    def set_exception(self, exc: BaseException) -> None:
        """Complete with an error. A second completion is ignored."""
        self._finish(_UNSET, exc)

    def _finish(self, result: Any, exc: BaseException | None) -> None:
        with self._mu:
            if self._event.is_set():
                return
            self._result = result
            self._exc = exc
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def __repr__(self) -> str:
        state = "pending" if not self.done() else ("failed" if self._exc else "done")
        return f"<SwapHandle {self.what} {state}>"


def gather(handles: Iterable[SwapHandle], what: str = "operations",
           combine: Callable[[list[Any]], Any] | None = None) -> SwapHandle:
    """One handle for many: done when all are; result ``combine(results)`` (default: list).

    The first error (in completion order) becomes the joint handle's error, but only after
    every part has finished, so no part is still writing into a buffer when the caller sees
    the failure.
    """
    parts = list(handles)
    joint = SwapHandle(what)
    if not parts:
        joint.set_result(combine([]) if combine else [])
        return joint
    left = [len(parts)]
    first_exc: list[BaseException] = []
    mu = threading.Lock()

    def one_done(h: SwapHandle) -> None:
        exc = h.exception(0)
        with mu:
            if exc is not None and not first_exc:
                first_exc.append(exc)
            left[0] -= 1
            last = left[0] == 0
        if last:
            if first_exc:
                joint.set_exception(first_exc[0])
            else:
                results = [p.wait(0) for p in parts]
                try:
                    joint.set_result(combine(results) if combine else results)
                except BaseException as err:  # a failing combine must not hang the waiter
                    joint.set_exception(err)

    for p in parts:
        p.add_done_callback(one_done)
    return joint
