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
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional

from . import _native
from .config import resolve
from .engine import SwapEngine
from .errors import (ChecksumError, ConfigError, KeyNotFoundError, MetadataError,
                     StoreLockedError, SwapIOError)
from .extents import ALIGN, ExtentAllocator, round_up
from .files import private_open
from .handle import SwapHandle
from .manifest import Entry, Manifest
from .pool import Lease, PinnedPool
from .store_config import StoreConfig, StoreStats

__all__ = ["SwapStore", "StoreConfig", "StoreStats", "crc32c", "read_export", "place_entries"]

GROW_RESERVE_SHARE = 0.05  # speculative growth leaves this share of the filesystem free ...
GROW_RESERVE_MAX = 1 << 30  # ... or this much, whichever is less
GROW_AHEAD_DIV = 16  # growing ahead adds at most 1/16 of the area (the area stays within
GROW_AHEAD_MIN = 1 << 20  # ~1.06x of what it needs), but at least 1 MiB

def crc32c(address: int, nbytes: int, crc: int = 0) -> int:
    """CRC32C of ``nbytes`` at ``address`` (native, GIL released)."""
    ffi, lib = _native.require()
    c = ffi.new("uint32_t *", crc)
    lib.ma_crc32c(c, ffi.cast("void *", address), nbytes)
    return int(c[0])


def _copy_range(src: int, dst: int, offset: int, nbytes: int,
                dst_offset: Optional[int] = None) -> None:
    """Copy ``nbytes`` at ``offset`` from one descriptor to the other, at ``dst_offset``
    (default: the same offset)."""
    to = offset if dst_offset is None else dst_offset
    done = 0
    while done < nbytes:
        try:
            n = os.copy_file_range(src, dst, nbytes - done, offset + done, to + done)
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            data = os.pread(src, min(nbytes - done, 8 << 20), offset + done)
            n = os.pwrite(dst, data, to + done) if data else 0
        if n == 0:
            raise OSError(errno.EIO, f"short copy at offset {offset + done}")
        done += n


def _memory_of(obj: Any, writable: bool) -> tuple[int, int, Optional[int], Any, Any, Any]:
    """``(address, nbytes, room, keepalive, dtype, shape)`` of a Lease, tensor or buffer.

    ``room`` is how many bytes may be touched from ``address`` (a lease's rounded size), or
    None when only ``nbytes`` may be.
    """
    if isinstance(obj, Lease):
        mv = obj.memoryview()
        return obj.address, obj.nbytes, obj.size, mv, None, None
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise ValueError(f"tensor on {obj.device}: the store moves host memory; copy it "
                             "to a pinned lease first")
        if not obj.is_contiguous():
            raise ValueError("tensor is not contiguous; call .contiguous() first")
        return (obj.data_ptr(), obj.numel() * obj.element_size(), None, obj,
                str(obj.dtype).replace("torch.", ""), tuple(obj.shape))
    ffi, _lib = _native.require()
    mv = memoryview(obj)
    if writable and mv.readonly:
        raise ValueError("destination buffer is read-only")
    cbuf = ffi.from_buffer(mv, require_writable=writable)
    return int(ffi.cast("uintptr_t", cbuf)), mv.nbytes, None, (mv, cbuf), None, None


def _keyed(err: MetadataError, key: str) -> MetadataError:
    """``err`` naming the key whose change it refused."""
    if err.key == key:
        return err
    out = MetadataError(err.strerror, path=err.path or "", offset=err.offset,
                        nbytes=err.nbytes, key=key, code=err.errno or errno.EIO)
    out.__cause__ = err
    return out


