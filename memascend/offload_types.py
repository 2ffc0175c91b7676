"""What :func:`memascend.offload_model` takes and reports besides tensors: its scalar options
(:class:`OffloadOptions`, through :mod:`memascend.config`'s registry: a field not given comes
from ``MEMASCEND_OFFLOAD_<FIELD>``, an unknown name is an error), the fp16 loss scaler's
settings (:class:`LossScaler`) and a snapshot of its counters (:class:`OffloadStats`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional

from .heap import PLAIN_MMAP_THRESHOLD
from .sizing.common import ACTIVATION_DEFAULT_BUDGET, OFFLOAD_DEFAULT_BUDGET


@dataclass(frozen=True)
class OffloadOptions:
    """The scalar options of :func:`memascend.offload_model` (checked when the model is
    offloaded; sizes take ``4096``, ``"64MiB"``, ``"1.5GB"``).

    Attributes
    ----------
    budget:
        Pinned bytes of the parameter tier (default 1 GiB).
    optimizer_budget:
        Pinned bytes of the optimizer tier (default: ``budget``).
    compute_dtype:
        ``torch.float32`` (default), ``bfloat16`` or ``float16``, or its name: the dtype
        forward and backward run in (fp32 masters either way).
    accumulation_steps:
        Micro-batches per optimizer step; default None: learned from the first window,
        which runs as a two-phase step, and fused windows then also store their gradients,
        4 B/parameter, so that a longer window can be undone. Declare it to save those
        bytes; a longer window is then an error.
    max_grad_norm:
        Clip the global gradient norm before the update, exactly as
        ``torch.nn.utils.clip_grad_norm_`` (default None: no clipping).
    fused_step:
        True (default): each update runs in backward as soon as the parameter's gradient
        is final; False runs every step as a two-phase step after backward.
    heap_mmap_threshold:
        Default 128 KiB: glibc maps heap requests of this size or more on their own, so
        freed tensors leave RSS, process-wide (:mod:`memascend.heap`); 0 leaves glibc's
        dynamic threshold alone: fewer page faults, more RSS.
    host_threads:
        Threads of the optimizer worker's AdamW kernels (default torch's intra-op count).
    overlap_step:
        True (default): the updates that cannot be fused into backward, in deferred and
        clipped windows, run on the worker after ``step()`` returns, while the next
        forward goes on, each module's forward waiting only for its own parameters, and
        the last writes of fused updates land meanwhile too; False: ``step()`` returns when
        they are done.
    exact_undo:
        True (default): a step's updates keep the old versions aside until they are
        committed, so the SSD holds about twice the state during a step; False: each
        update is committed as it is made, about 1.1x, and nothing can be undone: clipped
        and fp16 windows run two-phase, a longer window or ``zero_grad()`` before ``step()``
        is an error, a failed update leaves the step partly applied (see
        :class:`memascend.fused.FusedAdam`; a tensor over 8 MiB is overwritten in pieces
        unless a read of it is in flight, so the one whose write failed may be part updated
        too, and the error names its ranges).
    activations:
        ``"ssd"``, ``"pinned"`` or None (default): where the tensors the model's forward
        saves for backward wait (:mod:`memascend.activations`; with activation
        checkpointing, the checkpoints' inputs).
    activation_budget:
        Pinned bytes of the activation tier (default 64 MiB).
    """

    budget: Any = OFFLOAD_DEFAULT_BUDGET
    optimizer_budget: Any = None
    compute_dtype: Any = "float32"
    accumulation_steps: Optional[int] = None
    max_grad_norm: Optional[float] = None
    fused_step: bool = True
    heap_mmap_threshold: int = PLAIN_MMAP_THRESHOLD
    host_threads: Optional[int] = None
    overlap_step: bool = True
    exact_undo: bool = True
    activations: Optional[str] = None
    activation_budget: Any = ACTIVATION_DEFAULT_BUDGET


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
