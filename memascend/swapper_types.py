"""The swapper's records and settings: a key's shape and dtypes (:class:`_Meta`), a resident
tensor and where it is in its life (:class:`_Res`), the counters' snapshot
(:class:`SwapperStats`) and the options (:class:`SwapperConfig`) of
:class:`memascend.swapper.TensorSwapper`.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from .config import parse_size
from .errors import ConfigError
from .handle import SwapHandle
from .pool import Lease


def _torch():
    import torch

    return torch


def _dtype(d: Any):
    torch = _torch()
    if isinstance(d, torch.dtype):
        return d
    name = d.replace("torch.", "") if isinstance(d, str) else None
    if name is not None and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    raise ValueError(f"not a torch dtype: {d!r}")


@dataclass(frozen=True)
class _Meta:
    shape: tuple[int, ...]
    dtype: Any          # served (torch.dtype)
    stored: Any         # on disk (torch.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def served_bytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        return self.numel * self.stored.itemsize


class _Res:
    """A resident tensor: its buffer and where it is in its life."""

    __slots__ = ("key", "meta", "lease", "stage", "state", "users", "prefetched", "used",
                 "writing", "drop_after_write", "view", "error", "waiters", "last_use",
                 "pass_no")

    def __init__(self, key: str, meta: _Meta, lease: Lease, prefetched: bool, pass_no: int):
        self.key, self.meta, self.lease = key, meta, lease
        self.stage: Optional[Lease] = None
        self.state = "loading"
        self.users = 0
        self.prefetched = prefetched
        self.used = False
        self.writing = 0
        self.drop_after_write = False
        self.view = None
        self.error: Optional[BaseException] = None
        self.waiters: list[tuple[SwapHandle, float]] = []
        self.last_use = time.monotonic()
        self.pass_no = pass_no  # the pass it was loaded in


@dataclass(frozen=True)
class SwapperStats:
    """A snapshot of a swapper's counters (bytes unless named otherwise).

    ``hits``: prefetched and ready before asked; ``reuse_hits``: still resident from an earlier
    use; ``late``: prefetch in flight when asked (the consumer waited); ``misses``: read on
    demand. ``wait_seconds`` is the time from a late or missed ``swap_in`` to its data.
    ``prefetch_errors``: background reads that could not start (the consumer gets the error).
    """

    accesses: int
    hits: int
    reuse_hits: int
    late: int
    misses: int
    wait_seconds: float
    budget_waits: int
    reads: int
    writes: int
    bytes_read: int
    bytes_written: int
    evictions: int
    wasted_prefetches: int
    prefetch_errors: int
    depth: int
    depth_history: list[tuple[int, int]]
    resident_keys: int
    pinned_bytes: int
    pinned_peak: int
    budget_bytes: int
    leases_created: int
    leases_reused: int
    overflow_leases: int
    plan_learning: bool
    plan_length: int
    plan_resyncs: int

    @property
    def hit_rate(self) -> float:
        """Share of accesses served without waiting (hits + reuse hits)."""
        return (self.hits + self.reuse_hits) / self.accesses if self.accesses else math.nan

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict (with ``hit_rate``)."""
        d = asdict(self)
        d["hit_rate"] = self.hit_rate
        return d


@dataclass(frozen=True)
class SwapperConfig:
    """Options of a :class:`TensorSwapper`.

    Attributes
    ----------
    budget_bytes:
        Most pinned bytes the swapper holds at once (required).
    start_depth, max_depth:
        Initial and largest prefetch depth, in tensors (defaults 2 and 32).
    chunk_bytes:
        Staging buffer for dtype conversion on the way in (default 4 MiB).
    wait_timeout:
        Seconds a request may wait for budget before ``TimeoutError`` (default 600).
    plan_prefetch:
        Read ahead along the learned access order (default True). Turn it off when the
        consumer calls :meth:`TensorSwapper.prefetch` itself from an order it knows, and
        the learned one would mislead: e.g. an optimizer step, where the plan wraps into
        the next pass and reads gradients that backward overwrites first.
    """

    budget_bytes: int
    start_depth: int = 2
    max_depth: int = 32
    chunk_bytes: int = 4 << 20
    wait_timeout: float = 600.0
    plan_prefetch: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "budget_bytes", parse_size("budget_bytes", self.budget_bytes))
        object.__setattr__(self, "chunk_bytes", parse_size("chunk_bytes", self.chunk_bytes))
        if self.budget_bytes <= 0:
            raise ConfigError("budget_bytes", f"must be > 0, got {self.budget_bytes}")
        if not 1 <= self.start_depth <= self.max_depth:
            raise ConfigError("start_depth", f"must be in [1, max_depth={self.max_depth}]")
        if self.chunk_bytes < 4096 or self.chunk_bytes % 4096:
            raise ConfigError("chunk_bytes", "must be a positive multiple of 4096")
        if self.wait_timeout <= 0:
            raise ConfigError("wait_timeout", "must be > 0")
