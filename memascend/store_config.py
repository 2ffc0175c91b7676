"""Options and counters of a swap store (:class:`memascend.store.SwapStore`).

``StoreConfig`` is one frozen dataclass with a documented default on every field, validated
on construction (``ConfigError`` names the key) and overridable from ``MEMASCEND_STORE_*``;
``StoreStats`` is a frozen snapshot of a store's counters.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from .config import from_env, parse_size
from .errors import ConfigError
from .extents import ALIGN, round_up

CHECKSUMS = ("crc32c", "none")
DIRECT = ("auto", "on", "off")
SCRATCH_PIECE_BYTES = 8 << 20  # piece_bytes of offload_model's tiers with exact_undo=False


@dataclass(frozen=True)
class StoreConfig:
    """Options of a :class:`SwapStore` (environment: ``MEMASCEND_STORE_<FIELD>``).

    Attributes
    ----------
    capacity:
        Most bytes the swap area may take (default: whatever the filesystem gives; for a
        block device, its size).
    checksum:
        ``"crc32c"`` (default; verified on every read) or ``"none"``.
    direct:
        O_DIRECT: ``"auto"`` (default; falls back to buffered I/O where the filesystem
        refuses it, e.g. tmpfs, and says so in ``store.direct``), ``"on"`` (error instead),
        ``"off"``.
    grow_bytes:
        Largest growth step of a file-backed area (default 256 MiB). The part of a step
        beyond what the tensor being placed needs is speculative: at most 1/64 of the area
        (at least 1 MiB), so the area stays within ~1.016x of what it needs, and at most half
        of the free space left on the filesystem after that tensor and a reserve (5 % of
        the filesystem, at most 1 GiB), so growing ahead never fills the disk for anyone
        else.
    sync_slack:
        In a durable store an overwritten key's old extent is reused only after an fsync
        (crash safety; a non-durable store reuses it at once, see ``durable``). Such
        extents are reclaimed with one fsync once they exceed ``sync_slack`` × the stored
        bytes (and ``grow_bytes``); until then the area grows instead. Default 1.0: the area
        may reach about twice the stored bytes, and a training step that rewrites its whole
        state costs about one fsync instead of one per ``grow_bytes`` written. When growing
        fails (full disk, ``capacity``) quarantined space is always reclaimed first.
    durable:
        ``True`` (default): reclaiming fsyncs the area and the journal first, so a power loss
        or OS crash leaves every key at its old or new version. ``False``: no fsync; still
        safe against a killed process (completed O_DIRECT writes and journal appends are in
        the kernel), not against power loss; an overwritten extent is reused as soon as the
        record of its replacement is appended, so the area needs no slack beyond the stored
        bytes and one overwrite in flight. For scratch tiers whose durable copy is a
        checkpoint (``offload_model`` uses it): on a virtio disk here each fsync of a training
        step's writes took 0.5 s.
    write_window:
        A non-durable store that finds no free extent for a write waits for the overwrites
        in flight to free their old versions, rather than grow the area, while at least this
        many bytes of writes are in flight (default 32 MiB, enough to keep an NVMe drive
        busy). The caller does not wait: the write is queued and started when room frees up.
        0 never grows while an overwrite in flight could make room; a very large value
        turns the queue off (the area then grows by every overwrite in flight).
    journal:
        ``True`` (default): every change is appended to the journal before it is
        acknowledged, so a reopen after a kill (or, durable, a crash) finds each key at its
        old or new version. ``False`` (for non-durable scratch areas their owner opens with
        ``reset=True``: ``offload_model``'s and the drop-in's tiers): no journal record per
        write (about 250 B of metadata written and a JSON encoding per write saved); the
        table is written only when the store closes, and a store that was not closed refuses
        to reopen except with ``reset=True``. Needs ``durable=False``.
    piece_bytes:
        0 (default): an overwrite is atomic, so while it is in flight the area holds the
        tensor's old and new version. A positive size (needs ``journal=False``): an
        overwrite larger than this, of the same size as the stored version, is written in
        pieces of this size, each switching its range of the key and freeing that range of
        the old version when it lands, so the area needs room for the pieces in flight
        rather than for the whole tensor (:mod:`memascend.store_pieces`). A piece that fails
        leaves its range at the old version and the rest new; the write's handle names the
        ranges. An overwrite issued while a read or another write of the key is in flight
        stays atomic. ``offload_model(exact_undo=False)`` uses 8 MiB.
    bounce_bytes:
        Chunk size for bouncing unaligned memory through aligned leases (default 8 MiB).
    meta_dir:
        Metadata folder (manifest, journal, lock). Default ``<path>.meta``; required for a
        block device.
    """

    capacity: Optional[int] = None
    checksum: str = "crc32c"
    direct: str = "auto"
    grow_bytes: int = 256 << 20
    sync_slack: float = 1.0
    durable: bool = True
    write_window: int = 32 << 20
    journal: bool = True
    piece_bytes: int = 0
    bounce_bytes: int = 8 << 20
    meta_dir: Optional[str] = None

    def __post_init__(self) -> None:
        if self.checksum not in CHECKSUMS:
            raise ConfigError("checksum", f"must be one of {CHECKSUMS}, got {self.checksum!r}")
        if self.direct not in DIRECT:
            raise ConfigError("direct", f"must be one of {DIRECT}, got {self.direct!r}")
        if self.capacity is not None:
            object.__setattr__(self, "capacity", round_up(parse_size("capacity", self.capacity)))
        slack = float(self.sync_slack)
        if not 0 <= slack <= 16:
            raise ConfigError("sync_slack", f"must be in [0, 16], got {self.sync_slack}")
        object.__setattr__(self, "sync_slack", slack)
        object.__setattr__(self, "write_window", parse_size("write_window", self.write_window))
        if not self.journal and self.durable:
            raise ConfigError("journal", "journal=False needs durable=False: a durable store "
                                         "is one that a reopen after a crash can trust")
        pieces = parse_size("piece_bytes", self.piece_bytes)
        if pieces and self.journal:
            raise ConfigError("piece_bytes", "piece_bytes needs journal=False: a journaled "
                                             "store keeps every key at its old or new version")
        if pieces and pieces < ALIGN:
            raise ConfigError("piece_bytes", f"must be 0 or at least {ALIGN} bytes, got {pieces}")
        object.__setattr__(self, "piece_bytes", round_up(pieces))
        for key in ("grow_bytes", "bounce_bytes"):
            v = parse_size(key, getattr(self, key))
            if v < ALIGN:
                raise ConfigError(key, f"must be at least {ALIGN} bytes, got {v}")
            object.__setattr__(self, key, round_up(v))

    @classmethod
    def from_env(cls, **overrides: Any) -> "StoreConfig":
        """Defaults, then ``MEMASCEND_STORE_*`` variables, then ``overrides`` (not None)."""
        return from_env(cls, "STORE", overrides)


@dataclass(frozen=True)
class StoreStats:
    """A snapshot of a store's counters (bytes unless named otherwise).

    ``writes`` / ``reads`` count completed requests; ``bytes_written`` / ``bytes_read`` the
    tensor bytes they moved (a ``read_range`` counts its range); ``writes_waited`` the
    writes that waited for overwrites in flight to free room instead of growing the area;
    ``writes_split`` those placed in several free extents because no single one held them;
    ``writes_pieced`` the overwrites written in pieces (``piece_bytes``).
    """

    keys: int
    area_bytes: int
    used_bytes: int
    free_bytes: int
    quarantined_bytes: int
    stored_bytes: int
    writes: int
    reads: int
    bytes_written: int
    bytes_read: int
    writes_waited: int
    writes_split: int
    writes_pieced: int
    write_errors: int
    read_errors: int
    checksum_failures: int
    bounced_bytes: int
    syncs: int
    direct: bool

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict."""
        return dataclasses.asdict(self)
