"""The swap store's manifest: which key lives in which extent, surviving close and crashes.

Two files in the store's metadata folder (0700; files 0600): ``manifest.json``, a snapshot
replaced atomically (:func:`memascend.files.write_atomic`), and ``journal.log``, where every
change since that snapshot is appended as one line ``<json>\\t<crc32 hex>\\n`` with a
sequence number. A line is appended only after the tensor's bytes are completely written, so
after a crash reopening replays the snapshot and the journal and yields, for every key,
either its old or its new version, never a torn one. Lines are appended in completion order,
so replay applies a record only if its sequence number is above the last applied for the
same key. A rename (``mv``) moves an entry to another key, extent unchanged. Compaction
writes a new snapshot and empties the journal; lines whose sequence
number the snapshot already covers are skipped, so a crash between the two steps is harmless.

Appends are all-or-nothing as replay sees them. A short or failed append is cut back to the
last good record before anything else is appended; if even that fails, the manifest refuses
every further append (:attr:`Manifest.broken`) rather than acknowledge records that a reopen
would never reach. Replay therefore knows two kinds of bad bytes:

- a **torn tail**: bytes after the last newline (an append cut short by a crash; a line is
  written whole and its only newline is its last byte). It is dropped and cut off the file.
- **damage**: a complete line that fails its CRC or is not a record, anywhere in the journal,
  or a snapshot that is not the document it should be. Opening fails with
  :class:`~memascend.errors.MetadataError` naming the file and the byte offset: a store never
  opens silently smaller than it was.
"""
from __future__ import annotations

import errno
import json
import os
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

from .errors import MetadataError
from .extents import round_up
from .files import private_dirs, private_open, write_atomic

FORMAT = 2  # 2: entries may list several extents; the header may mark an unjournaled store
READS = (1, 2)  # snapshots of format 1 have neither

# Indirections so tests can inject short and failed appends and a failing undo.
_write = os.write
_truncate = os.ftruncate


@dataclass(frozen=True)
class Entry:
    """Where one key lives: ``nbytes`` at ``offset``; dtype/shape as given at write time.

    A key whose area had no free extent large enough lies in several: ``extents`` lists
    them in the order of the key's bytes, as ``(offset, length)`` pairs of 4096-aligned
    lengths adding up to ``nbytes`` rounded up to 4096 (``offset`` is the first one's).
    None for a key in one extent (the record then looks as it always did).
    """

    key: str
    offset: int
    nbytes: int
    dtype: Optional[str]
    shape: Optional[tuple[int, ...]]
    crc: Optional[int]
    seq: int
    extents: Optional[tuple[tuple[int, int], ...]] = None

    def spans(self) -> tuple[tuple[int, int], ...]:
        """The ``(offset, length)`` extents holding the key's bytes, in order."""
        if self.extents is not None:
            return self.extents
        return ((self.offset, round_up(self.nbytes)),)

    def where(self) -> str:
        """Where the key lies, for messages: ``offset N`` or ``N extents (offset:length, ...)``."""
        if self.extents is None:
            return f"offset {self.offset}"
        return f"{len(self.extents)} extents (" + \
            ", ".join(f"{o}:{n}" for o, n in self.extents) + ")"

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        if self.extents is None:
            del d["extents"]
        else:
            d["extents"] = [list(x) for x in self.extents]
        return d

    @classmethod
    def from_json(cls, d: Any) -> "Entry":
        """Inverse of :meth:`to_json`.

        Raises
        ------
        ValueError
            ``d`` is not an entry (missing fields, wrong types, negative sizes).
        """
        if not isinstance(d, dict):
            raise ValueError(f"an entry must be an object, got {type(d).__name__}")
        try:
            key, offset, nbytes, seq = d["key"], d["offset"], d["nbytes"], d["seq"]
            shape, dtype, crc = d.get("shape"), d.get("dtype"), d.get("crc")
        except KeyError as exc:
            raise ValueError(f"an entry lacks {exc.args[0]!r}") from None
        ints = (offset, nbytes, seq)
        if not isinstance(key, str) or not key or \
                any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in ints) or \
                nbytes == 0 or offset % 4096 or \
                (dtype is not None and not isinstance(dtype, str)) or \
                (crc is not None and (not isinstance(crc, int) or isinstance(crc, bool))) or \
                (shape is not None and (not isinstance(shape, list) or
                                        any(not isinstance(s, int) or s < 0 for s in shape))):
            raise ValueError(f"not a valid entry: {json.dumps(d)[:200]}")
        extents = d.get("extents")
        if extents is not None:
            if not isinstance(extents, list) or not extents or \
                    any(not isinstance(x, list) or len(x) != 2 or
                        any(not isinstance(v, int) or isinstance(v, bool) or v < 0 or v % 4096
                            for v in x) or x[1] == 0 for x in extents) or \
                    extents[0][0] != offset or \
                    sum(x[1] for x in extents) != round_up(nbytes):
                raise ValueError(f"not a valid entry (extents): {json.dumps(d)[:200]}")
            extents = tuple((int(o), int(n)) for o, n in extents)
        return cls(key=key, offset=offset, nbytes=nbytes, dtype=dtype,
                   shape=tuple(shape) if shape is not None else None, crc=crc, seq=seq,
                   extents=extents)


