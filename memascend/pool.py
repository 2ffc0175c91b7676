"""PinnedPool and Lease: exact-size pinned host memory with zero-copy tensor views.

A :class:`PinnedPool` wraps the native arena pool (``native/pool.c``). ``pool.lease(n)``
returns a :class:`Lease` of exactly ``n`` bytes rounded up to the alignment (4096 by default,
for O_DIRECT); ``lease.as_tensor(dtype, shape)`` views it as a torch tensor without copying.

Lifetime rule: memory goes back to the pool when the lease is released *and* no tensor or
array view of it is alive any more. So ``release()`` never leaves a dangling view: if views
are still referenced, the return is deferred until the last one is garbage-collected, and
``stats().deferred_releases`` counts such leases. Any use of a released lease raises
:class:`~memascend.errors.LeaseReleasedError`. A lease dropped without ``release()`` is returned
when it is garbage-collected.

On a CUDA machine every arena is registered with the CUDA runtime as it is mapped (see
:mod:`memascend.pinning`); without CUDA the same hook path runs with a host-only registrar.
"""
from __future__ import annotations

import dataclasses
import errno as errno_mod
import math
import operator
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Sequence

from . import _native
from .config import from_env, parse_size, resolve
from .errors import (ConfigError, LeaseReleasedError, MemoryLockError, PoolBusyError,
                     PoolExhaustedError)
from .pinning import Registrar, default_registrar
from .sysinfo import fmt_bytes, has_cap_ipc_lock, memlock_advice, memlock_limit

LOCK_MODES = {"off": 0, "auto": 1, "required": 2}
HUGE_PAGE_MODES = {"off": 0, "auto": 1}
_FAIL_NAMES = {1: "bad-size", 2: "too-large", 3: "limit", 4: "mmap", 5: "mlock", 6: "register"}


