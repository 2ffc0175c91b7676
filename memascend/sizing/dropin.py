"""memascend as a DeepSpeed drop-in: its exact-size budgets and the streamed step's tiers
(see :mod:`memascend.sizing`).
"""
from __future__ import annotations

from typing import Optional, Sequence

from .common import round_up


# ---------------------------------------------------------------------------------------------
# memascend as a DeepSpeed drop-in
# ---------------------------------------------------------------------------------------------

def ds_param_budget_bytes(buffer_count: int, largest_param_bytes: int) -> int:
    """Pinned budget of memascend's parameter tier in DeepSpeed: the same buffer *count* as
    DeepSpeed's ``offload_param.buffer_count``, each exact-size for the largest real swapped
    tensor instead of ``buffer_size`` elements:
    ``buffer_count × round_up(largest_param_bytes, 4096)``.

    Parameters
    ----------
    buffer_count:
        ``offload_param.buffer_count`` (DeepSpeed default 5).
    largest_param_bytes:
        Bytes of the largest swapped parameter partition (aligned as DeepSpeed pads it).
    """
    return int(buffer_count) * round_up(int(largest_param_bytes))


def ma_param_tier_bytes(buffer_count: int, swapped_partition_bytes: Sequence[int]) -> int:
    """Most pinned bytes memascend's parameter tier holds in training: at most
    ``buffer_count`` partitions are resident at once and each lease is exact, so the
    ``buffer_count`` largest swapped partitions (4096-rounded), never more than the budget
    :func:`ds_param_budget_bytes`. 0 when no partition is swapped.

    Parameters
    ----------
    buffer_count:
        ``offload_param.buffer_count``.
    swapped_partition_bytes:
        Bytes of every partition read from NVMe in training (aligned as DeepSpeed pads it).
    """
    top = sorted((round_up(int(b)) for b in swapped_partition_bytes), reverse=True)
    return sum(top[:max(0, int(buffer_count))])


def ds_optimizer_budget_bytes(buffer_count: int, largest_subgroup_numel: int) -> int:
    """Pinned budget of memascend's optimizer tier in DeepSpeed:
    ``buffer_count × round_up(largest_subgroup_numel × 4, 4096)`` (fp32 state).

    Parameters
    ----------
    buffer_count:
        ``offload_optimizer.buffer_count`` (DeepSpeed default 4).
    largest_subgroup_numel:
        Partition elements of the largest optimizer sub-group.
    """
    return int(buffer_count) * round_up(int(largest_subgroup_numel) * 4)


#: Open gradient pieces while backward runs (``memascend.integrations.deepspeed.grads``).
GRAD_PIECES_OPEN = 4


def ma_stream_tier_budget(chunk: int, budget: Optional[int] = None,
                          streamed_numel: Optional[int] = None,
                          largest_subgroup_numel: Optional[int] = None) -> int:
    """The streamed optimizer tier's swapper budget: ``optimizer_budget`` when given, else 16
    pieces of ``chunk`` bytes (master, m, v and gradient of a piece and two read ahead, plus
    the write-behind); and, once the streamed sub-groups are known (``streamed_numel``
    elements in all, the largest ``largest_subgroup_numel``), no more than half their state
    (master, m and v: 12 B per element) but at least one piece's master, m and v. The tier
    is a staging window, not a pinned second copy of the state: with small models the whole
    state would otherwise sit locked beside what is on SSD."""
    if budget is not None:
        return int(budget)
    tier = 16 * int(chunk)
    if streamed_numel is not None and largest_subgroup_numel is not None:
        piece = min(int(chunk), round_up(int(largest_subgroup_numel) * 4))
        tier = min(tier, max(3 * piece, round_up(6 * int(streamed_numel))))
    return tier


def ma_stream_budget_bytes(chunk: int, budget: Optional[int] = None,
                           largest_subgroup_numel: Optional[int] = None,
                           streamed_numel: Optional[int] = None) -> int:
    """Pinned bytes of the drop-in's streamed optimizer tier: its swapper budget
    (:func:`ma_stream_tier_budget`), or less when the largest sub-group's four fp32 tensors
    (master, m, v, gradient) are smaller (leases are exact, so they are all it can hold),
    plus the step's one gradient-piece lease."""
    tier = ma_stream_tier_budget(chunk, budget, streamed_numel, largest_subgroup_numel)
    if largest_subgroup_numel is not None:
        tier = min(tier, 4 * round_up(int(largest_subgroup_numel) * 4))
    return tier + min(int(chunk), round_up(int(largest_subgroup_numel or chunk) * 4))


def ma_grad_pieces_bytes(largest_partition_numel: int, grad_bytes: int, chunk: int,
                         pieces: Optional[int] = None) -> int:
    """Backward transient of streamed gradients: the temporary of the partition being taken
    (the largest, in the gradient dtype), the open pieces and the pieces being written
    (``GRAD_PIECES_OPEN`` × chunk each, a piece being written from its own lease; no more
    than the ``pieces`` there are)."""
    held = 2 * GRAD_PIECES_OPEN if pieces is None else min(2 * GRAD_PIECES_OPEN, int(pieces))
    return round_up(int(largest_partition_numel) * grad_bytes) + held * int(chunk)