def place_entries(alloc: ExtentAllocator, entries: Iterable[Entry], area: str,
                  meta: str) -> dict[str, Entry]:
    """Reserve every entry's extent in ``alloc``; the table of them by key.

    Raises
    ------
    MetadataError
        An entry lies past the end of the area (the area file was truncated or replaced while
        its metadata folder was kept) or overlaps another: opening would lose keys.
    """
    table: dict[str, Entry] = {}
    for e in sorted(entries, key=lambda e: e.offset):
        if e.offset + round_up(e.nbytes) > alloc.size:
            raise MetadataError(
                f"key {e.key!r} lies at offset {e.offset} ({e.nbytes} bytes), past the end of "
                f"the swap area {area} ({alloc.size} bytes): the area was truncated or replaced "
                f"while its metadata ({meta}) was kept; restore both together, or remove both "
                "to start empty", path=area, offset=e.offset, nbytes=e.nbytes, key=e.key)
        try:
            alloc.reserve(e.offset, e.nbytes)
        except ValueError:
            raise MetadataError(
                f"key {e.key!r} at offset {e.offset} ({e.nbytes} bytes) overlaps another key "
                f"in the metadata of {area} ({meta}): the metadata is damaged", path=area,
                offset=e.offset, nbytes=e.nbytes, key=e.key) from None
        table[e.key] = e
    return table


def read_export(src_path: str) -> tuple[dict[str, Entry], int]:
    """The entries and last sequence number of the store exported to ``src_path``, checked
    (every entry inside the file, none overlapping) without opening it as a store.

    Raises
    ------
    MetadataError
        ``src_path`` has no metadata folder, or its metadata is damaged.
    SwapIOError
        The files cannot be read.
    """
    src_path = os.path.abspath(src_path)
    meta = src_path + ".meta"
    if not os.path.isdir(meta):
        raise MetadataError(f"cannot import {src_path}: it has no metadata folder {meta} (not "
                            "an exported store)", path=src_path, code=errno.ENOENT)
    try:
        manifest = Manifest(meta)
        try:
            entries, _header, seq = manifest.load()
        finally:
            manifest.close()
        size = os.stat(src_path).st_size // ALIGN * ALIGN
    except MetadataError:
        raise
    except OSError as exc:
        raise SwapIOError(exc.errno or errno.EIO, f"cannot read the exported store: {exc}",
                          path=src_path) from exc
    place_entries(ExtentAllocator(size), entries.values(), src_path, meta)
    return entries, seq


