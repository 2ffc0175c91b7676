"""Tuned I/O settings: measure the swap folder's filesystem once, apply the best by default.

:func:`measure` writes and then reads a scratch file in the swap folder with O_DIRECT through
:class:`~memascend.engine.SwapEngine`, for each engine backend x queue depth x request size
(``chunk_bytes``) x buffer kind (the pinned pool with ``huge_pages="auto"``, i.e. THP-advised
2 MiB pieces where the kernel allows, or ``"off"``, small pages), within a time limit, and
returns one :class:`Trial` per combination. The best trial has the highest mean of write and
read throughput. :func:`save` writes its settings to the *tuned file*; from then on every
engine and pool built without explicit settings uses them.

Precedence of a setting, first wins: an explicit argument (``SwapEngine(queue_depth=...)``, an
``EngineConfig``, ``offload_model``'s options, the DeepSpeed drop-in's ``aio`` block), the
environment (``MEMASCEND_ENGINE_*``, ``MEMASCEND_POOL_*``), the tuned file, the built-in
default. The tuned file is ``$MEMASCEND_TUNED`` when set (``off`` ignores any), else
``$XDG_CONFIG_HOME/memascend/tuned.json`` (``~/.config/memascend/tuned.json``). It holds the
settings per section (``engine``: backend, queue_depth, chunk_bytes; ``pool``: huge_pages) and
what was measured. A damaged tuned file or one with an unknown setting is a ``ConfigError``
naming it; ``memascend info`` shows which file is in effect.
"""
from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

from .errors import ConfigError, SwapIOError

VERSION = 1
SECTIONS = {"engine": ("backend", "queue_depth", "chunk_bytes"), "pool": ("huge_pages",)}
DEPTHS = (4, 16, 64)
CHUNKS = (1 << 20, 4 << 20, 16 << 20)
HUGE = ("auto", "off")


def tuned_path() -> Optional[str]:
    """The tuned file in effect (None: ``MEMASCEND_TUNED=off``). It need not exist."""
    env = os.environ.get("MEMASCEND_TUNED")
    if env is not None and env.strip():
        return None if env.strip().lower() in ("off", "none", "0") else env
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "memascend", "tuned.json")


_CACHE: dict[str, tuple[float, dict[str, Any]]] = {}


def load(path: Optional[str] = None) -> Optional[dict[str, Any]]:
    """The tuned file's contents (None when there is none in effect).

    Raises
    ------
    ConfigError
        The file is unreadable, not JSON, of another version, or names an unknown setting.
    """
    path = tuned_path() if path is None else path
    if path is None:
        return None
    try:
        mtime = os.stat(path).st_mtime
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError("MEMASCEND_TUNED", f"cannot read the tuned file {path}: {exc}") from exc
    hit = _CACHE.get(path)
    if hit is not None and hit[0] == mtime:
        return hit[1]
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise ConfigError("MEMASCEND_TUNED", f"cannot read the tuned file {path}: {exc} "
                          "(run `memascend tune` again, or remove it)") from exc
    if not isinstance(doc, dict) or doc.get("version") != VERSION or \
            not isinstance(doc.get("settings"), dict):
        raise ConfigError("MEMASCEND_TUNED", f"{path} is not a memascend tuned file of version "
                          f"{VERSION} (run `memascend tune` again, or remove it)")
    for section, values in doc["settings"].items():
        known = SECTIONS.get(section)
        bad = [k for k in (values or {}) if known is None or k not in known]
        if known is None or bad or not isinstance(values, dict):
            raise ConfigError("MEMASCEND_TUNED", f"{path}: unknown setting "
                              f"{section}.{bad[0] if bad else ''} (known: " + ", ".join(
                                  f"{s}.{k}" for s, ks in SECTIONS.items() for k in ks) + ")")
    _CACHE[path] = (mtime, doc)
    return doc


def tuned_settings(section: str) -> dict[str, Any]:
    """The tuned file's settings for ``section`` (``"ENGINE"``, ``"POOL"``, ...); empty when
    none apply. Used by :func:`memascend.config.from_env` below the environment."""
    doc = load()
    if doc is None:
        return {}
    return dict(doc["settings"].get(section.lower(), {}))


@dataclass(frozen=True)
class Trial:
    """One measured combination: settings and write/read throughput (bytes per second)."""

    backend: str
    queue_depth: int
    chunk_bytes: int
    huge_pages: str
    write_bps: float
    read_bps: float

    @property
    def score(self) -> float:
        """The mean of write and read throughput (what the best trial maximises)."""
        return (self.write_bps + self.read_bps) / 2

    def to_dict(self) -> dict[str, Any]:
        """The fields and the score."""
        return dict(asdict(self), score=self.score)


def combinations(backends: Sequence[str], depths: Sequence[int] = DEPTHS,
                 chunks: Sequence[int] = CHUNKS, huge: Sequence[str] = HUGE) -> list[tuple]:
    """Every (backend, queue depth, chunk, huge pages) to measure."""
    return [(b, d, c, h) for b in backends for d in depths for c in chunks for h in huge]


