"""Checkpoint exchange of a swap area: a packed, consistent copy (export) and back (import).

:meth:`Exchange.export` copies every stored extent packed one after the other into a new file
store with its manifest snapshot; :meth:`Exchange.import_from` replaces a store's contents
with such a copy, marking the store as importing until it is done, so that a crash in the
middle opens with an error instead of half-replaced keys. :func:`read_export` reads and
checks a copy's metadata before anything changes; :func:`place_entries` rebuilds a table of
extents. :class:`Exchange` is a part of :class:`memascend.store.SwapStore`.
"""
from __future__ import annotations

import dataclasses
import errno
import os
from typing import Callable, Iterable, Optional

from .errors import MetadataError, SwapIOError
from .extents import ALIGN, ExtentAllocator
from .files import private_open
from .manifest import Entry, Manifest


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
    for off, n, e in sorted(((o, n, e) for e in entries for o, n in e.spans()),
                            key=lambda x: x[0]):
        if off + n > alloc.size:
            raise MetadataError(
                f"key {e.key!r} lies at offset {off} ({n} bytes of its {e.nbytes}), past the "
                f"end of the swap area {area} ({alloc.size} bytes): the area was truncated or "
                f"replaced while its metadata ({meta}) was kept; restore both together, or "
                "remove both to start empty", path=area, offset=off, nbytes=n, key=e.key)
        try:
            alloc.reserve(off, n)
        except ValueError:
            raise MetadataError(
                f"key {e.key!r} at offset {off} ({n} bytes of its {e.nbytes}) overlaps another "
                f"key in the metadata of {area} ({meta}): the metadata is damaged", path=area,
                offset=off, nbytes=n, key=e.key) from None
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
            entries, header, seq = manifest.load()
        finally:
            manifest.close()
        size = os.stat(src_path).st_size // ALIGN * ALIGN
    except MetadataError:
        raise
    except OSError as exc:
        raise SwapIOError(exc.errno or errno.EIO, f"cannot read the exported store: {exc}",
                          path=src_path) from exc
    for mark, what in (("unjournaled", "a store without a journal that was open (or was "
                                       "killed) when it was copied"),
                       ("importing", "a store whose import was interrupted")):
        if header.get(mark):  # its snapshot does not say what it holds
            raise MetadataError(f"cannot import {src_path}: it is {what}, not an export; "
                                "its contents are unknown", path=meta)
    place_entries(ExtentAllocator(size), entries.values(), src_path, meta)
    return entries, seq


class Exchange:
    """Export and import of :class:`~memascend.store.SwapStore`."""

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
            # pieces ignore pins (reads of their key wait instead): none may be in flight
            self._mu.wait_for(lambda: not self._pieced)
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
                        start = at  # the export holds each key in one extent
                        for off, n in e.spans():
                            _copy_range(src, dst, off, n, at)
                            at += n
                        packed.append(dataclasses.replace(e, offset=start, extents=None))
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
        need = max((off + n for e in entries.values() for off, n in e.spans()), default=0)
        with self._mu:
            self._mu.wait_for(lambda: not self._pieced)  # none lands into the new table
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
                self._manifest.compact([], self._header(importing=src_path), self._seq)
                src = os.open(src_path, os.O_RDONLY)
                dst = os.open(self.path, os.O_WRONLY)
                try:
                    for e in entries.values():
                        for off, n in e.spans():
                            _copy_range(src, dst, off, n)
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
                self._manifest.compact(list(self._table.values()), self._header(),
                                       self._seq)
            except OSError as exc:
                raise SwapIOError(exc.errno or errno.EIO, f"import from {src_path}: cannot "
                                  f"write the manifest snapshot ({exc.strerror or exc}); "
                                  "import again", path=self._manifest.snapshot_path) from exc
