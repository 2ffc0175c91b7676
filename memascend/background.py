"""Work handed to helper threads, also while the interpreter shuts down.

Once Python's threading shutdown has begun (before ``atexit`` handlers run), a
``ThreadPoolExecutor`` refuses new work with RuntimeError. Writes still queued then, or
issued by an ``atexit`` handler that closes a store, must still run: :func:`run_in_background`
falls back to a thread of its own. The swap store's helper work and the portable I/O
backend's requests go through it.
"""
from __future__ import annotations

import threading
from concurrent.futures import Executor
from typing import Any, Callable


def run_in_background(executor: Executor, fn: Callable[..., Any], *args: Any,
                      name: str = "memascend-helper") -> None:
    """Run ``fn(*args)`` on ``executor``; if it refuses (interpreter shutdown), on a daemon
    thread of its own.

    Raises
    ------
    RuntimeError
        Neither could start (the interpreter is finalizing).
    """
    try:
        executor.submit(fn, *args)
    except RuntimeError:
        threading.Thread(target=fn, args=args, name=name, daemon=True).start()
