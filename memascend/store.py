"""SwapStore: one swap area per tier, holding tensors by key, durable and checked.

The area is a single preallocated regular file (grown with fallocate in ``grow_bytes`` steps
up to ``capacity``) or a raw block device. An extent allocator places each tensor; a
manifest (snapshot + journal, see :mod:`memascend.manifest`) maps keys to extents with their
dtype, shape and CRC32C, so a store can be closed and reopened.

Safety rules:
- An overwrite goes to a *new* extent; the key switches to it only after every byte is
  written. In a durable store the old extent is not reused before the next :meth:`sync`;
  in a non-durable one it is reused as soon as the record of the switch is appended (and no
  read of it is in flight), so the area stays about as large as what it stores. After a
  crash (durable) or a killed process (either), reopening gives the old or the new version
  of each key, never a torn one. The price: an overwrite needs room for both versions at
  once.
- ENOSPC (file growth, write or journal append) raises
  :class:`~memascend.errors.SwapIOError` naming key, path, offset and size; the source tensor
  is untouched and every stored key stays readable. A write is acknowledged only once its
  journal record is whole (:mod:`memascend.manifest`), so a reopen never loses one.
- Damaged metadata (a journal line failing its CRC, a manifest of the wrong shape, a key
  past the end of the area) fails the open with :class:`~memascend.errors.MetadataError`
  naming the file and offset, never a silently smaller store. Metadata files are 0600 in a
  0700 folder.
- With ``checksum="crc32c"`` (default) every read is verified; a mismatch raises
  :class:`~memascend.errors.ChecksumError` naming the key.
- I/O is O_DIRECT: buffers, offsets and lengths aligned to 4096. Pool leases are used as they
  are; other memory (any tensor, bytes) is bounced through aligned leases in chunks.
- One process at a time: the metadata folder is locked (flock).
- ``journal=False`` (non-durable scratch areas their owners open with ``reset=True``): no
  journal record per change; the table reaches the snapshot when the store closes, and a store that
  was not closed refuses to reopen except with ``reset=True``.

Four parts live in modules of their own: how the area's space is placed, grown and reused
(:mod:`memascend.store_space`), the checkpoint exchange, export and import
(:mod:`memascend.store_exchange`), reading (:mod:`memascend.store_read`) and writing
(:mod:`memascend.store_write`).
"""
from __future__ import annotations

import collections
import dataclasses
import errno
import fcntl
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from .config import resolve
from .engine import SwapEngine
from .errors import (ConfigError, KeyNotFoundError, MetadataError, StoreLockedError,
                     SwapIOError)
from .extents import ALIGN, ExtentAllocator, round_up
from .files import private_open
from .manifest import Entry, Manifest
from .pool import PinnedPool
from .store_config import StoreConfig, StoreStats
from .store_exchange import Exchange, place_entries, read_export
from .store_pieces import Pieces
from .store_read import Reading, crc32c
from .store_space import AreaSpace, _Write
from .store_write import Writing, _keyed

__all__ = ["SwapStore", "StoreConfig", "StoreStats", "crc32c", "read_export", "place_entries"]


