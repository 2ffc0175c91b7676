"""I/O backends of :class:`memascend.engine.SwapEngine` (private).

A backend moves whole requests and calls each request's completion callback exactly once
with the bytes moved or ``-errno``; the engine front turns that into handle results and typed
errors. ``uring`` drives the native io_uring ring, ``threads`` uses ``os.preadv``/``pwritev``
in a thread pool (works where io_uring is disabled), ``pyuring`` uses the optional pyuring
package.
"""