class Manifest:
    """Snapshot + journal in ``folder`` (see module docstring).

    Parameters
    ----------
    folder:
        The metadata folder (created 0700 if missing).
    """

    def __init__(self, folder: str):
        self.folder = folder
        private_dirs(folder)
        self.snapshot_path = os.path.join(folder, "manifest.json")
        self.journal_path = os.path.join(folder, "journal.log")
        self.dropped_lines = 0
        self.broken: Optional[MetadataError] = None  # set when an append could not be undone
        self._journal_fd = -1
        self._good_end = 0  # journal bytes up to the end of its last good record

    # ---- reading ----
    def _damaged(self, path: str, offset: int, what: str) -> MetadataError:
        hint = (f"; to open the store with only what the snapshot holds, move {path} aside "
                "(keys written since the snapshot are then lost)"
                if path == self.journal_path else "")
        return MetadataError(
            f"{what} in {path} at byte offset {offset}: the store's metadata is damaged and "
            "opening it would lose keys silently. Restore the folder from a backup or start "
            f"from a checkpoint{hint}", path=path, offset=offset)

    def _load_snapshot(self) -> tuple[dict[str, Entry], dict[str, Any], int]:
        entries: dict[str, Entry] = {}
        try:
            with open(self.snapshot_path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return entries, {}, 0
        path = self.snapshot_path
        try:
            doc = json.loads(raw)
        except ValueError as exc:
            raise self._damaged(path, getattr(exc, "pos", 0), f"not valid JSON ({exc})") from None
        if not isinstance(doc, dict):
            raise self._damaged(path, 0, f"a {type(doc).__name__} instead of a manifest object")
        if doc.get("format") not in READS:
            raise self._damaged(path, 0, f"unknown manifest format {doc.get('format')!r} "
                                         f"(this version reads {READS})")
        body = doc.get("entries")
        if not isinstance(body, list) or doc.get("crc") != zlib.crc32(
                json.dumps(body, sort_keys=True).encode()):
            raise self._damaged(path, 0, "entries missing or failing their checksum")
        header, seq = doc.get("header", {}), doc.get("seq", 0)
        if not isinstance(header, dict) or not isinstance(seq, int) or seq < 0:
            raise self._damaged(path, 0, "a header or sequence number of the wrong type")
        for i, d in enumerate(body):
            try:
                e = Entry.from_json(d)
            except ValueError as exc:
                raise self._damaged(path, 0, f"entry {i}: {exc}") from None
            entries[e.key] = e
        return entries, header, seq

    def load(self) -> tuple[dict[str, Entry], dict[str, Any], int]:
        """Read snapshot and journal: ``(entries, header, last_seq)``.

        A torn journal tail is dropped (counted in ``dropped_lines``) and cut off the file so
        new appends start clean; a stale snapshot temporary is removed.

        Raises
        ------
        MetadataError
            The snapshot or a complete journal line is damaged or of the wrong shape (names
            the file and the byte offset).
        OSError
            The files cannot be read.
        """
        try:
            os.unlink(self.snapshot_path + ".tmp")  # a compaction that never finished
        except FileNotFoundError:
            pass
        entries, header, seq = self._load_snapshot()
        snap_seq = seq
        # Records are appended in completion order, not sequence order: a record applies when
        # it is newer than the snapshot and than the last record of the same key.
        key_seq = {k: e.seq for k, e in entries.items()}
        try:
            with open(self.journal_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:  # torn tail: an append cut short by a crash
                self.dropped_lines += 1
                break
            rec = self._parse(data[pos:nl])
            if rec is None:
                raise self._damaged(self.journal_path, pos, "a journal record that fails its "
                                    "checksum or is not a record")
            rseq = rec["seq"]
            if rseq > snap_seq:
                if rec["op"] == "put":
                    e = rec["entry"]
                    if rseq > key_seq.get(e.key, 0):
                        entries[e.key] = e
                        key_seq[e.key] = rseq
                elif rec["op"] == "del":
                    if rseq > key_seq.get(rec["key"], 0):
                        entries.pop(rec["key"], None)
                        key_seq[rec["key"]] = rseq
                elif rec["op"] == "mv":  # key -> entry.key, the same extent
                    e = rec["entry"]
                    src = entries.get(rec["key"])
                    if src is None or src.offset != e.offset or src.nbytes != e.nbytes:
                        raise self._damaged(self.journal_path, pos, f"a rename of "
                                            f"{rec['key']!r} that does not match its entry")
                    if rseq > key_seq.get(rec["key"], 0):
                        del entries[rec["key"]]
                        key_seq[rec["key"]] = rseq
                    if rseq > key_seq.get(e.key, 0):
                        entries[e.key] = e
                        key_seq[e.key] = rseq
                else:  # header
                    header.update(rec["header"])
            seq = max(seq, rseq)
            pos = nl + 1
        if pos < len(data):
            with open(self.journal_path, "r+b") as f:
                f.truncate(pos)
        self._good_end = pos
        return entries, header, seq

    @staticmethod
    def _parse(line: bytes) -> Optional[dict[str, Any]]:
        """The record on ``line``, validated; None when the line is not one."""
        body, sep, crc = line.rpartition(b"\t")
        if not sep or len(crc) != 8:
            return None
        try:
            if int(crc, 16) != zlib.crc32(body):
                return None
            rec = json.loads(body)
        except ValueError:
            return None
        if not isinstance(rec, dict):
            return None
        seq, op = rec.get("seq"), rec.get("op")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            return None
        try:
            if op == "put":
                rec["entry"] = Entry.from_json(rec.get("entry"))
            elif op == "del":
                if not isinstance(rec.get("key"), str):
                    return None
            elif op == "mv":
                if not isinstance(rec.get("key"), str):
                    return None
                rec["entry"] = Entry.from_json(rec.get("entry"))
            elif op == "header":
                if not isinstance(rec.get("header"), dict):
                    return None
            else:
                return None
        except ValueError:
            return None
        return rec

    # ---- writing ----
    def _journal(self) -> int:
        if self._journal_fd < 0:
            fd = private_open(self.journal_path, os.O_WRONLY | os.O_APPEND)
            self._good_end = os.fstat(fd).st_size
            self._journal_fd = fd
        return self._journal_fd

    def append(self, rec: dict[str, Any]) -> None:
        """Append one record (``seq`` and ``op`` set by the caller), all or nothing.

        Raises
        ------
        OSError
            The append failed (e.g. ENOSPC) and was cut back: the journal is as before and
            the manifest stays usable.
        MetadataError
            The manifest is :attr:`broken`: an earlier append failed and could not be cut
            back, so nothing more may be appended (reopen the store).
        """
        if self.broken is not None:
            raise self.broken
        body = json.dumps(rec, sort_keys=True).encode()
        line = body + b"\t" + format(zlib.crc32(body), "08x").encode() + b"\n"
        fd = self._journal()
        done = 0
        try:
            while done < len(line):  # a short write is continued; its errno, if any, wins
                n = _write(fd, line[done:])
                if n <= 0:
                    raise OSError(errno.EIO, "write returned 0")
                done += n
            self._good_end += done
            return
        except OSError as exc:
            failure = exc
        try:
            _truncate(fd, self._good_end)
        except OSError as exc:
            self.broken = MetadataError(
                f"an append to {self.journal_path} failed ({failure}) after {done} of "
                f"{len(line)} bytes and could not be cut back to its last good record at "
                f"offset {self._good_end} ({exc}): the store takes no more writes; reopen it "
                "(replay drops the torn record)", path=self.journal_path,
                offset=self._good_end, nbytes=len(line), code=failure.errno or errno.EIO)
            raise self.broken from failure
        raise OSError(failure.errno or errno.EIO,
                      f"append to {self.journal_path} failed after {done} of {len(line)} "
                      f"bytes ({failure.strerror or failure}); cut back to offset "
                      f"{self._good_end}") from failure

    def sync(self) -> None:
        """fsync the journal."""
        if self._journal_fd >= 0:
            os.fsync(self._journal_fd)

    def compact(self, entries: Iterator[Entry] | list[Entry], header: dict[str, Any],
                seq: int) -> None:
        """Write a snapshot of ``entries`` atomically, then empty the journal.

        Raises
        ------
        OSError
            The snapshot could not be written (e.g. ENOSPC): the old snapshot and the journal
            are unchanged and still describe the store.
        """
        body = [e.to_json() for e in sorted(entries, key=lambda e: e.key)]
        doc = {"format": FORMAT, "seq": seq, "header": header, "entries": body,
               "crc": zlib.crc32(json.dumps(body, sort_keys=True).encode())}
        write_atomic(self.snapshot_path, json.dumps(doc).encode())
        fd = self._journal()
        os.ftruncate(fd, 0)
        os.fsync(fd)
        self._good_end = 0
        self.broken = None  # the snapshot holds everything: the torn record is gone

    def close(self) -> None:
        """Close the journal descriptor."""
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
