"""How a swap store writes: :class:`Writing`, mixed into :class:`memascend.store.SwapStore`.

A write takes an extent for the new version (or waits in the store's queue for one, see
:mod:`memascend.store_space`), moves the bytes there straight from an aligned source or
through bounce leases on the store's helper thread, and on completion computes the CRC32C of
the source (off the caller's thread), appends the journal record and only then switches the
key to the new extent and releases the old one. A write that fails, or whose record cannot be
appended, leaves the key at its previous version. A newer write, delete or rename of the key
issued meanwhile wins over an older write that lands later.
"""
from __future__ import annotations

import dataclasses
import errno
from typing import Any, Iterable, Optional

from . import _native
from .errors import MetadataError
from .extents import ALIGN, round_up
from .handle import SwapHandle
from .manifest import Entry
from .store_read import _memory_of, crc32c
from .store_space import _Write


def _keyed(err: MetadataError, key: str) -> MetadataError:
    """``err`` naming the key whose change it refused."""
    if err.key == key:
        return err
    out = MetadataError(err.strerror, path=err.path or "", offset=err.offset,
                        nbytes=err.nbytes, key=key, code=err.errno or errno.EIO)
    out.__cause__ = err
    return out


class Writing:
    """The write path of :class:`~memascend.store.SwapStore` (see the module docstring)."""

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
            handle fails with one when the write or its journal append fails, or when a write
            that waited for room (``write_window``) finds none: the key keeps its previous
            version, also after a reopen.
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
        job = _Write(key, addr, nbytes, room, keep, dtype, shape_t,
                     SwapHandle(f"write of {key!r}"))
        with self._mu:
            self._check_writable(key)
            offset = self._place_or_queue(job)  # raises at once on ENOSPC
            self._seq += 1
            job.seq = self._seq
            self._begin()
            if offset is None:  # waits for overwrites in flight to free room (store_space)
                return job.out
        try:
            self._launch(job, offset)
        except BaseException:
            self._end()
            raise
        return job.out

    def _launch(self, job: "_Write", offset: int) -> None:
        """Start the I/O of a placed write (no lock held). On a failure to start, the extent
        and the in-flight accounting are given back and the error raised."""
        entry = Entry(job.key, offset, job.nbytes, job.dtype, job.shape, None, job.seq)
        # crc: with checksums on, computed on the completion thread (_write_done)
        rounded = round_up(job.nbytes)
        aligned = job.addr % ALIGN == 0
        try:
            if aligned and job.room is not None and job.room >= rounded:
                inner = self.engine.write(self._file, job.addr, rounded, offset, key=job.key)
            else:
                inner = self._bounced(job.key, "write", job.addr, job.nbytes, offset, job.keep,
                                      direct_len=job.nbytes // ALIGN * ALIGN if aligned else 0)
        except BaseException:
            with self._mu:
                self._alloc.free(offset, job.nbytes)
                self._landed(job)
            raise
        inner.add_done_callback(lambda h: self._write_done(h, entry, job))

    def _write_done(self, h: SwapHandle, entry: Entry, job: "_Write") -> None:
        exc = h.exception(0)
        out, addr = job.out, job.addr
        if exc is None and self.config.checksum == "crc32c":
            # The source may not change before the handle is done (write's contract), so its
            # checksum now is that of the bytes written; computing it here keeps it off the
            # caller's thread.
            entry = dataclasses.replace(entry, crc=crc32c(addr, entry.nbytes))
        try:
            with self._mu:
                self._landed(job)
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
