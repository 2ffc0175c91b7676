"""How a swap area's space is managed: placing extents, growing the area, reusing old ones.

:class:`AreaSpace` is a part of :class:`memascend.store.SwapStore` (its methods run with the
store's lock held and use its allocator, file and manifest). An extent is placed in free
space; when there is none the area grows (posix_fallocate) by what the tensor needs plus a
little ahead (:data:`GROW_AHEAD_DIV`, never into space the filesystem cannot spare,
:data:`GROW_RESERVE_SHARE`). An overwritten or deleted key's extent is released once no read
of it is in flight; a non-durable store frees it then, a durable one quarantines it until the
next sync (fsync of the area and the journal), reclaimed when it exceeds ``sync_slack`` of the
stored bytes or when growing fails.
"""
from __future__ import annotations

import errno
import os

from .errors import SwapIOError
from .extents import ALIGN, round_up

GROW_RESERVE_SHARE = 0.05  # speculative growth leaves this share of the filesystem free ...
GROW_RESERVE_MAX = 1 << 30  # ... or this much, whichever is less
GROW_AHEAD_DIV = 16  # growing ahead adds at most 1/16 of the area (the area stays within
GROW_AHEAD_MIN = 1 << 20  # ~1.06x of what it needs), but at least 1 MiB


class AreaSpace:
    """Extent placement, growth and reuse of :class:`~memascend.store.SwapStore`."""

    def _allocate(self, key: str, nbytes: int) -> int:
        """An extent for ``nbytes`` (store lock held): reuse free space; reclaim quarantined
        extents (fsync) once they exceed ``sync_slack`` of the stored bytes, or when the
        filesystem has no space to spare; else grow; and when growing fails, reclaim
        whatever is quarantined before giving up."""
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
            return self._grow_and_allocate(key, nbytes)
        except SwapIOError:
            if not self._quarantine:
                raise
            self._sync_locked()  # a full disk or capacity: reclaim before failing
            off = self._alloc.alloc(nbytes)
            if off is None:
                return self._grow_and_allocate(key, nbytes)
            return off

    def _grow_and_allocate(self, key: str, nbytes: int) -> int:
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
                        "once (crash safety)" if key in self._table else "")
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
        """Bytes to grow beyond ``must`` (up to ``grow_bytes`` in all): at most 1/16 of the
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

    def _release_extent(self, offset: int, nbytes: int) -> None:
        """An extent no key points to (lock held): retired once no read of it is in flight
        (:meth:`_retire`)."""
        if self._readers.get(offset):
            self._deferred.append((offset, nbytes))
        else:
            self._retire(offset, nbytes)

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

    def _pin(self, offset: int) -> None:
        """Keep the extent at ``offset`` from being reused while it is read (lock held)."""
        self._readers[offset] = self._readers.get(offset, 0) + 1

    def _unpin(self, offset: int) -> None:
        """The end of a read of ``offset`` (lock held): an extent released meanwhile is
        retired once its last reader is done."""
        n = self._readers.get(offset, 1) - 1
        if n:
            self._readers[offset] = n
            return
        self._readers.pop(offset, None)
        keep = []
        for off, nb in self._deferred:
            if off == offset:
                self._retire(off, nb)
            else:
                keep.append((off, nb))
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
