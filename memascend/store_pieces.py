"""Overwrites in pieces: :class:`Pieces`, mixed into :class:`memascend.store.SwapStore`.

An overwrite is atomic by default: the new version goes to free space and the key switches
to it when all of it has landed, so while it is in flight the area holds the whole tensor
twice (a 98 MB embedding: 98 MB beyond the state in each area it is written to). A scratch
store (``journal=False``) with ``piece_bytes`` set writes an overwrite of a key, same size,
larger than that in pieces instead: each piece is placed, queued and written as a write of
its own (:mod:`memascend.store_space`), and when it lands the key's bytes in its range switch
to it and that range of the old version is freed at once. The area then needs room for the
pieces in flight (the write window), not for the whole tensor. The price is atomicity: a
piece that fails leaves its range at the previous version while the others are new, and the
write's handle fails naming those ranges (the key stays readable; its checksum is unknown
until it is written whole again). Reads of the key issued while its pieces are in flight
wait for the last one and see the whole new version; a rename of the key waits for it too,
and a delete wins over it (its pieces still to land are given back).
A piecewise overwrite starts only when no other write of the key and no read of it is in
flight (otherwise the write is an atomic one); a newer write issued meanwhile wins as usual.
"""
from __future__ import annotations

import dataclasses
import errno
from dataclasses import dataclass, field
from typing import Callable, Optional

from .extents import round_up
from .handle import SwapHandle
from .manifest import Entry
from .store_read import crc32c
from .store_space import Spans, _Write


def replace_range(spans: Spans, start: int, new: Spans) -> tuple[Spans, list[tuple[int, int]]]:
    """``spans`` (a key's extents in byte order) with the key's bytes ``[start, start+len)``
    moved to ``new`` (``len``: what ``new`` holds), adjacent extents merged; and the extents
    the range leaves. ``start`` and the lengths are multiples of 4096."""
    length = sum(n for _o, n in new)
    out: list[tuple[int, int]] = []
    old: list[tuple[int, int]] = []
    pos = 0  # the key's byte where the current span begins
    for off, n in spans:
        lo, hi = max(start, pos), min(start + length, pos + n)
        if lo >= hi:
            out.append((off, n))
        else:
            if pos < lo:
                out.append((off, lo - pos))
            old.append((off + lo - pos, hi - lo))
            if lo == start:  # the first span the range touches
                out.extend(new)
            if hi < pos + n:
                out.append((off + hi - pos, pos + n - hi))
        pos += n
    merged: list[tuple[int, int]] = []
    for off, n in out:
        if merged and merged[-1][0] + merged[-1][1] == off:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((off, n))
    return tuple(merged), old


@dataclass(eq=False)
class _Pieced:
    """One overwrite written in pieces, from its call until its last piece is over."""

    key: str
    addr: int
    nbytes: int
    out: SwapHandle
    entry: Entry  # the key's entry as this write last left it
    pieces: int
    seq: int = 0
    left: int = 0  # pieces not over yet
    landed: int = 0  # bytes of pieces that switched the key
    failed: list = field(default_factory=list)  # (start, nbytes, exception)
    replaced: bool = False  # a newer write, a delete or a rename took the key meanwhile


