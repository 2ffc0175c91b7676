"""SSD capacity and traffic per step, stock DeepSpeed, the drop-in and the plain path (see
:mod:`memascend.sizing`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from ..store_config import SCRATCH_PIECE_BYTES, StoreConfig
from ..store_space import GROW_AHEAD_DIV
from .common import round_up
from .deepspeed import ds_align, ds_is_swappable, ds_numel_alignment
from .ds_config import DeepSpeedConfig
from .plain import offload_budgets, offload_stores_grads, offload_tier_bytes


# ---------------------------------------------------------------------------------------------
# SSD: capacity and traffic per step
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SsdTraffic:
    """SSD capacity and steady-state traffic of one training step (bytes).

    Attributes
    ----------
    capacity:
        What the swap files hold.
    capacity_peak:
        The most the swap area may occupy: DeepSpeed's files do not grow; memascend's
        (non-durable) stores hold, beyond what they store, the new versions of the
        overwrites in flight (at most the pinned memory that stages them) and what they grew
        ahead (at most 1/64, :func:`store_slack_bytes`).
    read_per_step, written_per_step:
        Bytes read and written by one steady-state step (after the first, which creates the
        optimizer moments).
    """

    capacity: int
    capacity_peak: int
    read_per_step: int
    written_per_step: int

    @property
    def written_per_1000_steps(self) -> int:
        """Bytes written by 1,000 steady-state steps."""
        return 1000 * self.written_per_step

    def steps_to_endurance(self, drive_tbw: float, ranks: int = 1) -> Optional[int]:
        """Steady-state steps until ``ranks`` such ranks writing to one drive reach its rated
        endurance of ``drive_tbw`` terabytes written (10^12 B); None if a step writes
        nothing."""
        per_step = self.written_per_step * max(1, int(ranks))
        return int(drive_tbw * 1e12 // per_step) if per_step else None

    def to_dict(self) -> dict[str, int]:
        """The fields as a dict."""
        return {"capacity": self.capacity, "capacity_peak": self.capacity_peak,
                "read_per_step": self.read_per_step, "written_per_step": self.written_per_step,
                "written_per_1000_steps": self.written_per_1000_steps}


WRITE_WINDOW = StoreConfig.write_window  # a store's default write window


def store_slack_bytes(stored: int, staging: int, largest: Optional[int] = None,
                      areas: int = 2) -> int:
    """Space memascend's non-durable swap areas may take beyond the ``stored`` bytes: the new
    versions of overwrites in flight and growing ahead (at most 1/64 of an area,
    :data:`memascend.store_space.GROW_AHEAD_DIV`).

    An overwritten extent is reused once its replacement is recorded. What is in flight is
    at most the ``staging`` pinned bytes that hold it, and no more than what is stored. A
    write that finds no room waits for the overwrites in flight while the store's
    ``write_window`` (32 MiB) is busy, and a tensor is split over free extents before an area
    grows for it (:mod:`memascend.store_space`), so with ``largest`` (the largest tensor
    stored, or the piece size of a store that writes overwrites in pieces,
    :mod:`memascend.store_pieces`) each of the ``areas`` holds at most the window and one
    such tensor in flight:
    the old and new version of a tensor must both exist until the new one is recorded (a
    killed process finds one or the other). Small models with large embeddings stay above
    1.1x by that; large ones come to ~1.02x."""
    flight = min(int(staging), int(stored))
    if largest is not None:
        flight = min(flight, int(areas) * (WRITE_WINDOW + int(largest)))
    return flight + (int(stored) + flight) // GROW_AHEAD_DIV


def ds_ssd_traffic(param_partition_numels: Sequence[int], sub_groups: Sequence[Sequence[int]],
                   in_cpu: Sequence[bool], cfg: DeepSpeedConfig, *,
                   page_aligned: bool = False, slack_bytes: int = 0,
                   recompute: bool = False, micro_batches: int = 1) -> SsdTraffic:
    """SSD capacity and per-step traffic of ZeRO-3 with NVMe offload, for one rank.

    Files: one per swappable parameter partition (``⌈n⌉_A × E_model``, written at
    ``zero.Init`` even for parameters that later stay in the flat CPU buffer); per swappable
    optimizer sub-group the fp32 master and the two Adam moments (``3 × ⌈L_i⌉_A × 4``) and
    the aligned head of each parameter's fp32 gradient (``⌊n⌋_A × 4``; remainders stay in
    RAM). A step reads the parameters that live on NVMe in forward and again in backward
    (three times with activation checkpointing) and writes them once after the update; the
    optimizer reads master, moments and gradients and writes master and moments; the
    gradients are written in backward (per micro-batch).

    Parameters
    ----------
    param_partition_numels:
        Partition elements of every parameter, in order.
    sub_groups:
        :func:`ds_sub_groups` of those.
    in_cpu:
        :func:`ds_subgroups_in_cpu` of the sub-groups.
    cfg:
        The parsed DeepSpeed config.
    page_aligned:
        Size every tensor to a multiple of 4096 B instead of DeepSpeed's alignment
        (memascend's store, drop-in).
    slack_bytes:
        Space beyond the stored bytes (``capacity_peak = capacity + slack_bytes``; memascend:
        :func:`store_slack_bytes`).
    recompute:
        Activation checkpointing (parameters are read a third time).
    micro_batches:
        Gradient accumulation steps per optimizer step.
    """
    e = cfg.model_bytes
    a_model = ds_numel_alignment(e, cfg.aio_intra_op_parallelism)
    a_fp32 = ds_numel_alignment(4, cfg.aio_intra_op_parallelism)

    def sized(n: int, eb: int, a: int) -> int:
        return round_up(n * eb) if page_aligned else ds_align(n, a) * eb

    cap = read = written = 0
    if cfg.params_on_nvme:
        idx = 0
        for gi, group in enumerate(sub_groups):
            for _n in group:
                if ds_is_swappable(param_partition_numels[idx], e, cfg.aio_block_size):
                    nbytes = sized(param_partition_numels[idx], e, a_model)
                    cap += nbytes
                    if not in_cpu[gi]:
                        read += nbytes * (3 if recompute else 2) * micro_batches
                        written += nbytes
                idx += 1
    if cfg.optimizer_on_nvme:
        for group in sub_groups:
            total = sum(group)
            if not ds_is_swappable(total, 4, cfg.aio_block_size):
                continue
            state = 3 * sized(total, 4, a_fp32)
            grads = sum((round_up(n * 4) if page_aligned else (n // a_fp32) * a_fp32 * 4)
                        for n in group)
            cap += state + grads
            read += state + grads
            written += state + grads * micro_batches
    return SsdTraffic(capacity=cap, capacity_peak=cap + int(slack_bytes),
                      read_per_step=read, written_per_step=written)


def offload_ssd_traffic(numels: Sequence[int], compute_bytes: int, budget: Optional[int] = None,
                        optimizer_budget: Optional[int] = None, *, exact_undo: bool = True,
                        micro_batches: int = 1, grads: Optional[bool] = None) -> SsdTraffic:
    """SSD capacity and steady-state traffic per step of ``offload_model`` (the step fused
    into backward, :mod:`memascend.fused`).

    Capacity: the two tiers' stored bytes (:func:`offload_tier_bytes`). At its peak, in a
    step, the areas also hold the old version of every parameter and of its optimizer state
    that the step has updated (an update is a speculation until ``step()`` commits it, kept
    aside for an exact undo: :mod:`memascend.fused`), so about twice the state without the
    gradients, plus the overwrites in flight and what the areas grew ahead
    (:func:`store_slack_bytes` of the two budgets); ``exact_undo=False`` keeps nothing
    aside, and its tiers write a large overwrite in pieces of
    :data:`memascend.store_config.SCRATCH_PIECE_BYTES`, so no more than one piece per area is
    in flight beyond the window. Per step:
    every parameter is read in forward and again in backward unless the parameter tier holds
    the whole model (an upper bound: what is still cached when backward starts is not read
    again), per micro-batch; the update reads ``m`` and ``v`` (and the fp32 master when the
    compute dtype is not fp32) once and writes them and the parameter once. Gradients
    (``grads``, default :func:`offload_stores_grads` of ``micro_batches``): each micro-batch
    but the first reads the stored sum; each but the last writes it, and the last writes it
    too when gradients are kept.
    """
    b, ob = offload_budgets(budget, optimizer_budget)
    keep = offload_stores_grads(micro_batches) if grads is None else grads
    p, o = offload_tier_bytes(numels, compute_bytes, grads=keep)
    g = sum(round_up(n * 4) for n in numels)
    state = o - (g if keep else 0)  # m, v (+ master)
    param_reads = p if p <= b else 2 * p
    read = param_reads * micro_batches + state + g * (micro_batches - 1)
    written = p + state + g * (micro_batches - (0 if keep else 1))
    # old versions of what the window updated, until step() commits (exact_undo=False:
    # each update replaces them as it is made)
    aside = p + state if exact_undo else 0
    largest = max((round_up(n * 4) for n in numels), default=0)
    if not exact_undo:  # its tiers write large overwrites in pieces (store_pieces)
        largest = min(largest, SCRATCH_PIECE_BYTES)
    return SsdTraffic(capacity=p + o,
                      capacity_peak=p + o + aside + store_slack_bytes(p + o + aside, b + ob,
                                                                      largest),
                      read_per_step=read, written_per_step=written)