@dataclass(frozen=True)
class PoolConfig:
    """Options of a :class:`PinnedPool` (environment: ``MEMASCEND_POOL_<FIELD>``).

    Attributes
    ----------
    lock:
        ``"auto"`` (default): mlock each arena, go on unlocked if refused and count it;
        ``"required"``: fail the lease if mlock is refused; ``"off"``: never lock.
    alignment:
        Lease sizes and addresses are multiples of this power of two (default 4096: O_DIRECT).
    arena_bytes:
        Largest size of a shared arena for small leases (default 4 MiB). Shared arenas grow
        geometrically from ``large_threshold`` up to this, so a few small leases map little.
    large_threshold:
        Leases of at least this many bytes get an exact-size arena of their own
        (default 256 KiB).
    retain_bytes:
        Empty shared arenas kept mapped up to this many bytes (default 1 MiB), so a loop
        leasing and releasing small buffers does not map, lock and unmap an arena each time
        (about 0.2 ms a pair without it, 0.1 µs with it). Exact-size arenas of large leases
        are never retained. 0 returns every empty arena to the OS at once; ``trim()`` does so
        on demand.
    limit_bytes:
        Cap on reserved bytes; a lease beyond it raises PoolExhaustedError (default: none).
    populate:
        Prefault arenas when mapped so reserved bytes are resident at once (default True).
    huge_pages:
        ``"auto"`` (default): arenas of at least one transparent huge page (2 MiB on x86-64),
        i.e. large leases and the larger shared arenas, are mapped 2 MiB aligned and madvised
        ``MADV_HUGEPAGE`` before they are populated and locked, when the kernel's THP mode
        (``/sys/kernel/mm/transparent_hugepage/enabled``) is ``always`` or ``madvise``;
        otherwise nothing is done. Physically contiguous 2 MiB pieces make a 1-8 MiB I/O
        request a few segments instead of a scatter list of 4 KiB pages (the io_uring engine's
        CPU per GiB about halves on a virtio disk). Lease and arena sizes do not change;
        ``stats().huge_advised`` counts advised bytes. ``"off"``: small pages only.
    register:
        Register arenas with the GPU runtime when locking is on (default True; a no-op
        registrar runs instead on machines without CUDA).
    """

    lock: str = "auto"
    alignment: int = 4096
    arena_bytes: int = 4 << 20
    large_threshold: int = 256 << 10
    retain_bytes: int = 1 << 20
    limit_bytes: int | None = None
    populate: bool = True
    huge_pages: str = "auto"
    register: bool = True

    def __post_init__(self) -> None:
        if self.lock not in LOCK_MODES:
            raise ConfigError("lock", f"must be one of {sorted(LOCK_MODES)}, got {self.lock!r}")
        if self.huge_pages not in HUGE_PAGE_MODES:
            raise ConfigError("huge_pages", f"must be one of {sorted(HUGE_PAGE_MODES)}, "
                                            f"got {self.huge_pages!r}")
        for key in ("alignment", "arena_bytes", "large_threshold", "retain_bytes", "limit_bytes"):
            value = getattr(self, key)
            if value is None and key == "limit_bytes":
                continue
            object.__setattr__(self, key, parse_size(key, value))
        a = self.alignment
        if a < 64 or a > (1 << 30) or a & (a - 1):
            raise ConfigError("alignment", f"must be a power of two in [64, 1 GiB], got {a}")
        if self.arena_bytes <= 0:
            raise ConfigError("arena_bytes", f"must be > 0, got {self.arena_bytes}")
        if not 0 < self.large_threshold <= self.arena_bytes:
            raise ConfigError("large_threshold",
                              f"must be in (0, arena_bytes={self.arena_bytes}], "
                              f"got {self.large_threshold}")
        if not isinstance(self.populate, bool) or not isinstance(self.register, bool):
            raise ConfigError("populate" if not isinstance(self.populate, bool) else "register",
                              "must be a boolean")

    @classmethod
    def from_env(cls, **overrides: Any) -> "PoolConfig":
        """Defaults, then ``MEMASCEND_POOL_*`` variables, then ``overrides`` (not None)."""
        return from_env(cls, "POOL", overrides)


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's counters. Bytes unless named otherwise; ``*_peak`` are maxima.

    ``requested`` is what callers asked for, ``in_use`` the same rounded to the alignment,
    ``reserved`` what is mapped (live and retained arenas), ``locked`` what is mlock'ed
    (equals the growth of ``VmLck``). ``huge_advised`` is the part of ``reserved`` in arenas
    madvised ``MADV_HUGEPAGE`` (how much of it the kernel backs with huge pages shows as
    ``AnonHugePages`` in ``/proc/self/smaps``); ``huge_advise_failures`` counts arenas whose
    advice the kernel refused (they work with small pages). ``huge_page_size`` is the huge
    page the pool aligns arenas to, 0 when it uses small pages only.
    """

    requested: int
    requested_peak: int
    in_use: int
    in_use_peak: int
    reserved: int
    reserved_peak: int
    locked: int
    locked_peak: int
    leases: int
    leases_peak: int
    arenas: int
    arenas_peak: int
    retained: int
    lock_failures: int
    leases_total: int
    arenas_mapped_total: int
    arenas_unmapped_total: int
    huge_advised: int
    huge_advised_peak: int
    huge_advise_failures: int
    deferred_releases: int
    register_failures: int
    registered_arenas: int
    lock: str
    alignment: int
    huge_page_size: int

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict (JSON-serialisable)."""
        return dataclasses.asdict(self)

    @property
    def overhead(self) -> float:
        """``reserved / requested`` (1.0 is zero overhead); ``nan`` with nothing requested."""
        return self.reserved / self.requested if self.requested else math.nan