class Pieces:
    """Piecewise overwrites of :class:`~memascend.store.SwapStore` (see the module
    docstring)."""

    def _pieceable(self, key: str, nbytes: int) -> Optional[Entry]:
        """The key's entry when a write of ``nbytes`` to it goes in pieces, else None (lock
        held)."""
        size = self.config.piece_bytes
        if not size or nbytes <= size or self.config.journal:
            return None
        cur = self._table.get(key)
        if cur is None or cur.nbytes != nbytes or self._issued.get(key) or \
                self._readers.get(cur.offset) or key in self._pieced:
            return None
        return cur

    def _write_pieces(self, job: _Write, cur: Entry) -> list[tuple[_Write, Spans]]:
        """Place or queue the pieces of ``job``, an overwrite of ``cur`` (lock held). Returns
        the placed ones, to be started without the lock. Raises as :meth:`_allocate` does,
        with nothing changed."""
        size = self.config.piece_bytes
        starts = range(0, job.nbytes, size)
        part = _Pieced(job.key, job.addr, job.nbytes, job.out, cur, len(starts))
        jobs = []
        for start in starts:
            n = min(size, job.nbytes - start)
            room = None if job.room is None else job.room - start
            jobs.append(_Write(job.key, job.addr + start, n, room, job.keep, job.dtype,
                               job.shape, SwapHandle(f"write of {job.key!r}[{start}:"
                                                     f"{start + n}]"), part=part, start=start))
        placed: list[tuple[_Write, Optional[Spans]]] = []
        try:
            for pj in jobs:
                placed.append((pj, self._place_or_queue(pj)))
        except BaseException:
            for pj, spans in placed:  # give back what was placed or queued: nothing changed
                if spans is None:
                    self._queue.remove(pj)
                    self._counts["writes_waited"] -= 1
                else:
                    self._free_spans(spans)
                    self._inflight_bytes -= round_up(pj.nbytes)
                    self._freeing -= pj.frees
            raise
        self._seq += 1
        part.seq = self._seq
        part.left = len(jobs)
        self._pieced[job.key] = part
        self._begin()  # the whole write's: over when its entry is final
        for pj in jobs:
            self._issue(pj)
            pj.seq = part.seq
            self._begin()
            pj.out.add_done_callback(lambda h, pj=pj: self._piece_over(pj, h))
        return [(pj, spans) for pj, spans in placed if spans is not None]

    def _launch_piece(self, job: _Write, spans: Spans) -> None:
        """Start one piece's I/O (no lock held). Never raises: a piece that cannot start
        fails its own handle, and so the whole write."""
        try:
            inner = self._start_write(job, spans)
        except BaseException as exc:  # noqa: BLE001 - handed to the piece's handle
            self._end()
            job.out.set_exception(exc)
            return
        inner.add_done_callback(lambda h: self._piece_done(h, job, spans))

    def _piece_done(self, h: SwapHandle, job: _Write, spans: Spans) -> None:
        """A piece's I/O is over: on success, if the key is still as this write left it,
        its range switches to the piece and the old range is freed."""
        exc = h.exception(0)
        part = job.part
        with self._mu:
            try:
                cur = self._table.get(job.key)
                if exc is not None or cur is not part.entry:
                    self._free_spans(spans)  # failed, or a newer write won the key
                else:
                    new, old = replace_range(cur.spans(), job.start, spans)
                    e = dataclasses.replace(cur, offset=new[0][0], dtype=job.dtype,
                                            shape=job.shape, crc=None, seq=part.seq,
                                            extents=new if len(new) > 1 else None)
                    self._table[job.key] = part.entry = e
                    part.landed += job.nbytes
                    for off, n in old:  # no read of the key is in flight: they wait
                        self._retire(off, n)
            finally:
                self._landed(job)
        self._end()
        if exc is not None:
            job.out.set_exception(exc)
        else:
            job.out.set_result(job.nbytes)

    def _piece_over(self, job: _Write, h: SwapHandle) -> None:
        """A piece's handle is done (landed, failed, or never placed)."""
        part = job.part
        with self._mu:
            if h.exception(0) is not None:
                part.failed.append((job.start, job.nbytes, h.exception(0)))
            part.left -= 1
            last = part.left == 0
        if last:
            self._pieces_done(part)

    def _pieces_done(self, part: _Pieced) -> None:
        """The last piece is over: the key's checksum when all of it is new, the counters,
        and the write's handle."""
        whole = not part.failed and part.landed == part.nbytes
        crc = crc32c(part.addr, part.nbytes) if whole and \
            self.config.checksum == "crc32c" else None
        with self._mu:
            cur = self._table.get(part.key)
            part.replaced = cur is not part.entry  # by a newer write, a delete or a rename
            if not part.replaced and part.landed:
                self._table[part.key] = dataclasses.replace(cur, crc=crc)
            self._pieced.pop(part.key, None)
            self._counts["writes_pieced"] += 1
            self._counts["bytes_written"] += part.landed
            if part.failed:
                self._counts["write_errors"] += 1
            else:
                self._counts["writes"] += 1
            self._mu.notify_all()
        self._end()
        if part.failed:
            part.out.set_exception(self._pieces_error(part))
        else:
            part.out.set_result(part.nbytes)

    def _pieces_error(self, part: _Pieced) -> BaseException:
        """The error of a piecewise write some pieces of which failed."""
        failed = sorted(part.failed, key=lambda f: f[0])
        first = failed[0][2]
        ranges = ", ".join(f"[{s}, {s + n})" for s, n, _e in failed)
        if part.replaced:
            where = "a newer write, a delete or a rename of the key replaced it meanwhile"
        elif part.landed:
            where = (f"bytes {ranges} keep the previous version, the other {part.landed} "
                     "bytes are new, and the key is not checksummed until it is written again")
        else:
            where = "the key keeps its previous version"
        err = self._err(getattr(first, "errno", None) or errno.EIO,
                        f"write of {part.key!r} ({part.nbytes} bytes in {part.pieces} pieces): "
                        f"{len(failed)} failed ({first}); {where}", part.key,
                        getattr(first, "offset", None), failed[0][1])
        err.__cause__ = first
        return err

    # ---- what waits for a piecewise write ----
    def _after_pieces(self, part: _Pieced, retry: Callable[[], SwapHandle],
                      what: str) -> SwapHandle:
        """A handle for ``retry()`` (a read, already counted as pending by
        :meth:`_pin_entry`), issued once the piecewise write ``part`` is over."""
        out = SwapHandle(what)

        def run() -> None:
            try:
                retry().add_done_callback(lambda h: out.set_exception(h.exception(0))
                                          if h.exception(0) else out.set_result(h.result(0)))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's handle
                out.set_exception(exc)
            finally:
                self._end()

        def go(_h: SwapHandle) -> None:
            try:
                self._in_background(run)
            except RuntimeError:
                run()

        part.out.add_done_callback(go)
        return out

    def _wait_pieces(self, key: str) -> None:
        """Wait until no piecewise write of ``key`` is in flight (lock held)."""
        self._mu.wait_for(lambda: key not in self._pieced)

