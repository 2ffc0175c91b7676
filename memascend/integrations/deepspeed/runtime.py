"""The per-process memascend runtime behind the DeepSpeed swappers, and its options.

DeepSpeed builds its swappers deep inside ``zero.Init`` and the stage-3 optimizer, one per
tier and rank. They all share one :class:`Runtime`: one :class:`~memascend.engine.SwapEngine`
(io_uring, every completion checked), one :class:`~memascend.pool.PinnedPool` (exact-size
leases from locked arenas) and one :class:`~memascend.store.SwapStore` per swap folder (one
swap area per tier instead of one file per tensor). :class:`Options` is what a user may set,
by ``enable(**options)`` or by a ``"memascend": {...}`` block in the DeepSpeed config; an
unknown key is an error (it lives in :mod:`memascend.dropin_options`, which the sizing rules
read too, and is re-exported here). DeepSpeed's own settings are honoured as follows:

- ``aio.queue_depth`` → the engine's queue depth; ``aio.block_size`` → the engine's request
  size (``chunk_bytes``, rounded up to 4096);
- ``offload_param.pin_memory`` / ``offload_optimizer.pin_memory`` → the pool's lock mode
  (``True``: ``"auto"`` — lock, and fall back to unlocked memory, counted in the stats,
  when the memlock limit refuses; never SIGABRT. ``False``: ``"off"``);
- ``offload_param.buffer_count`` × ``buffer_size`` → a byte budget: ``buffer_count`` buffers
  sized exactly for the largest swapped parameter (see :mod:`memascend.sizing`), not
  ``buffer_size`` elements each.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Optional

from ...dropin_options import Options
from ...engine import SwapEngine
from ...files import private_dirs
from ...extents import round_up
from ...pool import Lease, PinnedPool
from ...recycle import FreeLeases
from ...store import SwapStore


def aio_engine_settings(aio_config: Any) -> dict[str, int]:
    """Engine settings from DeepSpeed's ``aio`` section (a dict-like with its keys)."""
    qd = int(aio_config["queue_depth"])
    block = int(aio_config["block_size"])
    chunk = max(4096, round_up(block))
    return {"queue_depth": max(1, min(qd, 4096)), "chunk_bytes": chunk}