class Lease:
    """Exact-size pinned memory from a :class:`PinnedPool`. Use as a context manager.

    Attributes
    ----------
    nbytes: the size asked for.  size: ``nbytes`` rounded up to the pool alignment.
    address: the start address (int).  locked: whether the memory is mlock'ed.
    """

    __slots__ = ("_pool", "_buf", "_fin", "address", "nbytes", "size", "locked", "_released",
                 "__weakref__")

    def __init__(self, pool: "PinnedPool", address: int, size: int, nbytes: int, locked: bool):
        ffi, _lib = _native.require()
        self._pool = pool
        self.address = address
        self.size = size
        self.nbytes = nbytes
        self.locked = locked
        self._released = False
        # Every view of the lease holds this memoryview; when the last holder is gone the
        # finalizer gives the memory back to the native pool.
        self._buf: memoryview | None = memoryview(ffi.buffer(ffi.cast("char *", address), size))
        self._fin = weakref.finalize(self._buf, pool._free_native, address)
        # Never at interpreter exit: in-flight I/O may still target this memory then, and
        # the OS reclaims the mapping anyway.
        self._fin.atexit = False

    @property
    def released(self) -> bool:
        """True once :meth:`release` has been called."""
        return self._released

    def _live_buf(self) -> memoryview:
        if self._released or self._buf is None:
            raise LeaseReleasedError(
                f"lease of {self.nbytes} bytes at {self.address:#x} was already released")
        return self._buf

    def memoryview(self) -> memoryview:
        """A writable memoryview of the whole lease (``size`` bytes)."""
        return self._live_buf()

    def views_alive(self) -> bool:
        """True if a torch tensor from :meth:`as_tensor` (or a slice of one) or the
        memoryview of :meth:`memoryview` is still referenced: each holds the lease's buffer
        object (CPython reference count). numpy arrays from :meth:`as_numpy` are not seen."""
        return self._buf is not None and sys.getrefcount(self._buf) > 2

    def as_tensor(self, dtype: Any, shape: int | Sequence[int] | None = None,
                  offset: int = 0) -> Any:
        """A torch tensor viewing the lease's memory, without a copy.

        Parameters
        ----------
        dtype:
            A ``torch.dtype``.
        shape:
            Tensor shape; default: 1-D over ``nbytes // itemsize`` elements.
        offset:
            Byte offset into the lease, a multiple of the element size.

        Raises
        ------
        LeaseReleasedError
            The lease was released.
        ValueError
            The view would not fit in the lease, or the offset is misaligned.
        """
        import torch

        buf = self._live_buf()
        itemsize = torch.empty((), dtype=dtype).element_size()
        shape_t, count = self._check_view(itemsize, shape, offset)
        if count == 0:
            return torch.empty(shape_t, dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).view(shape_t)

    def as_numpy(self, dtype: Any, shape: int | Sequence[int] | None = None,
                 offset: int = 0) -> Any:
        """A numpy array viewing the lease's memory, without a copy (see :meth:`as_tensor`)."""
        import numpy as np

        buf = self._live_buf()
        dt = np.dtype(dtype)
        shape_t, count = self._check_view(dt.itemsize, shape, offset)
        return np.frombuffer(buf, dtype=dt, count=count, offset=offset).reshape(shape_t)

    def _check_view(self, itemsize: int, shape: Any, offset: int) -> tuple[tuple[int, ...], int]:
        offset = operator.index(offset)
        if offset < 0 or offset % itemsize:
            raise ValueError(f"offset {offset} must be >= 0 and a multiple of the element size "
                             f"{itemsize}")
        if shape is None:
            shape_t: tuple[int, ...] = ((self.nbytes - min(offset, self.nbytes)) // itemsize,)
        elif isinstance(shape, int):
            shape_t = (shape,)
        else:
            shape_t = tuple(operator.index(s) for s in shape)
        if any(s < 0 for s in shape_t):
            raise ValueError(f"negative dimension in shape {shape_t}")
        count = math.prod(shape_t)
        if offset + count * itemsize > self.size:
            raise ValueError(
                f"a view of shape {shape_t} ({count * itemsize} bytes) at offset {offset} does "
                f"not fit in a lease of {self.size} bytes (asked {self.nbytes})")
        return shape_t, count

    def release(self) -> None:
        """Give the lease back. Memory returns to the pool once no view of it is alive.

        Raises
        ------
        LeaseReleasedError
            The lease was released already.
        """
        if self._released:
            raise LeaseReleasedError(
                f"double release of the lease of {self.nbytes} bytes at {self.address:#x}")
        self._released = True
        self._buf = None  # drops our reference; the finalizer runs when views are gone too
        if self._fin.alive:
            self._pool._note_deferred(self.address)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._released:
            self.release()

    def __repr__(self) -> str:
        state = "released" if self._released else ("locked" if self.locked else "unlocked")
        return f"<Lease {self.nbytes} B ({self.size} B) at {self.address:#x} {state}>"


class PinnedPool:
    """A pool of exact-size, page-locked host memory (see the module docstring).

    Parameters
    ----------
    lock:
        ``"auto"``, ``"required"`` or ``"off"`` (see :class:`PoolConfig`).
    alignment:
        Power of two; leases are sized and aligned to it (default 4096).
    config:
        A full :class:`PoolConfig`; keyword options given here override its fields.
    registrar:
        Who registers arenas with the GPU runtime; default: CUDA when available, else a
        host-only registrar.
    **options:
        Any other :class:`PoolConfig` field.

    Raises
    ------
    ConfigError
        An option is invalid or unknown.
    NativeUnavailableError
        The native extension is not built.
    """

    def __init__(self, lock: str | None = None, alignment: int | None = None, *,
                 config: PoolConfig | None = None, registrar: Registrar | None = None,
                 **options: Any):
        ffi, lib = _native.require()
        overrides = dict(options, lock=lock, alignment=alignment)
        config = resolve(PoolConfig, "POOL", config, overrides)
        self.config = config
        self.registrar: Registrar = registrar if registrar is not None else default_registrar()
        self._mu = threading.Lock()
        self._deferred: set[int] = set()
        self._registered: set[int] = set()
        self._register_failures = 0
        self._register_error: BaseException | None = None
        self._closed = False

        cfg = ffi.new("ma_pool_config_t *")
        lib.ma_pool_config_default(cfg)
        cfg.alignment = config.alignment
        cfg.lock_mode = LOCK_MODES[config.lock]
        cfg.arena_bytes = config.arena_bytes
        cfg.large_threshold = config.large_threshold
        cfg.retain_bytes = config.retain_bytes
        cfg.limit_bytes = config.limit_bytes or 0
        cfg.populate = int(config.populate)
        cfg.huge_pages = HUGE_PAGE_MODES[config.huge_pages]
        out = ffi.new("ma_pool_t **")
        rc = lib.ma_pool_create(cfg, out)
        if rc != 0:
            raise ConfigError("pool", f"native pool rejected the config {config}: "
                                      f"{os.strerror(-rc)}")
        self._ptr = out[0]
        hp = ffi.new("size_t *")
        lib.ma_pool_huge_page_size(self._ptr, hp)
        self._huge_page_size = int(hp[0])
        self._handle = ffi.new_handle(self)
        if config.register and config.lock != "off":
            rc = lib.ma_pool_set_hooks(self._ptr, lib._ma_on_map, lib._ma_on_unmap, self._handle)
            if rc != 0:  # cannot happen on a fresh pool; never ignore it silently
                lib.ma_pool_destroy(self._ptr)
                raise OSError(-rc, f"ma_pool_set_hooks: {os.strerror(-rc)}")
        self._destroy = weakref.finalize(self, _destroy_native, self._ptr)
        self._destroy.atexit = False  # see Lease: nothing is unmapped at interpreter exit

    # ---- leases ----
    def lease(self, nbytes: int) -> Lease:
        """Lease exactly ``nbytes`` (rounded up to the alignment).

        Raises
        ------
        ValueError
            ``nbytes`` is zero, negative or not an integer.
        PoolExhaustedError
            Larger than physical memory, over ``limit_bytes``, or mmap refused.
        MemoryLockError
            ``lock="required"`` and mlock was refused (names RLIMIT_MEMLOCK and the fix).
        """
        ffi, lib = _native.require()
        try:
            n = operator.index(nbytes)
        except TypeError:
            raise ValueError(f"lease size must be an integer number of bytes, got {nbytes!r}") \
                from None
        if n <= 0:
            raise ValueError(f"lease size must be > 0 bytes, got {n}")
        if self._closed:
            raise PoolBusyError("the pool is closed")
        out = ffi.new("ma_lease_t *")
        rc = lib.ma_pool_lease(self._ptr, n, out)
        if rc != 0:
            raise self._lease_error(n, rc, out)
        return Lease(self, int(ffi.cast("uintptr_t", out.addr)), int(out.size), n,
                     bool(out.locked))

    def _lease_error(self, n: int, rc: int, out: Any) -> Exception:
        reason = _FAIL_NAMES.get(out.fail_reason, "unknown")
        err = out.fail_errno or -rc
        cfg = self.config
        if reason == "too-large":
            from .sysinfo import phys_bytes

            return PoolExhaustedError(
                f"cannot lease {n} bytes ({fmt_bytes(n)}): more than this machine's physical "
                f"memory ({fmt_bytes(phys_bytes())})", nbytes=n, reason=reason)
        if reason == "limit":
            st = self.stats()
            return PoolExhaustedError(
                f"cannot lease {n} bytes ({fmt_bytes(n)}): the pool would exceed its limit_bytes="
                f"{cfg.limit_bytes} ({fmt_bytes(cfg.limit_bytes)}); {st.reserved} bytes are "
                f"reserved now", nbytes=n, reason=reason)
        if reason == "mlock":
            limit = memlock_limit()
            return MemoryLockError(
                f"lock='required': mlock of {fmt_bytes(self._arena_size_for(n))} for a lease of "
                f"{n} bytes was refused ({errno_mod.errorcode.get(err, err)}: {os.strerror(err)}). "
                f"RLIMIT_MEMLOCK is {fmt_bytes(limit)} for this process"
                f"{'' if has_cap_ipc_lock() else ', which lacks CAP_IPC_LOCK'}, and "
                f"{fmt_bytes(self.stats().locked)} is locked by this pool already; "
                f"{memlock_advice()}", nbytes=n, errno=err, limit=limit)
        if reason == "register":
            cause = self._register_error
            exc = PoolExhaustedError(
                f"cannot lease {n} bytes: registering the arena with {self.registrar.name} "
                f"failed ({cause})", nbytes=n, reason=reason, errno=err)
            exc.__cause__ = cause
            return exc
        return PoolExhaustedError(
            f"cannot lease {n} bytes ({fmt_bytes(n)}): mmap of "
            f"{fmt_bytes(self._arena_size_for(n))} failed ({os.strerror(err)})",
            nbytes=n, reason=reason, errno=err)

    def _arena_size_for(self, n: int) -> int:
        a = self.config.alignment
        size = -(-n // a) * a
        page = max(os.sysconf("SC_PAGE_SIZE"), a)
        if size >= self.config.large_threshold:
            return -(-size // page) * page
        return -(-self.config.large_threshold // page) * page  # at least; up to arena_bytes

    # ---- native callbacks (pool mutex held: no pool calls in here) ----
    def _on_map(self, base: int, size: int, locked: int) -> int:
        try:
            self.registrar.register(base, size)
        except Exception as exc:  # registration failure must not escape into C
            with self._mu:
                self._register_failures += 1
                self._register_error = exc
            if self.config.lock == "required":
                return -(getattr(exc, "errno", None) or errno_mod.EIO)
            return 0
        with self._mu:
            self._registered.add(base)
        return 0

    def _on_unmap(self, base: int, size: int) -> None:
        with self._mu:
            was = base in self._registered
            self._registered.discard(base)
        if was:
            try:
                self.registrar.unregister(base, size)
            except Exception as exc:
                with self._mu:
                    self._register_failures += 1
                    self._register_error = exc

    def _free_native(self, address: int) -> None:
        ffi, lib = _native.require()
        rc = lib.ma_pool_release(self._ptr, ffi.cast("void *", address))
        with self._mu:
            self._deferred.discard(address)
        if rc != 0:  # a finalizer cannot raise usefully; this would be a pool bug
            raise LeaseReleasedError(f"native release of {address:#x} failed: {os.strerror(-rc)}")

    def _note_deferred(self, address: int) -> None:
        with self._mu:
            self._deferred.add(address)

    # ---- introspection ----
    def stats(self) -> PoolStats:
        """A :class:`PoolStats` snapshot."""
        ffi, lib = _native.require()
        s = ffi.new("ma_pool_stats_t *")
        lib.ma_pool_stats(self._ptr, s)
        with self._mu:
            deferred = len(self._deferred)
            regf = self._register_failures
            regd = len(self._registered)
        fields = {f: int(getattr(s, f)) for f in (
            "requested", "requested_peak", "in_use", "in_use_peak", "reserved",
            "reserved_peak", "locked", "locked_peak", "leases", "leases_peak", "arenas",
            "arenas_peak", "retained", "lock_failures", "leases_total", "arenas_mapped_total",
            "arenas_unmapped_total", "huge_advised", "huge_advised_peak",
            "huge_advise_failures")}
        return PoolStats(**fields, deferred_releases=deferred, register_failures=regf,
                         registered_arenas=regd, lock=self.config.lock,
                         alignment=self.config.alignment, huge_page_size=self._huge_page_size)

    def arenas(self) -> list[tuple[int, int, bool, bool]]:
        """The mapped arenas as ``(base, size, locked, shared)`` tuples (for I/O registration)."""
        ffi, lib = _native.require()
        count = ffi.new("size_t *")
        lib.ma_pool_arenas(self._ptr, ffi.NULL, 0, count)
        cap = int(count[0]) + 8
        arr = ffi.new("ma_arena_info_t[]", cap)
        lib.ma_pool_arenas(self._ptr, arr, cap, count)
        return [(int(ffi.cast("uintptr_t", arr[i].base)), int(arr[i].size), bool(arr[i].locked),
                 bool(arr[i].shared)) for i in range(min(cap, int(count[0])))]

    def trim(self) -> None:
        """Unmap retained empty arenas now."""
        _ffi, lib = _native.require()
        lib.ma_pool_trim(self._ptr)

    def close(self) -> None:
        """Unmap everything. Idempotent.

        Raises
        ------
        PoolBusyError
            Leases (or views of released leases) are still alive.
        """
        if self._closed:
            return
        st = self.stats()
        if st.leases and st.deferred_releases:
            import gc

            gc.collect()  # views held only by reference cycles (e.g. tracebacks) go away
            st = self.stats()
        if st.leases:
            raise PoolBusyError(
                f"cannot close the pool: {st.leases} leases ({st.in_use} bytes) are live, "
                f"{st.deferred_releases} of them released but still viewed by tensors")
        self._closed = True
        self._destroy()

    def __enter__(self) -> "PinnedPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self.stats()
        return (f"<PinnedPool lock={self.config.lock} leases={s.leases} "
                f"in_use={fmt_bytes(s.in_use)} reserved={fmt_bytes(s.reserved)} "
                f"locked={fmt_bytes(s.locked)}>")


def _destroy_native(ptr: Any) -> None:
    _ffi, lib = _native.require()
    lib.ma_pool_destroy(ptr)  # -EBUSY leaves the memory mapped: never unmap live leases


if _native.AVAILABLE:
    _ffi = _native.ffi

    # _on_map/_on_unmap catch their own errors; `error=` is the last line of defence so that
    # an unexpected failure in the hook fails the lease instead of passing as success.
    @_ffi.def_extern(error=-errno_mod.EIO)
    def _ma_on_map(ctx: Any, base: Any, size: int, locked: int) -> int:
        pool = _ffi.from_handle(ctx)
        return pool._on_map(int(_ffi.cast("uintptr_t", base)), int(size), int(locked))

    @_ffi.def_extern()
    def _ma_on_unmap(ctx: Any, base: Any, size: int) -> None:
        pool = _ffi.from_handle(ctx)
        pool._on_unmap(int(_ffi.cast("uintptr_t", base)), int(size))
