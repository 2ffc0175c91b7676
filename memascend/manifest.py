"""The swap store's manifest: which key lives in which extent, surviving close and crashes.

Two files in the store's metadata folder: ``manifest.json``, a snapshot written to a temporary
file, fsync'ed and renamed over the old one (atomic), and ``journal.log``, where every change
since that snapshot is appended as one line ``<json>\\t<crc32 hex>`` with a sequence number.
A line is appended only after the tensor's bytes are completely written, so after a crash
reopening replays the snapshot and the journal and yields, for every key, either its old or
its new version — never a torn one. Lines are appended in completion order, so replay applies
a record only if its sequence number is above the last applied for the same key. A torn last
line (crash during the append) fails its CRC and is dropped. Compaction writes a new snapshot and empties the journal; lines whose
sequence number the snapshot already covers are skipped, so a crash between the two steps is
harmless.
"""
from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Optional

FORMAT = 1


@dataclass(frozen=True)
class Entry:
    """Where one key lives: ``nbytes`` at ``offset``; dtype/shape as given at write time."""

    key: str
    offset: int
    nbytes: int
    dtype: Optional[str]
    shape: Optional[tuple[int, ...]]
    crc: Optional[int]
    seq: int

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict."""
        d = asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Entry":
        """Inverse of :meth:`to_json`."""
        shape = d.get("shape")
        return cls(key=d["key"], offset=int(d["offset"]), nbytes=int(d["nbytes"]),
                   dtype=d.get("dtype"), shape=tuple(shape) if shape is not None else None,
                   crc=d.get("crc"), seq=int(d["seq"]))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Manifest:
    """Snapshot + journal in ``folder`` (see module docstring).

    Parameters
    ----------
    folder:
        The metadata folder (created if missing).
    """

    def __init__(self, folder: str):
        self.folder = folder
        os.makedirs(folder, exist_ok=True)
        self.snapshot_path = os.path.join(folder, "manifest.json")
        self.journal_path = os.path.join(folder, "journal.log")
        self.dropped_lines = 0
        self._journal_fd = -1

    def load(self) -> tuple[dict[str, Entry], dict[str, Any], int]:
        """Read snapshot and journal: ``(entries, header, last_seq)``.

        A torn or corrupt journal tail is dropped (counted in ``dropped_lines``) and cut off
        the file so new appends start clean.

        Raises
        ------
        ValueError
            The snapshot itself is corrupt or of an unknown format.
        """
        entries: dict[str, Entry] = {}
        header: dict[str, Any] = {}
        seq = 0
        if os.path.exists(self.snapshot_path):
            with open(self.snapshot_path, encoding="utf-8") as f:
                doc = json.load(f)
            body = json.dumps(doc.get("entries"), sort_keys=True)
            if doc.get("format") != FORMAT or doc.get("crc") != zlib.crc32(body.encode()):
                raise ValueError(f"corrupt or unknown manifest {self.snapshot_path}")
            header = doc.get("header", {})
            seq = int(doc.get("seq", 0))
            for d in doc["entries"]:
                e = Entry.from_json(d)
                entries[e.key] = e
        good_end = 0
        snap_seq = seq
        # Records are appended in completion order, not sequence order: a record applies when
        # it is newer than the snapshot and than the last record of the same key.
        key_seq = {k: e.seq for k, e in entries.items()}
        if os.path.exists(self.journal_path):
            with open(self.journal_path, "rb") as f:
                data = f.read()
            pos = 0
            for line in data.split(b"\n"):
                end = pos + len(line) + 1
                if end > len(data):  # no newline: torn last line
                    if line:
                        self.dropped_lines += 1
                    break
                rec = self._parse(line)
                if rec is None:
                    self.dropped_lines += 1
                    break
                rseq = int(rec["seq"])
                if rseq > snap_seq:
                    if rec["op"] == "put":
                        e = Entry.from_json(rec["entry"])
                        if rseq > key_seq.get(e.key, 0):
                            entries[e.key] = e
                            key_seq[e.key] = rseq
                    elif rec["op"] == "del":
                        if rseq > key_seq.get(rec["key"], 0):
                            entries.pop(rec["key"], None)
                            key_seq[rec["key"]] = rseq
                    elif rec["op"] == "header":
                        header.update(rec["header"])
                seq = max(seq, rseq)
                good_end = end
                pos = end
            if good_end < len(data):
                with open(self.journal_path, "r+b") as f:
                    f.truncate(good_end)
        return entries, header, seq

    @staticmethod
    def _parse(line: bytes) -> Optional[dict[str, Any]]:
        body, sep, crc = line.rpartition(b"\t")
        if not sep:
            return None
        try:
            if int(crc, 16) != zlib.crc32(body):
                return None
            rec = json.loads(body)
        except ValueError:
            return None
        return rec if isinstance(rec, dict) and "seq" in rec and "op" in rec else None

    def append(self, rec: dict[str, Any]) -> None:
        """Append one record (``seq`` and ``op`` set by the caller) as a single write."""
        if self._journal_fd < 0:
            self._journal_fd = os.open(self.journal_path,
                                       os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        body = json.dumps(rec, sort_keys=True).encode()
        line = body + b"\t" + format(zlib.crc32(body), "08x").encode() + b"\n"
        n = os.write(self._journal_fd, line)
        if n != len(line):
            raise OSError(5, f"short append to {self.journal_path}: {n} of {len(line)} bytes")

    def sync(self) -> None:
        """fsync the journal."""
        if self._journal_fd >= 0:
            os.fsync(self._journal_fd)

    def compact(self, entries: Iterator[Entry] | list[Entry], header: dict[str, Any],
                seq: int) -> None:
        """Write a snapshot of ``entries`` atomically, then empty the journal."""
        body = [e.to_json() for e in sorted(entries, key=lambda e: e.key)]
        doc = {"format": FORMAT, "seq": seq, "header": header, "entries": body,
               "crc": zlib.crc32(json.dumps(body, sort_keys=True).encode())}
        tmp = self.snapshot_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(doc, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.snapshot_path)
        _fsync_dir(self.folder)
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
        with open(self.journal_path, "wb") as f:
            os.fsync(f.fileno())

    def close(self) -> None:
        """Close the journal descriptor."""
        if self._journal_fd >= 0:
            os.close(self._journal_fd)
            self._journal_fd = -1