class Runtime:
    """Engine, pool and stores shared by every memascend swapper of this process.

    Built on first use by :func:`runtime` with the options and the first swapper's aio
    settings; later swappers reuse it.
    """

    def __init__(self, options: Options, aio: dict[str, int], lock: str,
                 aio_given: bool = True):
        self.options = options
        # The config's aio block sets the engine's queue depth and request size when the user
        # gave one; otherwise (DeepSpeed's defaults fill it in) the environment, the tuned
        # file (memascend tune) or the engine's defaults do, as for backend "auto".
        qd, chunk = (aio["queue_depth"], aio["chunk_bytes"]) if aio_given else (None, None)
        self.engine = SwapEngine(backend=None if options.backend == "auto" else options.backend,
                                 queue_depth=qd, chunk_bytes=chunk)
        self.pool = PinnedPool(lock=options.lock or lock)
        self._stores: dict[str, SwapStore] = {}
        self._leases: dict[int, Lease] = {}  # address -> lease, for is_pinned and frees
        self._spare = FreeLeases()  # freed leases kept for reuse, keyed by their nbytes
        self._viewed: list[Lease] = []  # freed while still viewed: kept once the views go
        self._in_use = 0  # bytes of leases handed out and not freed
        self._peak = 0  # most bytes in use at once since the last trim()
        self._mu = threading.Lock()
        self.optimizer_largest_numel: Optional[int] = None  # set by the optimizer swapper
        self.optimizer_streams = False  # set by the streamed optimizer swapper

    def store(self, folder: str) -> SwapStore:
        """The swap area of ``folder`` (created on first use as ``folder/memascend.swp``)."""
        folder = os.path.abspath(folder)
        with self._mu:
            st = self._stores.get(folder)
            if st is None:
                private_dirs(folder)
                st = SwapStore(os.path.join(folder, "memascend.swp"), engine=self.engine,
                               pool=self.pool, durable=False, journal=False,
                               checksum=self.options.checksum, reset=True)
                self._stores[folder] = st
            return st

    def stores(self) -> list[SwapStore]:
        """The swap areas open now (for stats)."""
        with self._mu:
            return list(self._stores.values())

    def store_for(self, path: str) -> Optional[tuple[SwapStore, str]]:
        """The swap area whose folder holds ``path``, and the key of ``path`` in it."""
        path = os.path.abspath(path)
        with self._mu:
            for folder, st in self._stores.items():
                rel = os.path.relpath(path, folder)
                if not rel.startswith(".."):
                    return st, rel
        return None

    def drop_store(self, folder: str) -> None:
        """Close the swap area of ``folder`` (DeepSpeed is about to delete the folder)."""
        with self._mu:
            st = self._stores.pop(os.path.abspath(folder), None)
        if st is not None:
            st.close()

    # ---- pinned memory ----
    # Mapping, populating and locking a fresh lease costs about 0.7 ms per MiB, and every
    # partition read, staged or accumulated would otherwise pay it. A freed lease whose views
    # are all gone is kept for the next lease of exactly its size, as long as the leases in
    # use plus those kept stay within the most that was in use at once since the last
    # trim(): recycling never raises the pinned peak. A lease freed while a tensor still
    # views it (DeepSpeed drops its last view of a parameter partition only after the swapper
    # has been told to release it) is never handed out while viewed; it waits in a list, its
    # memory held by the views as it would be anyway, and is kept or released at a later
    # lease once they are gone. Without that list most partitions were leased afresh. The
    # kept leases are a memascend.recycle.FreeLeases, the swapper's buffer pool's structure.
    MAX_VIEWED = 256  # leases waiting for their views to go; older ones are released

    def _settle_viewed(self) -> list[Lease]:
        """Keep (or, past the peak, return for release) the freed leases whose views are
        gone (caller holds the lock)."""
        out, still = [], []
        for lease in self._viewed:
            if lease.views_alive():
                still.append(lease)
            elif not self._keep(lease):
                out.append(lease)
        while len(still) > self.MAX_VIEWED:
            out.append(still.pop(0))
        self._viewed = still
        return out

    def _keep(self, lease: Lease) -> bool:
        """Keep ``lease`` for reuse if that stays within the peak (caller holds the lock)."""
        if self._in_use + self._spare.bytes + lease.size > self._peak:
            return False
        self._spare.put(lease.nbytes, lease)
        return True

    def lease(self, nbytes: int) -> Lease:
        """An exact-size pinned lease (a recycled one of exactly ``nbytes`` when kept),
        registered so that :meth:`is_pinned` knows it."""
        n = max(int(nbytes), 1)
        with self._mu:
            settled = self._settle_viewed() if self._viewed else []
            lease = self._spare.take(n)
        for old in settled:
            old.release()
        if lease is None:
            lease = self.pool.lease(n)
        with self._mu:
            self._leases[lease.address] = lease
            self._in_use += lease.size
            self._peak = max(self._peak, self._in_use)
            shed = self._spare.shed(self._in_use + self._spare.bytes - self._peak)
        for old in shed:  # kept leases of other sizes give way: the peak is not raised
            old.release()
        return lease

    def free(self, lease: Lease) -> None:
        """Give a lease back: kept for reuse (see above) when no view of it is alive and
        it fits under the peak; while viewed, set aside until its views are gone (then kept
        or released at a later :meth:`lease`); else released."""
        with self._mu:
            if self._leases.pop(lease.address, None) is not None:
                self._in_use -= lease.size
            viewed = not lease.released and lease.views_alive()
            if viewed:
                self._viewed.append(lease)  # kept or released once its views are gone
            keep = not lease.released and not viewed and self._keep(lease)
        if not keep and not viewed:
            lease.release()

    def trim(self) -> None:
        """Release every kept lease and restart the peak from what is in use now."""
        with self._mu:
            spare = self._spare.drain() + self._viewed
            self._viewed = []
            self._peak = self._in_use
        for lease in spare:
            lease.release()

    def lease_stats(self) -> dict[str, int]:
        """Bytes of leases in use, kept for reuse, the peak in use since the last trim, and
        freed leases still viewed by a tensor (their memory returns with the views)."""
        with self._mu:
            return {"in_use_bytes": self._in_use, "kept_bytes": self._spare.bytes,
                    "peak_bytes": self._peak,
                    "viewed_bytes": sum(lease.size for lease in self._viewed)}

    def lease_of(self, tensor: Any) -> Optional[Lease]:
        """The lease whose memory holds all of ``tensor``, if any."""
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        with self._mu:
            for addr, lease in self._leases.items():
                if addr <= start and end <= addr + lease.size:
                    return lease
        return None

    def close(self) -> None:
        """Close every store, the engine and the pool."""
        with self._mu:
            stores = list(self._stores.values())
            self._stores.clear()
            leases = list(self._leases.values())
            leases += self._spare.drain()
            leases += self._viewed
            self._leases.clear()
            self._viewed = []
        for st in stores:
            st.close()
        for lease in leases:
            lease.release()
        self.engine.close()
        try:
            self.pool.close()
        except Exception:  # leases still viewed by DeepSpeed tensors at exit
            pass


_RUNTIME: Optional[Runtime] = None
_RUNTIME_MU = threading.Lock()


def runtime(options: Options, aio_config: Any, pin_memory: bool,
            aio_given: bool = True) -> Runtime:
    """The process's :class:`Runtime`, built on first use (``aio_given``: the DeepSpeed
    config had an ``aio`` block of its own, see :class:`Runtime`)."""
    global _RUNTIME
    with _RUNTIME_MU:
        if _RUNTIME is None:
            _RUNTIME = Runtime(options, aio_engine_settings(aio_config),
                               "auto" if pin_memory else "off", aio_given)
        return _RUNTIME


def current_runtime() -> Optional[Runtime]:
    """The runtime if one was built (for stats and tests)."""
    return _RUNTIME


def shutdown() -> None:
    """Close the runtime (tests; at exit the OS reclaims everything anyway)."""
    global _RUNTIME
    with _RUNTIME_MU:
        rt, _RUNTIME = _RUNTIME, None
    if rt is not None:
        rt.close()