class SwapStore:
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
        self._deferred: list[tuple[int, int]] = []
        self._quarantine: list[tuple[int, int]] = []
        self._tombstones: dict[str, int] = {}  # key -> seq of its delete
        self._counts = {"writes": 0, "reads": 0, "bytes_written": 0, "bytes_read": 0,
                        "write_errors": 0, "read_errors": 0,
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

    def _begin(self) -> None:
        with self._mu:
            self._pending += 1

    def _end(self) -> None:
        with self._mu:
            self._pending -= 1
            self._mu.notify_all()

    # ---- writing ----
    def write(self, key: str, src: Any, *, dtype: Optional[str] = None,
              shape: Optional[Iterable[int]] = None, nbytes: Optional[int] = None) -> SwapHandle:
        """Store ``src`` (a Lease, a contiguous CPU tensor or a bytes-like) under ``key``.

        The handle's result is the number of bytes stored. ``src`` must not change until the
        handle is done. dtype/shape are recorded (taken from a tensor when not given).
        ``nbytes`` stores only the first ``nbytes`` of ``src`` (e.g. a recycled lease).

        Raises
        ------
        SwapIOError
            No space (ENOSPC) or the area cannot grow; raised at once, nothing changed. The
            handle fails with one when the write or its journal append fails: the key keeps
            its previous version, also after a reopen.
        MetadataError
            An earlier journal append failed and could not be cut back, so the store takes
            no more writes (reads still work); reopen it.
        ValueError
            Bad key or source.
        """
        self._check_open()
        if not isinstance(key, str) or not key:
            raise ValueError(f"key must be a non-empty string, got {key!r}")
        addr, have, room, keep, t_dtype, t_shape = _memory_of(src, writable=False)
        if nbytes is None:
            nbytes = have
        elif not 0 < nbytes <= have:
            raise ValueError(f"nbytes={nbytes} for {key!r}, but the source holds {have} bytes")
        if nbytes <= 0:
            raise ValueError(f"nothing to store for {key!r}: {nbytes} bytes")
        dtype = dtype if dtype is not None else t_dtype
        shape_t = tuple(int(s) for s in shape) if shape is not None else t_shape
        with self._mu:
            self._check_writable(key)
            offset = self._allocate(key, nbytes)
            self._seq += 1
            seq = self._seq
        # crc: with checksums on, computed on the completion thread (_write_done)
        entry = Entry(key, offset, nbytes, dtype, shape_t, None, seq)
        rounded = round_up(nbytes)
        aligned = addr % ALIGN == 0
        self._begin()
        try:
            if aligned and room is not None and room >= rounded:
                inner = self.engine.write(self._file, addr, rounded, offset, key=key)
            else:
                inner = self._bounced(key, "write", addr, nbytes, offset, keep,
                                      direct_len=nbytes // ALIGN * ALIGN if aligned else 0)
        except BaseException:
            with self._mu:
                self._alloc.free(offset, nbytes)
            self._end()
            raise
        out = SwapHandle(f"write of {key!r}")
        inner.add_done_callback(lambda h: self._write_done(h, entry, out, keep, addr))
        return out

    def _write_done(self, h: SwapHandle, entry: Entry, out: SwapHandle, keep: Any,
                    addr: int) -> None:
        exc = h.exception(0)
        if exc is None and self.config.checksum == "crc32c":
            # The source may not change before the handle is done (write's contract), so its
            # checksum now is that of the bytes written; computing it here keeps it off the
            # caller's thread.
            entry = dataclasses.replace(entry, crc=crc32c(addr, entry.nbytes))
        try:
            with self._mu:
                if exc is not None:
                    self._alloc.free(entry.offset, entry.nbytes)  # nothing points to it
                    self._counts["write_errors"] += 1
                else:
                    cur = self._table.get(entry.key)
                    newer = (cur is not None and cur.seq > entry.seq) or \
                        self._tombstones.get(entry.key, 0) > entry.seq
                    if newer:  # a newer write, or a delete issued after this write, won
                        self._release_extent(entry.offset, entry.nbytes)
                        self._counts["writes"] += 1
                        self._counts["bytes_written"] += entry.nbytes
                    else:
                        try:
                            self._check_writable(entry.key)
                            self._manifest.append({"seq": entry.seq, "op": "put",
                                                   "entry": entry.to_json()})
                        except OSError as err:
                            # Not acknowledged: the append was cut back (or the manifest
                            # refuses appends), so no record points at the extent.
                            self._alloc.free(entry.offset, entry.nbytes)
                            self._counts["write_errors"] += 1
                            exc = _keyed(err, entry.key) if isinstance(err, MetadataError) \
                                else self._err(err.errno or errno.EIO, f"journal append "
                                               f"failed: {err}", entry.key, entry.offset,
                                               entry.nbytes)
                        else:
                            self._table[entry.key] = entry
                            self._tombstones.pop(entry.key, None)
                            if cur is not None:
                                self._release_extent(cur.offset, cur.nbytes)
                            self._counts["writes"] += 1
                            self._counts["bytes_written"] += entry.nbytes
        finally:
            self._end()
        if exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(entry.nbytes)

    def _bounced(self, key: str, op: str, addr: int, nbytes: int, offset: int, keep: Any,
                 direct_len: int = 0) -> SwapHandle:
        """Move ``nbytes`` through aligned bounce leases, in chunks, on a helper thread.

        The first ``direct_len`` bytes (aligned memory, whole blocks) go directly.
        """
        out = SwapHandle(f"{op} of {key!r} (bounced)")
        ffi, _lib = _native.require()

        def run() -> None:
            try:
                if direct_len:
                    if op == "write":
                        self.engine.write(self._file, addr, direct_len, offset, key=key).wait()
                    else:
                        self.engine.read(self._file, addr, direct_len, offset, key=key).wait()
                done = direct_len
                chunk = self.config.bounce_bytes
                while done < nbytes:
                    n = min(chunk, nbytes - done)
                    with self.pool.lease(round_up(n)) as lease:
                        src = ffi.cast("char *", addr + done)
                        dst = ffi.cast("char *", lease.address)
                        if op == "write":
                            ffi.memmove(dst, src, n)
                            if round_up(n) > n:
                                ffi.memmove(dst + n, b"\0" * (round_up(n) - n), round_up(n) - n)
                            self.engine.write(self._file, lease.address, round_up(n),
                                              offset + done, key=key).wait()
                        else:
                            self.engine.read(self._file, lease.address, round_up(n),
                                             offset + done, key=key).wait()
                            ffi.memmove(src, dst, n)
                    done += n
                with self._mu:
                    self._counts["bounced_bytes"] += nbytes - direct_len
                out.set_result(nbytes)
            except BaseException as exc:
                out.set_exception(exc)

        self._bg.submit(run)
        return out

    # ---- reading ----
    def read(self, key: str, dst: Any) -> SwapHandle:
        """Read ``key`` into ``dst`` (a Lease, a contiguous CPU tensor or a writable buffer).

        ``dst`` must hold at least the stored byte count. The handle's result is the number
        of bytes read; with checksums on, a mismatch fails it with ChecksumError.

        Raises
        ------
        KeyNotFoundError
            The store does not hold ``key``.
        ValueError
            ``dst`` is too small or not writable.
        """
        self._check_open()
        entry = self.info(key)
        addr, cap, room, keep, _dt, _sh = _memory_of(dst, writable=True)
        if cap < entry.nbytes:
            raise ValueError(f"destination holds {cap} bytes, {key!r} has {entry.nbytes}")
        rounded = round_up(entry.nbytes)
        with self._mu:
            self._pin(entry.offset)
            self._pending += 1
        aligned = addr % ALIGN == 0
        space = room if room is not None else cap
        if aligned and space >= rounded:
            inner = self.engine.read(self._file, addr, rounded, entry.offset, key=key)
        else:
            inner = self._bounced(key, "read", addr, entry.nbytes, entry.offset, keep,
                                  direct_len=entry.nbytes // ALIGN * ALIGN if aligned else 0)
        out = SwapHandle(f"read of {key!r}")
        inner.add_done_callback(lambda h: self._read_done(h, entry, addr, out, keep))
        return out

    def _read_done(self, h: SwapHandle, entry: Entry, addr: int, out: SwapHandle,
                   keep: Any) -> None:
        exc = h.exception(0)
        if exc is None and entry.crc is not None:
            actual = crc32c(addr, entry.nbytes)
            if actual != entry.crc:
                exc = ChecksumError(
                    f"checksum mismatch for {entry.key!r} in {self.path} at offset "
                    f"{entry.offset} ({entry.nbytes} bytes): stored {entry.crc:#010x}, read "
                    f"{actual:#010x}", key=entry.key, path=self.path, offset=entry.offset,
                    nbytes=entry.nbytes, expected=entry.crc, actual=actual)
        with self._mu:
            self._unpin(entry.offset)
            self._counts["reads"] += 1
            if exc is None:
                self._counts["bytes_read"] += entry.nbytes
            if exc is not None:
                self._counts["read_errors"] += 1
                if isinstance(exc, ChecksumError):
                    self._counts["checksum_failures"] += 1
            self._pending -= 1
            self._mu.notify_all()
        if exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(entry.nbytes)

    def read_range(self, key: str, dst: Lease, start: int, nbytes: int) -> SwapHandle:
        """Read bytes ``[start, start+nbytes)`` of ``key`` into the lease ``dst`` (unverified).

        For streaming a large tensor through a small buffer; ``start`` must be a multiple of
        4096 and ``dst`` must hold ``nbytes`` rounded up to 4096. The caller verifies the
        checksum over all pieces (``crc32c(addr, n, crc)`` chains) against ``info(key).crc``.

        Raises
        ------
        KeyNotFoundError, ValueError
            Unknown key; a range outside the tensor, a misaligned start, a small buffer.
        """
        self._check_open()
        entry = self.info(key)
        if start % ALIGN or start < 0 or nbytes <= 0 or start + nbytes > entry.nbytes:
            raise ValueError(f"range {start}+{nbytes} of {key!r} ({entry.nbytes} bytes): start "
                             f"must be a multiple of {ALIGN} and the range inside the tensor")
        if not isinstance(dst, Lease) or dst.size < round_up(nbytes):
            raise ValueError(f"read_range needs a lease of at least {round_up(nbytes)} bytes")
        with self._mu:
            self._pin(entry.offset)
            self._pending += 1
        inner = self.engine.read(self._file, dst.address, round_up(nbytes),
                                 entry.offset + start, key=key)
        out = SwapHandle(f"read of {key!r}[{start}:{start + nbytes}]")
        unverified = dataclasses.replace(entry, crc=None, nbytes=nbytes)  # result: range size
        inner.add_done_callback(lambda h: self._read_done(h, unverified, dst.address, out, dst))
        return out

    def read_tensor(self, key: str) -> SwapHandle:
        """Read ``key`` into a new torch tensor of its recorded dtype and shape.

        Keys written from bytes have no dtype: they come back as a 1-D uint8 tensor.
        """
        import torch

        e = self.info(key)
        dtype = getattr(torch, e.dtype) if e.dtype else torch.uint8
        shape = e.shape if e.shape is not None else (e.nbytes,)
        t = torch.empty(shape, dtype=dtype)
        out = SwapHandle(f"read of {key!r}")
        self.read(key, t).add_done_callback(
            lambda h: out.set_exception(h.exception(0)) if h.exception(0) else out.set_result(t))
        return out

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
        """Forget ``key``; its extent is reused after the next sync.

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
                self._manifest.append({"seq": self._seq, "op": "del", "key": key})
            except MetadataError as err:
                raise _keyed(err, key) from err
            except OSError as err:  # cut back: the key stays stored
                raise self._err(err.errno or errno.EIO, f"journal append of the delete "
                                f"failed: {err}", key, e.offset, e.nbytes) from err
            del self._table[key]
            self._tombstones[key] = self._seq
            self._release_extent(e.offset, e.nbytes)

    def rename(self, key: str, new_key: str) -> None:
        """Move the stored ``key`` to ``new_key`` without moving bytes (one journal record).

        A version ``new_key`` had is released as by an overwrite. A write of ``key`` still in
        flight loses to the rename (as it would to a delete); one of ``new_key`` loses too.

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
            e = self._table.get(key)
            if e is None:
                raise KeyNotFoundError(f"swap store {self.path} holds no key {key!r}")
            if new_key == key:
                return
            self._check_writable(new_key)
            self._seq += 1
            moved = dataclasses.replace(e, key=new_key, seq=self._seq)
            try:
                self._manifest.append({"seq": self._seq, "op": "mv", "key": key,
                                       "entry": moved.to_json()})
            except MetadataError as err:
                raise _keyed(err, key) from err
            except OSError as err:
                raise self._err(err.errno or errno.EIO, f"journal append of the rename to "
                                f"{new_key!r} failed: {err}", key, e.offset, e.nbytes) from err
            del self._table[key]
            self._tombstones[key] = self._seq
            old = self._table.get(new_key)
            self._table[new_key] = moved
            self._tombstones.pop(new_key, None)
            if old is not None:
                self._release_extent(old.offset, old.nbytes)

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

    def export(self, dst_path: str,
               include: Optional[Callable[[str], bool]] = None) -> None:
        """Write a consistent copy of the store to a new file store at ``dst_path``
        (``include``: which keys; default all).

        Waits for in-flight I/O, then copies every stored extent (kernel ``copy_file_range``)
        packed one after the other in key order, so the copy is as large as the data it holds
        (4 KiB-rounded), with no holes for a later plain copy to fill, and writes a manifest
        snapshot to ``dst_path + ".meta"``. Open the copy with ``SwapStore(dst_path)``.

        Raises
        ------
        SwapIOError
            Copying failed (e.g. ENOSPC at the destination); the source is unchanged.
        """
        self._check_open()
        self.wait_idle()
        with self._mu:
            self._sync_locked()
            entries = [e for e in self._table.values() if include is None or include(e.key)]
            seq = self._seq
            for e in entries:  # an overwrite meanwhile must not reuse what is being copied
                self._pin(e.offset)
        dst_path = os.path.abspath(dst_path)
        try:
            src = os.open(self.path, os.O_RDONLY)
            try:
                dst = private_open(dst_path, os.O_WRONLY | os.O_TRUNC)
                try:
                    packed, at = [], 0
                    for e in sorted(entries, key=lambda x: x.offset):
                        _copy_range(src, dst, e.offset, round_up(e.nbytes), at)
                        packed.append(dataclasses.replace(e, offset=at))
                        at += round_up(e.nbytes)
                    os.ftruncate(dst, at)
                    os.fsync(dst)
                finally:
                    os.close(dst)
            finally:
                os.close(src)
            m = Manifest(dst_path + ".meta")
            m.compact(packed, {"area_bytes": at}, seq)
            m.close()
        except OSError as exc:
            raise self._err(exc.errno or errno.EIO, f"export to {dst_path} failed: {exc}",
                            None) from exc
        finally:
            with self._mu:
                for e in entries:
                    self._unpin(e.offset)

    def import_from(self, src_path: str) -> None:
        """Replace this store's contents with those of the store at ``src_path``.

        Waits for in-flight I/O; copies the source's extents into this area at their offsets
        (growing it if needed) and switches the table. Meant for restoring checkpoints: after
        a crash in the middle, import again.

        Raises
        ------
        MetadataError
            The source is not an exported store, or its metadata is damaged (this store is
            unchanged).
        SwapIOError
            The source cannot be read, or this area cannot hold it.
        """
        self._check_open()
        self.wait_idle()
        src_path = os.path.abspath(src_path)
        entries, src_seq = read_export(src_path)  # damage is found before this area changes
        need = max((e.offset + round_up(e.nbytes) for e in entries.values()), default=0)
        with self._mu:
            if need > self._alloc.size:
                if self._is_block or (self.config.capacity and need > self.config.capacity):
                    raise self._err(errno.ENOSPC, f"{src_path} needs {need} bytes, this area "
                                    f"holds {self._alloc.size}", None, nbytes=need)
                try:
                    os.posix_fallocate(self._fd, self._alloc.size, need - self._alloc.size)
                except OSError as exc:
                    raise self._err(exc.errno or errno.EIO, f"cannot grow to {need} bytes for "
                                    f"import: {exc.strerror}", None, nbytes=need) from exc
            size = max(need, self._alloc.size)
            try:
                # A crash while the extents are copied must not leave a store that opens with
                # keys whose bytes are half replaced: it opens with an error until re-imported.
                self._manifest.compact([], {"area_bytes": self._alloc.size,
                                            "importing": src_path}, self._seq)
                src = os.open(src_path, os.O_RDONLY)
                dst = os.open(self.path, os.O_WRONLY)
                try:
                    for e in entries.values():
                        _copy_range(src, dst, e.offset, round_up(e.nbytes))
                    os.fsync(dst)
                finally:
                    os.close(src)
                    os.close(dst)
            except OSError as exc:
                # The old contents may be half overwritten: this store now holds nothing.
                self._replace_table({}, size)
                raise self._err(exc.errno or errno.EIO, f"import from {src_path} failed: {exc}"
                                "; the store is empty until an import succeeds", None) from exc
            self._seq = max(self._seq, src_seq) + 1
            self._replace_table({k: dataclasses.replace(e, seq=self._seq)
                                 for k, e in entries.items()}, size)
            try:
                self._manifest.compact(list(self._table.values()), {"area_bytes": size},
                                       self._seq)
            except OSError as exc:
                raise SwapIOError(exc.errno or errno.EIO, f"import from {src_path}: cannot "
                                  f"write the manifest snapshot ({exc.strerror or exc}); "
                                  "import again", path=self._manifest.snapshot_path) from exc

    def _replace_table(self, entries: dict[str, Entry], size: int) -> None:
        """Hold exactly ``entries`` in an area of ``size`` bytes (lock held, no I/O pending)."""
        self._alloc = ExtentAllocator(size)
        self._table = place_entries(self._alloc, entries.values(), self.path, self.meta_dir)
        self._quarantine.clear()
        self._deferred.clear()
        self._tombstones.clear()

    def stats(self) -> StoreStats:
        """A snapshot of the counters."""
        with self._mu:
            q = sum(round_up(n) for _o, n in self._quarantine + self._deferred)
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
            replays the journal.
        """
        if self._closed:
            return
        self.wait_idle()
        self._bg.shutdown(wait=True)
        failure: Optional[SwapIOError] = None
        with self._mu:
            self._closed = True
            try:
                self._sync_locked()
                self._manifest.compact(list(self._table.values()),
                                       {"area_bytes": self._alloc.size}, self._seq)
            except SwapIOError as exc:
                failure = exc
            except OSError as exc:
                failure = SwapIOError(
                    exc.errno or errno.EIO, f"closing {self.path}: cannot write the manifest "
                    f"snapshot ({exc.strerror or exc}); the journal still holds every key and "
                    "the store reopens from it", path=self._manifest.snapshot_path)
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
