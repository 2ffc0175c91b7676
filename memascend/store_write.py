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
from .engine import IORequest
from .handle import SwapHandle, gather
from .manifest import Entry
from .store_read import _memory_of, crc32c
from .store_space import Spans, _Write, map_range


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
            cur = self._pieceable(key, nbytes)
            if cur is not None:  # in pieces (store_pieces); raises at once on ENOSPC
                placed = self._write_pieces(job, cur)
            else:
                spans = self._place_or_queue(job)  # raises at once on ENOSPC
                self._issue(job)
                self._seq += 1
                job.seq = self._seq
                self._begin()
                if spans is None:  # waits for overwrites in flight to free room (store_space)
                    return job.out
        if cur is not None:
            for piece, piece_spans in placed:
                self._launch_piece(piece, piece_spans)
            return job.out
        try:
            self._launch(job, spans)
        except BaseException:
            self._end()
            raise
        return job.out

    def _launch(self, job: "_Write", spans: Spans) -> None:
        """Start the I/O of a placed write (no lock held). On a failure to start, the extents
        and the in-flight accounting are given back and the error raised."""
        if job.part is not None:
            self._launch_piece(job, spans)
            return
        entry = Entry(job.key, spans[0][0], job.nbytes, job.dtype, job.shape, None, job.seq,
                      extents=spans if len(spans) > 1 else None)
        # crc: with checksums on, computed on the completion thread (_write_done)
        self._start_write(job, spans).add_done_callback(
            lambda h: self._write_done(h, entry, job))

    def _start_write(self, job: "_Write", spans: Spans) -> SwapHandle:
        """Move a placed write's bytes (a whole write's or a piece's) into ``spans``: directly
        from aligned memory holding whole blocks, else through bounce leases. On a failure to
        start, the extents and the in-flight accounting are given back and the error
        raised."""
        rounded = round_up(job.nbytes)
        aligned = job.addr % ALIGN == 0
        try:
            if aligned and (job.nbytes == rounded or (job.room or 0) >= rounded):
                return self._transfer("write", job.addr, spans, 0, rounded, job.key)
            return self._bounced(job.key, "write", job.addr, job.nbytes, spans, job.keep,
                                 direct_len=job.nbytes // ALIGN * ALIGN if aligned else 0)
        except BaseException:
            with self._mu:
                self._free_spans(spans)
                self._landed(job)
            raise

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
                try:
                    exc = self._switch(entry, exc)
                finally:
                    self._landed(job)
        finally:
            self._end()
        if exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(entry.nbytes)

    def _switch(self, entry: Entry, exc: Optional[BaseException]) -> Optional[BaseException]:
        """A write's outcome (lock held): the key switched to ``entry`` (its journal record
        appended first), or the new extents given back when the write failed, its record
        could not be appended, or a newer write, delete or rename of the key won. Returns
        the error to report, if any."""
        if exc is not None:
            self._free_spans(entry.spans())  # nothing points to them
            self._counts["write_errors"] += 1
            return exc
        cur = self._table.get(entry.key)
        if (cur is not None and cur.seq > entry.seq) or \
                self._tombstones.get(entry.key, 0) > entry.seq:
            self._release(entry)  # a newer write, or a delete issued after this write, won
            self._counts["writes"] += 1
            self._counts["bytes_written"] += entry.nbytes
            return None
        try:
            self._check_writable(entry.key)
            self._record({"seq": entry.seq, "op": "put", "entry": entry.to_json()})
        except OSError as err:
            # Not acknowledged: the append was cut back (or the manifest refuses appends),
            # so no record points at the extents.
            self._free_spans(entry.spans())
            self._counts["write_errors"] += 1
            return _keyed(err, entry.key) if isinstance(err, MetadataError) else \
                self._err(err.errno or errno.EIO, f"journal append failed: {err}", entry.key,
                          entry.offset, entry.nbytes)
        self._table[entry.key] = entry
        self._tombstones.pop(entry.key, None)
        if cur is not None:
            self._release(cur)
        self._counts["writes"] += 1
        self._counts["bytes_written"] += entry.nbytes
        return None

    def _transfer(self, op: str, addr: int, spans: Spans, start: int, nbytes: int,
                  key: str) -> SwapHandle:
        """Move bytes ``[start, start+nbytes)`` of a key lying in ``spans`` between memory at
        ``addr`` (holding byte ``start``) and the area: one request per extent it touches."""
        pieces = map_range(spans, start, nbytes)
        if len(pieces) == 1:
            off, pos, n = pieces[0]
            return self.engine.submit([IORequest(op, self._file, addr + pos, n, off, key)])[0]
        parts = self.engine.submit([IORequest(op, self._file, addr + pos, n, off, key)
                                    for off, pos, n in pieces])
        return gather(parts, f"{op} of {key!r} ({len(parts)} extents)", combine=sum)

    def _bounced(self, key: str, op: str, addr: int, nbytes: int, spans: Spans, keep: Any,
                 direct_len: int = 0) -> SwapHandle:
        """Move ``nbytes`` through aligned bounce leases, in chunks, on a helper thread.

        The first ``direct_len`` bytes (aligned memory, whole blocks) go directly.
        """
        out = SwapHandle(f"{op} of {key!r} (bounced)")
        ffi, _lib = _native.require()

        def run() -> None:
            try:
                if direct_len:
                    self._transfer(op, addr, spans, 0, direct_len, key).wait()
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
                            self._transfer(op, lease.address, spans, done, round_up(n),
                                           key).wait()
                        else:
                            self._transfer(op, lease.address, spans, done, round_up(n),
                                           key).wait()
                            ffi.memmove(src, dst, n)
                    done += n
                with self._mu:
                    self._counts["bounced_bytes"] += nbytes - direct_len
                out.set_result(nbytes)
            except BaseException as exc:
                out.set_exception(exc)

        self._in_background(run)
        return out