class SwapStore(Writing, Pieces, AreaSpace, Exchange, Reading):
    """Tensors by key in one swap area (see the module docstring).

    Parameters
    ----------
    path:
        A regular file (created if missing) or a block device.
    capacity, checksum:
        See :class:`StoreConfig`; other fields as keyword options.
    engine:
        The :class:`SwapEngine` to use (default: a new one with ``backend="auto"``, closed
        with the store).
    pool:
        Pinned pool for bounce buffers (default: a new ``PinnedPool(lock="auto")``).

    Raises
    ------
    ConfigError
        Bad options (e.g. a block device without ``meta_dir``).
    StoreLockedError
        Another process has the store open.
    SwapIOError
        The path cannot be opened, or refuses O_DIRECT with ``direct="on"``.
    """

    def __init__(self, path: str, capacity: Any = None, checksum: Optional[str] = None, *,
                 engine: Optional[SwapEngine] = None, pool: Optional[PinnedPool] = None,
                 config: Optional[StoreConfig] = None, reset: bool = False, **options: Any):
        overrides = dict(options, capacity=capacity, checksum=checksum)
        config = resolve(StoreConfig, "STORE", config, overrides)
        self.config = config
        self.path = os.path.abspath(path)
        self._mu = threading.Condition()
        self._closed = True
        self._is_block = os.path.exists(self.path) and stat.S_ISBLK(os.stat(self.path).st_mode)
        if self._is_block and not config.meta_dir:
            raise ConfigError("meta_dir", f"{self.path} is a block device: give meta_dir, a "
                                          "folder on a filesystem for the manifest")
        self.meta_dir = os.path.abspath(config.meta_dir or self.path + ".meta")
        self._manifest = Manifest(self.meta_dir)
        self._lock_fd = private_open(os.path.join(self.meta_dir, "lock"), os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise StoreLockedError(f"swap store {self.path} is open elsewhere (lock "
                                   f"{self.meta_dir}/lock held)") from None
        try:
            self._open_area()
            if reset:
                self._reset()
            self._load()
            if not config.journal:  # a reopen after a kill must not trust the snapshot
                try:
                    self._manifest.compact(list(self._table.values()), self._header(),
                                           self._seq)
                except OSError as exc:
                    raise SwapIOError(exc.errno or errno.EIO, f"cannot mark the swap store "
                                      f"open: {exc.strerror or exc}",
                                      path=self._manifest.snapshot_path) from exc
        except BaseException:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            if getattr(self, "_fd", -1) >= 0:
                os.close(self._fd)
            raise
        self._own_engine = engine is None
        self.engine = engine if engine is not None else SwapEngine()
        self._own_pool = pool is None
        self.pool = pool if pool is not None else PinnedPool(lock="auto")
        self._file = self.engine.register_file(self._fd, self.path)
        self._bg = ThreadPoolExecutor(max_workers=2, thread_name_prefix="memascend-bounce")
        self._pending = 0
        self._readers: dict[int, int] = {}
        self._deferred: list[tuple[int, int, int]] = []  # (entry pinned, offset, length)
        self._quarantine: list[tuple[int, int]] = []
        # key -> seq of its delete or rename, kept only while a write of it issued before
        # is in flight (that write must then lose); writes issued and not landed, by key
        self._tombstones: dict[str, int] = {}
        self._issued: dict[str, int] = {}
        self._pieced: dict[str, Any] = {}  # key -> its piecewise write in flight
        self._queue: collections.deque[_Write] = collections.deque()  # see store_space
        self._draining = False
        self._inflight_bytes = 0
        self._freeing = 0
        self._counts = {"writes": 0, "writes_waited": 0, "writes_split": 0,
                        "writes_pieced": 0, "reads": 0,
                        "bytes_written": 0, "bytes_read": 0, "write_errors": 0, "read_errors": 0,
                        "checksum_failures": 0, "bounced_bytes": 0, "syncs": 0}
        self._closed = False

    # ---- opening ----
    def _open_area(self) -> None:
        flags = os.O_RDWR | (0 if self._is_block else os.O_CREAT)
        want_direct = self.config.direct != "off"
        self.direct = False
        fd = -1
        if want_direct:
            try:
                fd = os.open(self.path, flags | os.O_DIRECT, 0o600)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL or self.config.direct == "on":
                    raise SwapIOError(exc.errno or errno.EIO,
                                      f"cannot open swap area with O_DIRECT: {exc.strerror}"
                                      + ("; this filesystem refuses O_DIRECT (tmpfs?): use "
                                         "direct='auto' or 'off'" if exc.errno == errno.EINVAL
                                         else ""), path=self.path) from exc
        if fd < 0:
            try:
                fd = os.open(self.path, flags, 0o600)
            except OSError as exc:
                raise SwapIOError(exc.errno or errno.EIO, f"cannot open swap area: "
                                  f"{exc.strerror}", path=self.path) from exc
        self._fd = fd
        if self._is_block:
            self._device_size = os.lseek(fd, 0, os.SEEK_END) // ALIGN * ALIGN
        else:
            self._device_size = None
            if os.fstat(fd).st_mode & 0o077:  # ours: tensors are nobody else's to read
                os.fchmod(fd, 0o600)

    def _reset(self) -> None:
        """Start empty (``reset=True``; lock held): an empty snapshot, no journal, a file area
        cut to nothing. Whatever was there, damaged or not, is discarded."""
        try:
            if not self._is_block:
                os.ftruncate(self._fd, 0)
            self._manifest.compact([], {}, 0)
        except OSError as exc:
            raise SwapIOError(exc.errno or errno.EIO, f"cannot reset the swap store: "
                              f"{exc.strerror or exc}", path=self.path) from exc

    def _load(self) -> None:
        try:
            entries, header, seq = self._manifest.load()
        except MetadataError:
            raise
        except OSError as exc:
            raise SwapIOError(exc.errno or errno.EIO, f"cannot read the manifest: {exc}",
                              path=self._manifest.snapshot_path) from exc
        if header.get("importing"):
            raise MetadataError(
                f"an import from {header['importing']} into the swap store {self.path} was "
                "interrupted: its contents are partial. Import again, or open it with "
                "reset=True to start empty", path=self._manifest.snapshot_path)
        if header.get("unjournaled"):
            raise MetadataError(
                f"the swap store {self.path} was open without a journal (journal=False) and "
                "was not closed: what it held then is unknown. Open it with reset=True to "
                "start empty", path=self._manifest.snapshot_path)
        self._seq = seq
        if self._is_block:
            size = self._device_size
            if self.config.capacity:
                size = min(size, self.config.capacity)
        else:
            size = os.fstat(self._fd).st_size // ALIGN * ALIGN
        self._alloc = ExtentAllocator(size)
        self._table: dict[str, Entry] = place_entries(self._alloc, entries.values(), self.path,
                                                      self._manifest.folder)

    # ---- helpers ----
    def _header(self, **extra: Any) -> dict[str, Any]:
        """The snapshot header of an open store (a store without a journal says so, so that
        a reopen after a kill refuses its snapshot)."""
        head = {"area_bytes": self._alloc.size, **extra}
        if not self.config.journal:
            head["unjournaled"] = True
        return head

    def _record(self, rec: dict[str, Any]) -> None:
        """Append a journal record (lock held); nothing without a journal."""
        if self.config.journal:
            self._manifest.append(rec)

    def _err(self, code: int, msg: str, key: Optional[str], offset: Optional[int] = None,
             nbytes: Optional[int] = None) -> SwapIOError:
        return SwapIOError(code, msg, path=self.path, offset=offset, nbytes=nbytes, key=key)

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"swap store {self.path} is closed")

    def _check_writable(self, key: str) -> None:
        """Refuse a change (lock held) once the journal could not be kept replayable."""
        broken = self._manifest.broken
        if broken is not None:
            raise MetadataError(f"swap store {self.path} takes no more writes: "
                                f"{broken.strerror}", path=broken.path or "",
                                offset=broken.offset, key=key,
                                code=broken.errno or errno.EIO) from broken

    def _begin(self) -> None:
        with self._mu:
            self._pending += 1

    def _end(self) -> None:
        with self._mu:
            self._pending -= 1
            self._mu.notify_all()

    # ---- table ----
    def info(self, key: str) -> Entry:
        """The entry of ``key`` (offset, nbytes, dtype, shape, crc).

        Raises
        ------
        KeyNotFoundError
            Names the key and the store.
        """
        with self._mu:
            e = self._table.get(key)
        if e is None:
            raise KeyNotFoundError(f"swap store {self.path} holds no key {key!r} "
                                   f"({len(self._table)} keys stored)")
        return e

    def keys(self) -> list[str]:
        """The stored keys."""
        with self._mu:
            return list(self._table)

    def __contains__(self, key: object) -> bool:
        with self._mu:
            return key in self._table

    def __len__(self) -> int:
        with self._mu:
            return len(self._table)

    def delete(self, key: str) -> None:
        """Forget ``key``; its extent is reused after the next sync (at once in a non-durable
        store). Writes of ``key`` in flight lose (a piecewise one's pieces still to land are
        given back). Never blocks.

        Raises
        ------
        KeyNotFoundError
            The store does not hold ``key``.
        SwapIOError
            The journal append failed (e.g. ENOSPC): ``key`` stays stored.
        MetadataError
            The store takes no more changes (see :meth:`write`).
        """
        self._check_open()
        with self._mu:
            e = self._table.get(key)
            if e is None:
                raise KeyNotFoundError(f"swap store {self.path} holds no key {key!r}")
            self._check_writable(key)
            self._seq += 1
            try:
                self._record({"seq": self._seq, "op": "del", "key": key})
            except MetadataError as err:
                raise _keyed(err, key) from err
            except OSError as err:  # cut back: the key stays stored
                raise self._err(err.errno or errno.EIO, f"journal append of the delete "
                                f"failed: {err}", key, e.offset, e.nbytes) from err
            del self._table[key]
            if self._issued.get(key):
                self._tombstones[key] = self._seq
            self._release(e)

    def rename(self, key: str, new_key: str) -> None:
        """Move the stored ``key`` to ``new_key`` without moving bytes (one journal record).

        A version ``new_key`` had is released as by an overwrite. A write of ``key`` still in
        flight loses to the rename (as it would to a delete); one of ``new_key`` loses too.
        A piecewise overwrite of ``key`` in flight (``piece_bytes``) is waited for first, so
        ``new_key`` gets a whole version: do not rename from an I/O completion callback.

        Raises
        ------
        KeyNotFoundError
            The store does not hold ``key``.
        SwapIOError
            The journal append failed (e.g. ENOSPC): nothing changed.
        MetadataError
            The store takes no more changes (see :meth:`write`).
        """
        self._check_open()
        if not isinstance(new_key, str) or not new_key:
            raise ValueError(f"new_key must be a non-empty string, got {new_key!r}")
        with self._mu:
            self._wait_pieces(key)
            e = self._table.get(key)
            if e is None:
                raise KeyNotFoundError(f"swap store {self.path} holds no key {key!r}")
            if new_key == key:
                return
            self._check_writable(new_key)
            self._seq += 1
            moved = dataclasses.replace(e, key=new_key, seq=self._seq)
            try:
                self._record({"seq": self._seq, "op": "mv", "key": key,
                              "entry": moved.to_json()})
            except MetadataError as err:
                raise _keyed(err, key) from err
            except OSError as err:
                raise self._err(err.errno or errno.EIO, f"journal append of the rename to "
                                f"{new_key!r} failed: {err}", key, e.offset, e.nbytes) from err
            del self._table[key]
            if self._issued.get(key):
                self._tombstones[key] = self._seq
            old = self._table.get(new_key)
            self._table[new_key] = moved
            self._tombstones.pop(new_key, None)
            if old is not None:
                self._release(old)

    def sync(self) -> None:
        """Make everything written so far durable (fsync data and journal).

        Raises
        ------
        SwapIOError
            fsync failed (e.g. EIO): what was written may not be durable.
        """
        self._check_open()
        with self._mu:
            self._sync_locked()

    def _replace_table(self, entries: dict[str, Entry], size: int) -> None:
        """Hold exactly ``entries`` in an area of ``size`` bytes (lock held, no I/O pending)."""
        self._alloc = ExtentAllocator(size)
        self._table = place_entries(self._alloc, entries.values(), self.path, self.meta_dir)
        self._quarantine.clear()
        self._deferred.clear()
        self._tombstones.clear()
        self._issued.clear()

    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        with self._mu:
            q = sum(round_up(n) for _o, n in self._quarantine) + \
                sum(round_up(n) for _p, _o, n in self._deferred)
            return StoreStats(keys=len(self._table), area_bytes=self._alloc.size,
                              used_bytes=self._alloc.used_bytes,
                              free_bytes=self._alloc.free_bytes, quarantined_bytes=q,
                              stored_bytes=sum(e.nbytes for e in self._table.values()),
                              direct=self.direct, **self._counts)

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Wait until no read or write is in flight; False on timeout."""
        with self._mu:
            return self._mu.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Wait for in-flight I/O, write a manifest snapshot, release the area. Idempotent.

        Raises
        ------
        SwapIOError
            The snapshot could not be written (e.g. ENOSPC) or fsync failed. The store is
            closed all the same, and its journal still holds every stored key: reopening it
            replays the journal (a store with ``journal=False`` stays marked as not closed
            and reopens only with ``reset=True``).
        """
        if self._closed:
            return
        while not self.wait_idle(0.2):
            with self._mu:  # queued writes nobody could start (interpreter shutdown)
                stranded = bool(self._queue) and not self._draining
                if stranded:
                    self._draining = True
            if stranded:
                self._drain()
        self._bg.shutdown(wait=True)
        failure: Optional[SwapIOError] = None
        with self._mu:
            self._closed = True
            try:
                self._sync_locked()
                self._manifest.compact(list(self._table.values()),
                                       {"area_bytes": self._alloc.size}, self._seq)  # closed
            except SwapIOError as exc:
                failure = exc
            except OSError as exc:
                failure = SwapIOError(
                    exc.errno or errno.EIO, f"closing {self.path}: cannot write the manifest "
                    f"snapshot ({exc.strerror or exc}); " +
                    ("the journal still holds every key and the store reopens from it"
                     if self.config.journal else "the store has no journal: it reopens only "
                     "with reset=True"), path=self._manifest.snapshot_path)
                failure.__cause__ = exc
            finally:
                self._manifest.close()
                self.engine.unregister_file(self._file)
                os.close(self._fd)
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
                os.close(self._lock_fd)
        if self._own_engine:
            self.engine.close()
        if self._own_pool:
            self.pool.close()
        if failure is not None:
            raise failure

    def __enter__(self) -> "SwapStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SwapStore {self.path} keys={len(self)} closed={self._closed}>"
