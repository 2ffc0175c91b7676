"""TensorSwapper: what a training loop talks to — tensors by key, in and out of SSD.

``swap_in(key)`` returns a handle whose result is a tensor view on a pinned, exact-size
buffer; ``release(key)`` says the consumer is done with it; ``swap_out(key, tensor)`` stores a
tensor (copied into a pinned buffer at once, written asynchronously). Buffers come from a
:class:`~memascend.buffers.BufferPool` under ``budget_bytes``: when the budget is full a
request *waits* for in-flight I/O and releases (backpressure) instead of failing. Only a
tensor larger than the whole budget, or a budget entirely held by tensors the consumer has not
released, is an error — and the message names the keys.

Released tensors stay resident as a clean cache until their buffer is needed; the victim is
the one whose next use (per the learned plan) is furthest away. The access order is learned on
the first pass and replayed (:mod:`memascend.prefetch`); the prefetch depth grows while the
consumer waits and shrinks when prefetched buffers go unused.

dtype conversion: a key registered with ``dtype`` (what the consumer sees) and
``stored_dtype`` (what is on disk) is converted on the way in through a small staging buffer,
chunk by chunk, and on the way out by ``copy_`` into the buffer — never a full-size temporary.

Threading model: one consumer thread calls ``swap_in``/``release``/``swap_out``/``prefetch``/
``mark_pass``; a prefetch thread submits the reads of prefetched keys (one per lock hold, so
submission — in the kernel, pinning the buffer's pages — stays off the consumer's thread); I/O
completes on the engine's threads; all state is under one lock, and the consumer blocks only in
``wait()`` on a handle, while waiting for budget, or briefly behind one submission. A key the
consumer asks for before its prefetch started is read on demand on the consumer's thread.

Reading into buffers is :mod:`memascend.swapper_load`, the read-ahead
:mod:`memascend.swapper_prefetch`, the records and options :mod:`memascend.swapper_types`;
this module holds the budget, residency and the consumer's API.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Optional, Sequence

from .buffers import BufferPool
from .config import from_env
from .errors import ConfigError, KeyNotFoundError, PoolExhaustedError
from .handle import SwapHandle
from .pool import Lease, PinnedPool
from .prefetch import AccessPlan, DepthController
from .store import SwapStore
from .swapper_load import Loading
from .swapper_prefetch import _LIVE, Prefetching
from .swapper_types import SwapperConfig, SwapperStats, _dtype, _Meta, _Res, _torch

__all__ = ["TensorSwapper", "SwapperConfig", "SwapperStats"]


class TensorSwapper(Loading, Prefetching):
    """Tensors by key, backed by a :class:`SwapStore` (see the module docstring).

    Parameters
    ----------
    store:
        Where tensors live.
    pool:
        Pinned pool for buffers (default: the store's pool).
    budget_bytes:
        Most pinned bytes held at once.
    overflow_pool:
        Where a buffer comes from when ``pool`` is capped and too fragmented for it (see
        :class:`~memascend.buffers.BufferPool`; default: the request waits or fails).
    **options:
        Other :class:`SwapperConfig` fields; a field not given comes from
        ``MEMASCEND_SWAPPER_<FIELD>`` when set (:mod:`memascend.config`; an unknown option or
        variable is a ``ConfigError``).
    """

    def __init__(self, store: SwapStore, pool: Optional[PinnedPool] = None, *,
                 budget_bytes: Any, overflow_pool: Optional[PinnedPool] = None,
                 **options: Any):
        self.config = from_env(SwapperConfig, "SWAPPER", dict(options, budget_bytes=budget_bytes),
                               given=True)
        self.store = store
        self.pool = pool if pool is not None else store.pool
        self.buffers = BufferPool(self.pool, self.config.budget_bytes, overflow=overflow_pool)
        self.plan = AccessPlan()
        self.depth = DepthController(self.config.start_depth, 1, self.config.max_depth)
        self._cv = threading.Condition(threading.RLock())
        self._meta: dict[str, _Meta] = {}
        self._res: dict[str, _Res] = {}
        self._queue: deque[str] = deque()
        self._inflight = 0
        self._writing = 0
        self._n = 0
        self._pass = 0  # mark_pass() count
        self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="memascend-convert")
        self._c = {"hits": 0, "reuse_hits": 0, "late": 0, "misses": 0, "wait_seconds": 0.0,
                   "budget_waits": 0, "reads": 0, "writes": 0, "bytes_read": 0,
                   "bytes_written": 0, "evictions": 0, "wasted_prefetches": 0,
                   "prefetch_errors": 0}
        self._closed = False
        self._stopping = False
        self._prefetch_failed: set[str] = set()
        self._kick_ev = threading.Event()
        self._prefetcher = threading.Thread(target=self._prefetch_loop, daemon=True,
                                            name="memascend-prefetch")
        self._prefetcher.start()
        _LIVE.add(self)

    # ---- metadata ----
    def limit_budget(self, budget_bytes: int) -> None:
        """Change the pinned budget (e.g. once the tensors it stages are known and smaller
        than the default). Over a lowered budget, idle resident tensors are evicted and free
        buffers given back now; tensors in use stay until released.

        Raises
        ------
        ConfigError
            ``budget_bytes`` is not positive.
        """
        if int(budget_bytes) <= 0:
            raise ConfigError("budget_bytes", f"must be > 0, got {budget_bytes}")
        budget = int(budget_bytes)
        with self._cv:
            self.config = replace(self.config, budget_bytes=budget)
            self.buffers.budget = budget
            b = self.buffers.stats
            while b.pinned_bytes - b.free_bytes > budget and self._evict_one(""):
                pass  # idle residents over the budget: their buffers become free
            self.buffers.shed_to(budget)
            self._cv.notify_all()

    def register(self, key: str, shape: Sequence[int], dtype: Any, *,
                 stored_dtype: Any = None) -> None:
        """Declare a key's shape and dtype (and the dtype it is stored in, if different).

        Raises
        ------
        PoolExhaustedError
            The tensor (or its staging) cannot fit in the budget at all.
        """
        meta = _Meta(tuple(int(s) for s in shape), _dtype(dtype),
                     _dtype(stored_dtype) if stored_dtype is not None else _dtype(dtype))
        self._check_fits(key, meta)
        with self._cv:
            self._meta[key] = meta

    def _check_fits(self, key: str, meta: _Meta, out: bool = False) -> None:
        """Raise if ``key`` can never fit: coming in it needs its served size (plus a staging
        chunk when converting); going out, its stored size."""
        if out:
            need = BufferPool.size_class(max(meta.stored_bytes, 1))
        else:
            need = BufferPool.size_class(max(meta.served_bytes, 1))
            if meta.stored != meta.dtype:
                need += min(self.config.chunk_bytes, BufferPool.size_class(meta.stored_bytes))
        if need > self.config.budget_bytes:
            raise PoolExhaustedError(
                f"tensor {key!r} needs {need} bytes of pinned buffer, more than the whole "
                f"budget of {self.config.budget_bytes} bytes", nbytes=need, reason="budget")

    def _meta_of(self, key: str) -> _Meta:
        meta = self._meta.get(key)
        if meta is not None:
            return meta
        e = self.store.info(key)  # raises KeyNotFoundError naming the key
        if e.dtype is None or e.shape is None:
            raise KeyNotFoundError(f"{key!r} was stored without dtype/shape; register() it")
        meta = _Meta(tuple(e.shape), _dtype(e.dtype), _dtype(e.dtype))
        self._check_fits(key, meta)
        self._meta[key] = meta
        return meta

    # ---- buffers ----
    def _evict_one(self, protect: str, before: float = -1.0, want: int = 0,
                   spare: bool = False) -> bool:
        """Evict an idle resident used later than ``before``: one of size class ``want`` if
        any (its buffer is then reused without a new mapping), else the one used furthest in
        the future. ``spare`` (for prefetches) keeps this pass's unused prefetches: evicting
        one to read another would read it twice."""
        best, best_score = None, None
        for r in self._res.values():
            if r.key == protect or r.users or r.state != "ready" or r.writing:
                continue
            if spare and r.prefetched and not r.used and r.pass_no == self._pass:
                continue
            nu = self.plan.next_use(r.key)
            if nu <= before:
                continue
            score = (r.lease.size == want, nu, -r.last_use)
            if best_score is None or score > best_score:
                best, best_score = r, score
        if best is None:
            return False
        del self._res[best.key]
        best.view = None
        self.buffers.put(best.lease)
        self._c["evictions"] += 1
        if best.prefetched and not best.used:
            self._c["wasted_prefetches"] += 1
            self.depth.wasted(self._n)
        return True

    def _acquire(self, key: str, nbytes: int, blocking: bool, before: float = -1.0,
                 loading: bool = False, superseding: bool = False,
                 spare: bool = False) -> Optional[Lease]:
        """A buffer for ``key``: recycle, evict, or wait (``blocking``). None when not
        blocking and the budget is full, or when ``loading`` and ``key`` became resident
        meanwhile (a completion prefetched it while this call waited). ``superseding``: the
        buffer is for new contents of ``key`` (swap_out), so an idle resident copy of ``key``
        — a prefetch of the old contents that completed while this call waited — is stale
        and is dropped."""
        deadline = time.monotonic() + self.config.wait_timeout
        while True:
            if loading and key in self._res:
                return None
            old = self._res.get(key) if superseding else None
            if old is not None and not old.users and old.state == "ready" and not old.writing:
                self._drop(old)
                continue
            lease = self.buffers.try_acquire(nbytes)
            if lease is not None:
                return lease
            size = BufferPool.size_class(nbytes)
            if self._evict_one(key, before, size, spare=True):
                continue
            # An unused prefetch is evicted last: only when no write in flight will free a
            # buffer (evicting one means reading it twice).
            if not spare and self._writing == 0 and self._evict_one(key, before, size):
                continue
            if not blocking:
                return None
            if self._inflight == 0 and self._writing == 0 and \
                    not (not spare and self._evict_one(key, before, size)):
                held = [(r.key, r.lease.size) for r in self._res.values() if r.users]
                raise PoolExhaustedError(
                    f"cannot get {nbytes} bytes for {key!r}: the budget of "
                    f"{self.config.budget_bytes} bytes is held by tensors still in use "
                    f"({', '.join(f'{k!r} ({n} B)' for k, n in held[:8])}"
                    f"{', ...' if len(held) > 8 else ''}); release some first",
                    nbytes=nbytes, reason="budget")
            self._c["budget_waits"] += 1
            left = deadline - time.monotonic()
            if left <= 0 or not self._cv.wait(timeout=left):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"waited {self.config.wait_timeout} s for pinned budget "
                                       f"for {key!r}")

    # ---- the consumer's API ----
    def swap_in(self, key: str, observe: bool = True) -> SwapHandle:
        """Bring ``key`` into a pinned buffer; the handle's result is the tensor view.

        The view is valid until :meth:`release`. Waits for budget if needed (backpressure).
        ``observe=False`` keeps the access out of the learned access order and the prefetch
        depth (for an access outside the pass the plan learns, e.g. an optimizer step that
        reads parameters forward and backward also read).

        Raises
        ------
        KeyNotFoundError
            Unknown key.
        PoolExhaustedError
            The key cannot fit (see the module docstring).
        """
        self._check_open()
        out = SwapHandle(f"swap_in({key!r})")
        with self._cv:
            self._meta_of(key)
            if observe:
                self._n += 1
                self.plan.observe(key)
            r = self._res.get(key)
            if r is None:
                self._c["misses"] += 1
                r = self._start_load(key, blocking=True, prefetched=False, claim=True)
                if observe and not self.plan.learning:  # nothing to prefetch while learning
                    self.depth.waited(self._n)
            else:
                if r.state == "loading":
                    self._c["late"] += 1
                    if observe:
                        self.depth.waited(self._n)
                elif r.prefetched and not r.used:
                    self._c["hits"] += 1
                else:
                    self._c["reuse_hits"] += 1
                r.users += 1
            r.used = True
            r.last_use = time.monotonic()
            ready = r.state == "ready"
            if not ready:
                r.waiters.append((out, time.monotonic()))
        self._kick()
        if ready:
            out.set_result(r.view)
        return out

    def create(self, key: str, fill: float = 0.0) -> Any:
        """A resident buffer for the registered ``key``, filled with ``fill``, nothing read:
        for state that starts as a constant (Adam's moments). It counts as swapped in
        (:meth:`release` it) and is stored by ``swap_out(key, view)`` (no copy). A resident
        copy of ``key``, if idle, is dropped.

        Raises
        ------
        KeyNotFoundError
            ``key`` is not registered.
        ValueError
            ``key`` is swapped in, or registered with a stored dtype of its own.
        """
        self._check_open()
        with self._cv:
            meta = self._meta.get(key)
            if meta is None:
                raise KeyNotFoundError(f"create({key!r}): register() the key first")
            if meta.stored != meta.dtype:
                raise ValueError(f"create({key!r}): the key is stored as {meta.stored}")
            old = self._res.get(key)
            if old is not None:
                if old.users:
                    raise ValueError(f"create({key!r}): the key is swapped in")
                self._cv.wait_for(lambda: old.state != "loading" and not old.writing,
                                  timeout=self.config.wait_timeout)
                if self._res.get(key) is old:
                    self._drop(old)
            lease = self._acquire(key, meta.served_bytes, blocking=True, superseding=True)
            r = _Res(key, meta, lease, False, self._pass)
            r.state, r.users, r.used = "ready", 1, True
            r.view = lease.as_tensor(meta.dtype, meta.shape)
            self._res[key] = r
            view = r.view
        view.fill_(fill)  # outside the lock; the buffer is ours (users=1)
        return view

    def release(self, key: str) -> None:
        """The consumer is done with ``key``; its buffer may be reused from now on.

        Raises
        ------
        ValueError
            ``key`` is not swapped in.
        """
        with self._cv:
            r = self._res.get(key)
            if r is None or r.users == 0:
                raise ValueError(f"release({key!r}): the key is not swapped in")
            r.users -= 1
            r.last_use = time.monotonic()
            if r.users == 0 and r.drop_after_write and not r.writing:
                self._drop(r)
            self._cv.notify_all()
        self._kick()

    def _drop(self, r: _Res) -> None:
        if self._res.get(r.key) is r:
            del self._res[r.key]
        r.view = None  # a live view would keep the pool from unmapping a trimmed buffer
        self.buffers.put(r.lease)

    def swap_out(self, key: str, tensor: Any, release: bool = True) -> SwapHandle:
        """Store ``tensor`` under ``key``; the handle's result is the bytes written.

        The tensor is copied into a pinned buffer before this returns (converted to the
        stored dtype if registered so), so the caller may reuse it at once. Writing the
        swapper's own view of ``key`` writes its buffer without a copy. With ``release=False``
        the data stays resident for later ``swap_in`` calls.

        Raises
        ------
        ValueError
            Shape mismatch with the registration, or ``key`` is in use through another buffer.
        """
        self._check_open()
        torch = _torch()
        if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
            raise ValueError(f"swap_out({key!r}) takes a CPU tensor")
        with self._cv:
            meta = self._meta.get(key)
            if meta is None:
                meta = _Meta(tuple(tensor.shape), tensor.dtype, tensor.dtype)
                self._check_fits(key, meta)
                self._meta[key] = meta
            elif tuple(tensor.shape) != meta.shape:
                raise ValueError(f"swap_out({key!r}): shape {tuple(tensor.shape)} differs from "
                                 f"the registered {meta.shape}")
            self._check_fits(key, meta, out=True)
            r = self._res.get(key)
            own = r is not None and r.view is not None and \
                tensor.data_ptr() == r.view.data_ptr()
            if r is not None and not own:
                if r.users:
                    raise ValueError(f"swap_out({key!r}): the key is swapped in and in use; "
                                     "write its own view, or release it first")
                self._cv.wait_for(lambda: r.state != "loading" and not r.writing,
                                  timeout=self.config.wait_timeout)
                if self._res.get(key) is r:
                    self._drop(r)
                r = None
            created = False
            if own and meta.stored == meta.dtype:
                src = r.lease
            else:
                src = self._acquire(key, meta.stored_bytes, blocking=True, superseding=not own)
                if not own:
                    stale = self._res.get(key)
                    if stale is not None:  # appeared while waiting for budget, still busy
                        self._cv.wait_for(lambda: stale.state != "loading" and
                                          not stale.writing and not stale.users,
                                          timeout=self.config.wait_timeout)
                        if stale.users:
                            self.buffers.put(src)
                            raise ValueError(f"swap_out({key!r}): the key was swapped in "
                                             "meanwhile and is in use")
                        self._drop(stale)
                src.as_tensor(meta.stored, meta.shape).copy_(tensor)
                if r is None and meta.stored == meta.dtype:
                    created = True
                    r = _Res(key, meta, src, False, self._pass)
                    r.state = "ready"
                    r.view = src.as_tensor(meta.dtype, meta.shape)
                    self._res[key] = r
            staged = src if (r is None or src is not r.lease) else None
            if r is not None:
                r.writing += 1
                r.drop_after_write = r.drop_after_write or release
            self._writing += 1
            try:
                h = self.store.write(key, src, nbytes=meta.stored_bytes,
                                     dtype=str(meta.stored).replace("torch.", ""),
                                     shape=meta.shape)
            except BaseException:
                # Refused before any I/O started (e.g. ENOSPC while allocating extents):
                # undo the bookkeeping so that close() and wait_idle() do not wait for it.
                self._writing -= 1
                if staged is not None:
                    self.buffers.put(staged)
                if r is not None:
                    r.writing -= 1
                    if created:  # never stored: not a valid resident copy either
                        r.view = None
                        self._drop(r)
                self._cv.notify_all()
                raise
        out = SwapHandle(f"swap_out({key!r})")
        h.add_done_callback(lambda hh: self._written(r, staged, meta, hh, out))
        return out

    def _written(self, r: Optional[_Res], staged: Optional[Lease], meta: _Meta, h: SwapHandle,
                 out: SwapHandle) -> None:
        exc = h.exception(0)
        with self._cv:
            self._writing -= 1
            if staged is not None:
                self.buffers.put(staged)
            if r is not None:
                r.writing -= 1
                # a failed write leaves the key at its stored version (or none): a resident
                # copy nobody holds would serve bytes the store does not have, so it goes
                if not r.writing and not r.users and \
                        (r.drop_after_write or (exc is not None and self._res.get(r.key) is r)):
                    self._drop(r)
            if exc is None:
                self._c["writes"] += 1
                self._c["bytes_written"] += meta.stored_bytes
            self._cv.notify_all()
        self._kick()
        if exc is None:
            out.set_result(meta.stored_bytes)
        else:
            out.set_exception(exc)

    # ---- introspection and lifecycle ----
    def stats(self) -> SwapperStats:
        """A snapshot of the counters."""
        with self._cv:
            b = self.buffers.stats
            return SwapperStats(
                accesses=self._n, depth=self.depth.depth,
                depth_history=list(self.depth.history), resident_keys=len(self._res),
                pinned_bytes=b.pinned_bytes, pinned_peak=b.pinned_peak,
                budget_bytes=self.config.budget_bytes, leases_created=b.leases_created,
                leases_reused=b.leases_reused, overflow_leases=b.overflow_leases,
                plan_learning=self.plan.learning,
                plan_length=len(self.plan.order), plan_resyncs=self.plan.resyncs, **self._c)

    def forget(self, key: str) -> None:
        """Drop ``key``'s resident copy and queued prefetches, if any (e.g. before the key
        is rewritten in the store by someone else). Waits for its read or write in flight.

        Raises
        ------
        ValueError
            ``key`` is swapped in (not released).
        """
        with self._cv:
            if key in self._queue:
                self._queue = deque(k for k in self._queue if k != key)
            r = self._res.get(key)
            if r is None:
                return
            if r.users:
                raise ValueError(f"forget({key!r}): the key is still swapped in")
            if not self._cv.wait_for(lambda: r.state != "loading" and not r.writing,
                                     timeout=self.config.wait_timeout):
                raise TimeoutError(f"forget({key!r}): its I/O is still in flight after "
                                   f"{self.config.wait_timeout} s")
            if self._res.get(key) is r and not r.users:
                self._drop(r)
            self._cv.notify_all()

    def discard(self, key: str) -> None:
        """Forget ``key`` everywhere: its resident copy, queued prefetches, its registration
        and its bytes in the store (for scratch keys used once, such as saved activations).
        Waits for its read or write in flight.

        Raises
        ------
        ValueError
            ``key`` is swapped in (not released).
        """
        self.forget(key)
        with self._cv:
            self._meta.pop(key, None)
        if key in self.store:
            self.store.delete(key)

    def drop_resident(self) -> None:
        """Forget every resident copy (e.g. after the store's contents were replaced).

        Raises
        ------
        ValueError
            A key is still swapped in (not released).
        """
        self.wait_idle(self.config.wait_timeout)
        with self._cv:
            busy = [r.key for r in self._res.values() if r.users]
            if busy:
                raise ValueError(f"drop_resident(): keys still in use: {busy[:8]}")
            for r in list(self._res.values()):
                self._drop(r)
            self._queue.clear()

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no read or write is in flight; False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._inflight and not self._writing, timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the swapper is closed")

    def close(self) -> None:
        """Finish in-flight I/O and give every buffer back to the pool. Idempotent."""
        if self._closed:
            return
        self._stop_prefetcher()
        self.wait_idle(self.config.wait_timeout)
        self._bg.shutdown(wait=True)
        with self._cv:
            self._closed = True
            self._queue.clear()
            for r in list(self._res.values()):
                self._drop(r)
            self.buffers.trim()

    def __enter__(self) -> "TensorSwapper":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
