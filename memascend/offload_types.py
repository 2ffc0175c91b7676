"""What :func:`memascend.offload_model` takes and reports besides tensors: the fp16 loss
scaler's settings (:class:`LossScaler`) and a snapshot of its counters (:class:`OffloadStats`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class LossScaler:
    """Dynamic loss scaling for fp16 (halve on overflow, double after ``growth_interval``
    good steps)."""

    init_scale: float = 2.0 ** 16
    growth_interval: int = 1000
    min_scale: float = 1.0


@dataclass(frozen=True)
class OffloadStats:
    """A snapshot of an :class:`OffloadedModel`'s counters.

    ``steps``: committed optimizer steps; ``paths``: how often each path of the step ran
    (:class:`memascend.fused.Counts`); ``ssd_read`` / ``ssd_written``: tensor bytes the two
    tiers moved; ``arenas_mapped`` / ``locked_bytes``: the pinned pool's mappings so far and
    its locked bytes now; ``pinned_reserved``: bytes the pool has mapped (these three cover
    the activation tier's pool too); ``activations``: the activation tier's counters
    (:class:`memascend.activations.ActivationStats`), None without one.
    """

    steps: int
    skipped_steps: int
    paths: dict[str, Any]
    ssd_read: int
    ssd_written: int
    arenas_mapped: int
    locked_bytes: int
    pinned_reserved: int
    last_grad_norm: Optional[float]
    activations: Optional[dict[str, Any]] = None

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict."""
        return asdict(self)
