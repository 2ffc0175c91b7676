"""How a swap area's space is managed: placing extents, growing the area, reusing old ones.

:class:`AreaSpace` is a part of :class:`memascend.store.SwapStore` (its methods run with the
store's lock held and use its allocator, file and manifest). An extent is placed in free
space; when there is none the area grows (posix_fallocate) by what the tensor needs plus a
little ahead (:data:`GROW_AHEAD_DIV`, never into space the filesystem cannot spare,
:data:`GROW_RESERVE_SHARE`). An overwritten or deleted key's extent is released once no read
of it is in flight; a non-durable store frees it then, a durable one quarantines it until the
next sync (fsync of the area and the journal), reclaimed when it exceeds ``sync_slack`` of the
stored bytes or when growing fails.

A tensor that no free extent holds is split over several (at least :data:`SPAN_MIN` each, at
most :data:`SPAN_MAX`) before the area grows for it, so that free space splintered by
tensors of many sizes is used. A non-durable store also keeps its area close to what it holds
while overwrites stream in:
when a write finds no free extent but the overwrites in flight will free enough room once
they land, it waits for them in a first-in, first-out queue instead of growing the area, as
long as at least ``write_window`` bytes of writes are in flight (so the disk stays busy). The
caller never blocks: :meth:`SwapStore.write` returns its handle at once, and a queued write
is started from the store's helper thread when room frees up. Without this, every overwrite
in flight needs its own room, and the area grows by the write-behind of the tiers above it.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, Optional

from .background import run_in_background
from .errors import SwapIOError
from .extents import ALIGN, round_up
from .handle import SwapHandle
from .manifest import Entry

GROW_RESERVE_SHARE = 0.05  # speculative growth leaves this share of the filesystem free ...
GROW_RESERVE_MAX = 1 << 30  # ... or this much, whichever is less
GROW_AHEAD_DIV = 64  # growing ahead adds at most 1/64 of the area (the area stays within
GROW_AHEAD_MIN = 1 << 20  # ~1.016x of what it needs), but at least 1 MiB
SPAN_MIN = 1 << 20  # a tensor no free extent holds may be split over free extents of at
SPAN_MAX = 16       # least 1 MiB, at most 16 of them, before the area grows for it

Spans = tuple[tuple[int, int], ...]  # (offset, length) extents holding a key's bytes, in order


def map_range(spans: Spans, start: int, nbytes: int) -> list[tuple[int, int, int]]:
    """``(area offset, position, length)`` pieces of the bytes ``[start, start+nbytes)`` of
    a key that lies in ``spans`` (position: from ``start``)."""
    out = []
    pos = 0  # the key's byte where the current span begins
    for off, n in spans:
        lo, hi = max(start, pos), min(start + nbytes, pos + n)
        if lo < hi:
            out.append((off + lo - pos, lo - start, hi - lo))
        pos += n
        if pos >= start + nbytes:
            break
    return out


@dataclass(eq=False)
class _Write:
    """One write of :meth:`SwapStore.write`, from its call until it lands."""

    key: str
    addr: int
    nbytes: int
    room: Optional[int]
    keep: Any
    dtype: Optional[str]
    shape: tuple
    out: SwapHandle
    seq: int = 0
    frees: int = 0  # bytes of the old version its landing releases (an overwrite)
    part: Any = None  # a piece of this piecewise overwrite (memascend.store_pieces)
    start: int = 0  # a piece's first byte in the key


class AreaSpace:
    """Extent placement, growth and reuse of :class:`~memascend.store.SwapStore`."""

    def _place_or_queue(self, job: _Write) -> Optional[Spans]:
        """Extents for ``job`` (lock held), or None when it was queued to wait for the
        overwrites in flight (see the module docstring). Raises as :meth:`_allocate` does."""
        spans = None if self._queue else self._place(job)
        if spans is None:
            self._queue.append(job)
            self._counts["writes_waited"] += 1
            return None
        self._launched(job)
        return spans

    def _place(self, job: _Write) -> Optional[Spans]:
        """Extents for ``job`` (lock held): in free space, else None when it should wait for
        the overwrites in flight (:meth:`_waits`), else in a grown area (raises as
        :meth:`_allocate` does)."""
        spans = self._place_free(job.nbytes)
        if spans is None and not self._waits(job.nbytes):
            spans = ((self._allocate(job.key, job.nbytes, job.part is None),
                      round_up(job.nbytes)),)
        return spans

    def _place_free(self, nbytes: int) -> Optional[Spans]:
        """Room in the area's free space as it is (lock held): one extent if one fits, else
        several (:data:`SPAN_MIN`, :data:`SPAN_MAX`), else None."""
        off = self._alloc.alloc(nbytes)
        if off is not None:
            return ((off, round_up(nbytes)),)
        spans = self._alloc.alloc_spans(nbytes, SPAN_MIN, SPAN_MAX)
        if spans is not None:
            self._counts["writes_split"] += 1
        return spans

    def _waits(self, nbytes: int) -> bool:
        """Whether a write of ``nbytes`` finding no free extent should wait rather than grow
        the area (lock held): only in a non-durable store (a durable one quarantines what
        overwrites release until the next sync), only while at least ``write_window`` bytes
        of writes are in flight, and only when what they will release, with what is free,
        could hold it."""
        if self.config.durable or self._inflight_bytes < self.config.write_window:
            return False
        return self._freeing > 0 and self._freeing + self._alloc.free_bytes >= round_up(nbytes)

    def _launched(self, job: _Write) -> None:
        """``job`` got its extent and is about to start (lock held)."""
        if job.part is not None:  # a piece frees its range of the old version
            job.frees = round_up(job.nbytes)
        else:
            cur = self._table.get(job.key)
            job.frees = round_up(cur.nbytes) if cur is not None else 0
        self._inflight_bytes += round_up(job.nbytes)
        self._freeing += job.frees

    def _issue(self, job: _Write) -> None:
        """``job`` was placed or queued (lock held)."""
        self._issued[job.key] = self._issued.get(job.key, 0) + 1

    def _settled(self, job: _Write) -> None:
        """``job`` is over, landed or failed (lock held): a tombstone of its key is needed
        no longer once no write of the key issued before it is in flight."""
        n = self._issued.get(job.key, 1) - 1
        if n:
            self._issued[job.key] = n
        else:
            self._issued.pop(job.key, None)
            self._tombstones.pop(job.key, None)

    def _landed(self, job: _Write) -> None:
        """``job``'s I/O is over, done or failed, and its outcome recorded (lock held): it
        is settled, and queued writes may go now."""
        self._inflight_bytes -= round_up(job.nbytes)
        self._freeing -= job.frees
        self._settled(job)
        self._kick()

    def _kick(self) -> None:
        """Start the queued writes that fit, on the helper thread (lock held). Never raises:
        once the interpreter is shutting down the executor refuses work, and a thread of
        its own drains instead (or, if even that is refused, :meth:`close`)."""
        if self._queue and not self._draining:
            self._draining = True
            try:
                self._in_background(self._drain)
            except RuntimeError:
                self._draining = False

    def _in_background(self, fn: Any) -> None:
        """Run ``fn`` on the store's helper threads (:func:`memascend.background
        .run_in_background`: a thread of its own at interpreter shutdown). RuntimeError if
        neither can start."""
        run_in_background(self._bg, fn, name="memascend-store-helper")

    def _drain(self) -> None:
        """Place and start queued writes in order until one has to wait again. A write that
        cannot be placed at all (ENOSPC, the journal refusing) fails its handle."""
        start: list[tuple[_Write, Spans]] = []
        failed: list[tuple[_Write, BaseException]] = []
        with self._mu:
            self._draining = False
            while self._queue:
                job = self._queue[0]
                try:
                    self._check_writable(job.key)
                    spans = self._place(job)
                except Exception as exc:  # noqa: BLE001 - handed to the caller's handle
                    self._queue.popleft()
                    self._settled(job)
                    failed.append((job, exc))
                    continue
                if spans is None:
                    break
                self._queue.popleft()
                self._launched(job)
                start.append((job, spans))
        for job, spans in start:
            try:
                self._launch(job, spans)
            except Exception as exc:  # noqa: BLE001 - handed to the caller's handle
                failed.append((job, exc))
        for job, exc in failed:
            self._end()
            job.out.set_exception(exc)

    def _allocate(self, key: str, nbytes: int, whole: bool = True) -> int:
        """An extent for ``nbytes`` (store lock held): reuse free space; reclaim quarantined
        extents (fsync) once they exceed ``sync_slack`` of the stored bytes, or when the
        filesystem has no space to spare; else grow; and when growing fails, reclaim
        whatever is quarantined before giving up. ``whole``: False for a piece of a
        piecewise overwrite (its error then says so)."""
        off = self._alloc.alloc(nbytes)
        if off is None and self._quarantine:
            held = sum(n for _, n in self._quarantine)
            stored = self._alloc.used_bytes - held
            if held >= max(self.config.grow_bytes, self.config.sync_slack * stored) or \
                    (not self._is_block and self._fs_spare() < round_up(nbytes)):
                # reclaiming is cheaper than taking space the filesystem cannot spare
                self._sync_locked()
                off = self._alloc.alloc(nbytes)
        if off is not None:
            return off
        try:
            return self._grow_and_allocate(key, nbytes, whole)
        except SwapIOError:
            if not self._quarantine:
                raise
            self._sync_locked()  # a full disk or capacity: reclaim before failing
            off = self._alloc.alloc(nbytes)
            if off is None:
                return self._grow_and_allocate(key, nbytes, whole)
            return off

    def _grow_and_allocate(self, key: str, nbytes: int, whole: bool = True) -> int:
        need = round_up(nbytes)
        limit = self.config.capacity
        if self._is_block:
            raise self._err(errno.ENOSPC, f"no room for {nbytes} bytes on block device "
                            f"({self._alloc.free_bytes} bytes free, fragmented or full)", key,
                            nbytes=nbytes)
        old = self._alloc.size
        tail_free = 0
        free = self._alloc.free_extents()
        if free and free[-1][0] + free[-1][1] == old:
            tail_free = free[-1][1]
        must = need - tail_free  # growth this tensor cannot do without
        new = old + must + self._speculative(must)
        if limit is not None:
            new = min(new, limit)
            if new - old + tail_free < need:
                hint = (f"; overwriting {key!r} needs room for the old and new version at "
                        "once (crash safety)" if whole and key in self._table else
                        f"; a piece of a piecewise overwrite of {key!r}" if not whole else "")
                raise self._err(errno.ENOSPC, f"store capacity {limit} bytes exhausted: "
                                f"{self._alloc.used_bytes} used, cannot place {nbytes} bytes"
                                + hint, key, nbytes=nbytes)
        minimal = old + must
        while True:
            try:
                os.posix_fallocate(self._fd, old, new - old)
                break
            except OSError as exc:
                # The filesystem may have grown the file partly: keep only whole, known space.
                try:
                    os.ftruncate(self._fd, old)
                except OSError:
                    pass
                if exc.errno == errno.ENOSPC and new > minimal:
                    new = minimal  # the free space shrank meanwhile: just what is needed
                    continue
                raise self._err(exc.errno or errno.EIO, f"cannot grow the swap area from "
                                f"{old} to {new} bytes (+{new - old}) to place {nbytes} bytes: "
                                f"{exc.strerror}", key, nbytes=nbytes) from exc
        self._alloc.grow(new)
        off = self._alloc.alloc(nbytes)
        if off is None:  # cannot happen after growing by at least `need`
            raise self._err(errno.ENOSPC, "allocation failed after growth", key, nbytes=nbytes)
        return off

    def _speculative(self, must: int) -> int:
        """Bytes to grow beyond ``must`` (up to ``grow_bytes`` in all): at most 1/64 of the
        area (at least 1 MiB), so that the area stays close to what it holds, and at most
        half of the free space left after ``must`` and a reserve (5 % of the filesystem, at
        most 1 GiB), so that growing ahead never fills the disk for other files, the other
        tiers' journals or other processes."""
        extra = min(self.config.grow_bytes - must,
                    max(self._alloc.size // GROW_AHEAD_DIV // ALIGN * ALIGN, GROW_AHEAD_MIN))
        if extra <= 0:
            return 0
        spare = (self._fs_spare() - must) // 2
        return max(0, min(extra, spare // ALIGN * ALIGN))

    def _fs_spare(self) -> int:
        """Free bytes of the area's filesystem beyond the growth reserve (may be negative;
        0 when it cannot be told)."""
        try:
            st = os.fstatvfs(self._fd)
        except OSError:
            return 0
        reserve = min(GROW_RESERVE_MAX, st.f_blocks * st.f_frsize * GROW_RESERVE_SHARE)
        return int(st.f_bavail * st.f_frsize - reserve)

    def _release(self, entry: Entry) -> None:
        """The extents of an entry no key points to any more (lock held): retired once no
        read of it is in flight (:meth:`_retire`)."""
        pinned = bool(self._readers.get(entry.offset))
        for off, n in entry.spans():
            if pinned:
                self._deferred.append((entry.offset, off, n))
            else:
                self._retire(off, n)

    def _free_spans(self, spans: Spans) -> None:
        """Give back extents no record points to (lock held; a write that failed)."""
        for off, n in spans:
            self._alloc.free(off, n)

    def _retire(self, offset: int, nbytes: int) -> None:
        """Free an extent no key points to and no read uses (lock held). Durable: quarantined
        until the next sync, since until then a power loss may bring back the journal record
        that pointed to it. Not durable: free now. The record that replaced it was appended
        before the write was acknowledged, and a killed process loses no completed append (it
        is in the page cache), so a reopen after a kill never points here."""
        if self.config.durable:
            self._quarantine.append((offset, nbytes))
        else:
            self._alloc.free(offset, nbytes)
            self._kick()

    def _pin(self, offset: int) -> None:
        """Keep the entry whose first extent is at ``offset`` from being reused while it is
        read (lock held)."""
        self._readers[offset] = self._readers.get(offset, 0) + 1

    def _unpin(self, offset: int) -> None:
        """The end of a read of the entry at ``offset`` (lock held): extents released
        meanwhile are retired once its last reader is done."""
        n = self._readers.get(offset, 1) - 1
        if n:
            self._readers[offset] = n
            return
        self._readers.pop(offset, None)
        keep = []
        for pin, off, nb in self._deferred:
            if pin == offset:
                self._retire(off, nb)
            else:
                keep.append((pin, off, nb))
        self._deferred = keep

    def _sync_locked(self) -> None:
        if self.config.durable:
            try:
                os.fsync(self._fd)
            except OSError as exc:
                raise self._err(exc.errno or errno.EIO, f"fsync of the swap area failed: "
                                f"{exc.strerror}", None) from exc
            try:
                self._manifest.sync()
            except OSError as exc:
                raise SwapIOError(exc.errno or errno.EIO, f"fsync of the journal failed: "
                                  f"{exc.strerror}", path=self._manifest.journal_path) from exc
        for off, n in self._quarantine:
            self._alloc.free(off, n)
        self._quarantine.clear()
        self._counts["syncs"] += 1
