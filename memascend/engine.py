"""SwapEngine: moves bytes between memory and swap files, asynchronously and checked.

The engine owns no files and no memory: callers register file descriptors (the swap store
does) and pass addresses of memory they keep alive (pool leases). Every request returns a
:class:`~memascend.handle.SwapHandle` whose result is the byte count; a failure becomes a
:class:`~memascend.errors.SwapIOError` carrying errno, path, offset, byte count and tensor key,
and a read that comes back short becomes a :class:`~memascend.errors.ShortIOError`. Requests
larger than ``chunk_bytes`` are split so that one big tensor still keeps the queue full.

Backends: ``uring`` (native io_uring ring), ``threads`` (portable ``preadv``/``pwritev`` pool),
``pyuring`` (optional package). ``auto`` picks ``uring`` when it can run, else ``threads``;
``engine.backend_reason`` says why. A fault injector (tests) sees every intermediate result.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .config import from_env, parse_size, resolve
from .errors import BackendUnavailableError, ConfigError, ShortIOError, SwapIOError
from .handle import SwapHandle, gather
from ._backends.common import FaultFn, Work

BACKENDS = ("auto", "uring", "threads", "pyuring")

# Engines still open at interpreter exit are closed first (in-flight I/O finishes and the
# completion threads stop) so no callback runs while the interpreter is being torn down.
_LIVE: "weakref.WeakSet[SwapEngine]" = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    for eng in list(_LIVE):
        try:
            eng.close()
        except Exception:  # best effort at exit
            pass


@dataclass(frozen=True)
class EngineConfig:
    """Options of a :class:`SwapEngine` (environment: ``MEMASCEND_ENGINE_<FIELD>``).

    Attributes
    ----------
    backend:
        ``"auto"`` (default), ``"uring"``, ``"threads"`` or ``"pyuring"``.
    queue_depth:
        Requests in flight at most (io_uring ring depth; default 32).
    threads:
        Workers of the ``threads`` backend (default 4).
    max_files:
        Slots in the registered file table (default 64).
    chunk_bytes:
        Requests larger than this are split into pieces of this size (default 16 MiB,
        a multiple of 4096).
    """

    backend: str = "auto"
    queue_depth: int = 32
    threads: int = 4
    max_files: int = 64
    chunk_bytes: int = 16 << 20

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ConfigError("backend", f"must be one of {BACKENDS}, got {self.backend!r}")
        for key, lo, hi in (("queue_depth", 1, 4096), ("threads", 1, 256),
                            ("max_files", 1, 65536)):
            value = getattr(self, key)
            if not isinstance(value, int) or not lo <= value <= hi:
                raise ConfigError(key, f"must be an integer in [{lo}, {hi}], got {value!r}")
        object.__setattr__(self, "chunk_bytes", parse_size("chunk_bytes", self.chunk_bytes))
        if self.chunk_bytes < 4096 or self.chunk_bytes % 4096:
            raise ConfigError("chunk_bytes", f"must be a positive multiple of 4096, got "
                                             f"{self.chunk_bytes}")

    @classmethod
    def from_env(cls, **overrides: Any) -> "EngineConfig":
        """Defaults, then ``MEMASCEND_ENGINE_*`` variables, then ``overrides`` (not None)."""
        return from_env(cls, "ENGINE", overrides)


@dataclass(frozen=True)
class IORequest:
    """One transfer: ``nbytes`` between memory at ``address`` and ``file`` at ``offset``."""

    op: str
    file: int
    address: int
    nbytes: int
    offset: int
    key: Optional[str] = None


@dataclass(frozen=True)
class EngineStats:
    """Counters of an engine (a snapshot). Bytes count completed transfers only."""

    backend: str
    submitted: int
    completed: int
    errors: int
    bytes_read: int
    bytes_written: int
    submit_calls: int
    short_resubmits: int
    retries: int
    fixed_ops: int

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict."""
        return dataclasses.asdict(self)


def probe_backends() -> dict[str, tuple[bool, str]]:
    """Which backends can run here: ``{name: (available, reason)}``."""
    from ._backends import pyuring_backend, uring

    return {"uring": uring.available(), "threads": (True, "always available"),
            "pyuring": pyuring_backend.available()}