def measure(swap_dir: str, size: int, *, backends: Optional[Sequence[str]] = None,
            depths: Sequence[int] = DEPTHS, chunks: Sequence[int] = CHUNKS,
            huge: Sequence[str] = HUGE, time_limit: float = 120.0,
            progress: Optional[Callable[[int, int, str], None]] = None) -> list[Trial]:
    """Measure every combination (see the module docstring) on a ``size``-byte scratch file in
    ``swap_dir`` (removed afterwards); stops early, with the trials so far, once
    ``time_limit`` seconds have passed. ``progress(done, total, status)`` after each trial.

    Raises
    ------
    ConfigError
        ``size`` is not a positive multiple of 4096 at least the largest chunk, or no backend
        is available.
    SwapIOError
        The file cannot be created (e.g. ENOSPC) or an I/O failed.
    """
    from .engine import probe_backends
    from .files import private_dirs

    if backends is None:
        backends = [b for b, (ok, _why) in probe_backends().items() if ok and b != "pyuring"]
    if not backends:
        raise ConfigError("backend", "no swap engine backend is available here")
    if size <= 0 or size % 4096 or size < max(chunks):
        raise ConfigError("size", f"must be a positive multiple of 4096 and at least the "
                                  f"largest request ({max(chunks)} bytes), got {size}")
    created = not os.path.isdir(swap_dir)
    private_dirs(swap_dir)
    try:
        return _measure_in(swap_dir, size, backends, depths, chunks, huge, time_limit,
                           progress)
    finally:
        if created:
            try:
                os.rmdir(swap_dir)  # made here and left empty
            except OSError:
                pass


def _measure_in(swap_dir: str, size: int, backends: Sequence[str], depths: Sequence[int],
                chunks: Sequence[int], huge: Sequence[str], time_limit: float,
                progress: Optional[Callable[[int, int, str], None]]) -> list[Trial]:
    from .files import private_open

    path = os.path.join(swap_dir, f".memascend-tune-{os.getpid()}.tmp")
    todo = combinations(backends, depths, chunks, huge)
    trials: list[Trial] = []
    t_end = time.monotonic() + time_limit
    try:
        fd = private_open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise SwapIOError(exc.errno or errno.EIO, f"cannot create the scratch file: "
                              f"{exc.strerror}", path=path) from exc
        raise ConfigError("swap_dir", f"{swap_dir} does not support O_DIRECT (tmpfs?): "
                                      "swap areas there bypass nothing to tune") from exc
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            raise SwapIOError(exc.errno or errno.EIO, f"cannot allocate {size} bytes for the "
                              f"scratch file: {exc.strerror}", path=path, nbytes=size) from exc
        for i, (backend, depth, chunk, hp) in enumerate(todo):
            if trials and time.monotonic() > t_end:
                break
            trials.append(_trial(fd, path, size, backend, depth, chunk, hp))
            if progress is not None:
                t = trials[-1]
                progress(i + 1, len(todo), f"{backend} qd {depth} {chunk >> 20} MiB "
                         f"{'huge' if hp == 'auto' else 'small'}: {t.score / 1e6:,.0f} MB/s")
    finally:
        os.close(fd)
        os.unlink(path)
    return trials


def _trial(fd: int, path: str, size: int, backend: str, depth: int, chunk: int,
           huge: str) -> Trial:
    """Write then read the scratch file through one engine and pool of these settings."""
    from .engine import SwapEngine
    from .pool import PinnedPool

    opts: dict[str, Any] = {"chunk_bytes": chunk}
    if backend == "threads":
        opts["threads"] = min(depth, 256)
    eng = SwapEngine(backend=backend, queue_depth=depth, **opts)
    pool = PinnedPool(huge_pages=huge)
    buf = min(size, max(chunk * depth, 64 << 20))  # reused for successive offsets
    lease = pool.lease(buf)
    try:
        fid = eng.register_file(fd, path)
        rates = []
        for op in ("write", "read"):
            t0 = time.perf_counter()
            handles = [getattr(eng, op)(fid, lease.address, min(buf, size - off), off)
                       for off in range(0, size, buf)]
            for h in handles:
                h.wait(600)
            rates.append(size / max(time.perf_counter() - t0, 1e-9))
        eng.unregister_file(fid)
    finally:
        lease.release()
        pool.close()
        eng.close()
    return Trial(backend, depth, chunk, huge, rates[0], rates[1])


def best(trials: Sequence[Trial]) -> Trial:
    """The trial with the highest score."""
    if not trials:
        raise ValueError("no trials")
    return max(trials, key=lambda t: t.score)


def save(trials: Sequence[Trial], swap_dir: str, size: int, path: Optional[str] = None) -> str:
    """Write the best trial's settings and all measurements to the tuned file (atomically);
    returns its path.

    Raises
    ------
    ConfigError
        ``MEMASCEND_TUNED=off`` and no ``path`` was given.
    OSError
        The file cannot be written.
    """
    path = tuned_path() if path is None else path
    if path is None:
        raise ConfigError("MEMASCEND_TUNED", "is off: give a path to save the tuned file")
    b = best(trials)
    doc = {"version": VERSION,
           "settings": {"engine": {"backend": b.backend, "queue_depth": b.queue_depth,
                                   "chunk_bytes": b.chunk_bytes},
                        "pool": {"huge_pages": b.huge_pages}},
           "measured": {"swap_dir": os.path.abspath(swap_dir), "size_bytes": size,
                        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "trials": [t.to_dict() for t in trials]}}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _CACHE.pop(path, None)
    return path