def _make_backend(cfg: EngineConfig, fault: Optional[FaultFn]) -> tuple[Any, str]:
    from ._backends import pyuring_backend, uring
    from ._backends.threads import ThreadsBackend

    if cfg.backend in ("auto", "uring"):
        ok, why = uring.available()
        if ok:
            return uring.UringBackend(cfg.queue_depth, cfg.max_files, fault), \
                ("chosen by auto: " if cfg.backend == "auto" else "asked for: ") + why
        if cfg.backend == "uring":
            raise BackendUnavailableError(f"backend 'uring' unavailable: {why}; use "
                                          "backend='threads' (portable) or 'auto'")
        return ThreadsBackend(cfg.threads, fault), f"chosen by auto: io_uring unusable ({why})"
    if cfg.backend == "pyuring":
        ok, why = pyuring_backend.available()
        if not ok:
            raise BackendUnavailableError(f"backend 'pyuring' unavailable: {why}; install it "
                                          "with the `pyuring` extra, or use 'auto'")
        return pyuring_backend.PyuringBackend(cfg.queue_depth, fault), f"asked for: {why}"
    return ThreadsBackend(cfg.threads, fault), "asked for: portable preadv/pwritev pool"


class SwapEngine:
    """Asynchronous, checked I/O between memory and registered files (see module docstring).

    Parameters
    ----------
    backend, queue_depth:
        See :class:`EngineConfig`; other fields as keyword options.
    fault:
        Test hook ``fault(op, path, offset, nbytes, done, res) -> res`` applied to every
        intermediate result (turn a completion into a short transfer or ``-errno``).

    Raises
    ------
    ConfigError
        Bad or unknown option.
    BackendUnavailableError
        A backend asked for by name cannot run here.
    """

    def __init__(self, backend: Optional[str] = None, queue_depth: Optional[int] = None, *,
                 config: Optional[EngineConfig] = None, fault: Optional[FaultFn] = None,
                 **options: Any):
        overrides = dict(options, backend=backend, queue_depth=queue_depth)
        config = resolve(EngineConfig, "ENGINE", config, overrides)
        self.config = config
        self._backend, self.backend_reason = _make_backend(config, fault)
        self.backend: str = self._backend.name
        self._mu = threading.Lock()
        self._files: dict[int, tuple[int, str]] = {}
        self._free_slots = list(range(config.max_files - 1, -1, -1))
        self._buffers: dict[int, tuple[int, int]] = {}
        self._counts = {"submitted": 0, "completed": 0, "errors": 0, "bytes_read": 0,
                        "bytes_written": 0}
        self._closed = False
        _LIVE.add(self)

    # ---- files and buffers ----
    def register_file(self, fd: int, path: str) -> int:
        """Register an open descriptor; returns the file id used in requests.

        Raises
        ------
        SwapIOError
            The file table is full or the kernel refused the registration.
        """
        with self._mu:
            if not self._free_slots:
                raise SwapIOError(24, f"engine file table full ({self.config.max_files} files)",
                                  path=path)
            slot = self._free_slots.pop()
        try:
            self._backend.set_file(slot, fd, path)
        except OSError as exc:
            with self._mu:
                self._free_slots.append(slot)
            raise SwapIOError(exc.errno or 5, str(exc), path=path) from exc
        with self._mu:
            self._files[slot] = (fd, path)
        return slot

    def unregister_file(self, file: int) -> None:
        """Forget a file id (no request on it may be in flight)."""
        with self._mu:
            entry = self._files.pop(file, None)
            if entry is None:
                return
        try:
            self._backend.set_file(file, -1, entry[1])
        finally:
            with self._mu:
                self._free_slots.append(file)

    def register_buffer(self, address: int, nbytes: int) -> bool:
        """Register memory as an io_uring fixed buffer (e.g. a pool arena).

        Returns False when the backend has no fixed buffers or the kernel refused (memlock
        limit): I/O on that memory then simply uses the ordinary path.
        """
        with self._mu:
            used = {i for i in self._buffers}
            index = next((i for i in range(64) if i not in used), None)
        if index is None:
            return False
        ok = self._backend.register_buffer(index, address, nbytes)
        if ok:
            with self._mu:
                self._buffers[index] = (address, nbytes)
        return ok

    def unregister_buffer(self, address: int) -> None:
        """Undo :meth:`register_buffer` for the buffer starting at ``address``."""
        with self._mu:
            index = next((i for i, (a, _n) in self._buffers.items() if a == address), None)
            if index is None:
                return
            del self._buffers[index]
        self._backend.register_buffer(index, 0, 0)

    def path_of(self, file: int) -> str:
        """The path registered for a file id."""
        return self._files[file][1]

    # ---- requests ----
    def read(self, file: int, address: int, nbytes: int, offset: int,
             key: Optional[str] = None) -> SwapHandle:
        """Read ``nbytes`` at ``offset`` of ``file`` into memory at ``address``."""
        return self.submit([IORequest("read", file, address, nbytes, offset, key)])[0]

    def write(self, file: int, address: int, nbytes: int, offset: int,
              key: Optional[str] = None) -> SwapHandle:
        """Write ``nbytes`` from memory at ``address`` to ``file`` at ``offset``."""
        return self.submit([IORequest("write", file, address, nbytes, offset, key)])[0]

    def submit(self, requests: Sequence[IORequest]) -> list[SwapHandle]:
        """Submit a batch (one backend call); one handle per request, result = bytes moved.

        Raises
        ------
        ValueError
            A request has a bad op, size, offset or unknown file id (nothing is submitted).
        """
        if self._closed:
            raise ValueError("the engine is closed")
        handles: list[SwapHandle] = []
        works: list[Work] = []
        chunk = self.config.chunk_bytes
        for req in requests:
            if req.op not in ("read", "write"):
                raise ValueError(f"unknown op {req.op!r} (key={req.key})")
            if req.nbytes <= 0 or req.offset < 0:
                raise ValueError(f"bad request: nbytes={req.nbytes} offset={req.offset} "
                                 f"(key={req.key})")
            with self._mu:
                entry = self._files.get(req.file)
            if entry is None:
                raise ValueError(f"unknown file id {req.file} (key={req.key})")
        for req in requests:
            fd, path = self._files[req.file]
            what = f"{req.op} of {req.nbytes} B at {path}:{req.offset}" + \
                (f" ({req.key!r})" if req.key else "")
            parts = []
            for start in range(0, req.nbytes, chunk):
                n = min(chunk, req.nbytes - start)
                h = SwapHandle(what)
                works.append(Work(req.op, req.file, fd, path, req.address + start, n,
                                  req.offset + start, self._completer(h, req, start, n, path)))
                parts.append(h)
            handles.append(parts[0] if len(parts) == 1 else gather(parts, what, combine=sum))
        with self._mu:
            self._counts["submitted"] += len(works)
        if works:
            self._backend.submit(works)
        return handles

    def _completer(self, handle: SwapHandle, req: IORequest, start: int, n: int, path: str):
        def done(res: int) -> None:
            with self._mu:
                self._counts["completed"] += 1
                if res == n:
                    self._counts["bytes_read" if req.op == "read" else "bytes_written"] += n
                else:
                    self._counts["errors"] += 1
            if res == n:
                handle.set_result(n)
            elif res >= 0:
                handle.set_exception(ShortIOError(
                    5, f"short {req.op}: {res} of {n} bytes (end of file?)", path=path,
                    offset=req.offset + start, nbytes=n, key=req.key))
            else:
                handle.set_exception(SwapIOError(
                    -res, f"{req.op} failed: {os.strerror(-res)}", path=path,
                    offset=req.offset + start, nbytes=n, key=req.key))
        return done

    # ---- lifecycle ----
    def stats(self) -> EngineStats:
        """A snapshot of the counters."""
        b = self._backend.stats()
        with self._mu:
            c = dict(self._counts)
        return EngineStats(backend=self.backend, submit_calls=b.get("submit_calls", 0),
                           short_resubmits=b.get("short_resubmits", 0),
                           retries=b.get("retries", 0), fixed_ops=b.get("fixed_ops", 0), **c)

    def close(self) -> None:
        """Finish in-flight requests and release the backend. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._backend.close()

    def __enter__(self) -> "SwapEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
