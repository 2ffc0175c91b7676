"""Stock DeepSpeed 0.19.8 ZeRO-3 / ZeRO-Infinity: its geometry (alignment, swappability,
partitions, sub-groups) and its host memory, component by component (see
:mod:`memascend.sizing`).
"""
from __future__ import annotations

from typing import Sequence

from .common import DS_AIO_ALIGNED_BYTES, DS_MIN_AIO_BYTES, OVERFLOW_CHUNK_NUMEL, round_up


# ---------------------------------------------------------------------------------------------
# DeepSpeed geometry: alignment, swappability, partitions, sub-groups
# ---------------------------------------------------------------------------------------------

def ds_numel_alignment(elem_bytes: int, intra_op_parallelism: int = 1) -> int:
    """DeepSpeed's element alignment ``A = 1024 × intra_op_parallelism / elem_bytes``: every
    swap tensor, swap buffer slot and swap file is padded to a multiple of ``A`` elements."""
    return DS_AIO_ALIGNED_BYTES * max(1, intra_op_parallelism) // elem_bytes


def ds_align(numel: int, alignment: int) -> int:
    """``numel`` padded up to a multiple of ``alignment`` elements (``_io_aligned_numel``)."""
    return round_up(numel, alignment)


def ds_swap_threshold_bytes(block_size: int = 1_048_576) -> int:
    """Smallest tensor DeepSpeed swaps, in bytes: ``max(1 MiB, aio.block_size)``."""
    return max(DS_MIN_AIO_BYTES, int(block_size))


def ds_is_swappable(numel: int, elem_bytes: int, block_size: int = 1_048_576) -> bool:
    """Whether DeepSpeed swaps a tensor of ``numel`` elements (smaller ones stay in RAM)."""
    return numel * elem_bytes >= ds_swap_threshold_bytes(block_size)


def ds_partition_numel(numel: int, world_size: int = 1) -> int:
    """Elements of one rank's ZeRO-3 partition of a parameter: ``ceil(numel / world_size)``."""
    return -(-int(numel) // max(1, world_size))


def ds_sub_groups(numels: Sequence[int], sub_group_size: int) -> list[list[int]]:
    """Split one parameter group into DeepSpeed's optimizer sub-groups
    (``stage3._create_fp16_sub_groups``): parameters in order, a sub-group closes as soon as it
    holds ``sub_group_size`` elements or more (so it may overshoot by one parameter).

    Parameters
    ----------
    numels:
        Partition element counts of the parameters, in ``model.parameters()`` order.
    sub_group_size:
        ``zero_optimization.sub_group_size``.

    Returns
    -------
    list of lists of int
        The element counts of each sub-group's parameters.
    """
    numels = [int(n) for n in numels]
    if not numels:
        return []
    if sub_group_size is None or sub_group_size >= sum(numels):
        return [numels]
    groups: list[list[int]] = []
    cur: list[int] = []
    size = 0
    for n in numels:
        cur.append(n)
        size += n
        if size >= sub_group_size:
            groups.append(cur)
            cur, size = [], 0
    if cur:
        groups.append(cur)
    return groups


# ---------------------------------------------------------------------------------------------
# Stock DeepSpeed: host memory, component by component
# ---------------------------------------------------------------------------------------------

def ds_param_pool_bytes(buffer_count: int, buffer_size: int, elem_bytes: int,
                        alignment: int) -> int:
    """Locked parameter swap pool of one ``zero.Init``:
    ``buffer_count × ⌈buffer_size⌉_A × elem_bytes`` (defaults 5 × 100,000,256 × 2 B ≈ 1.0 GB).

    ``AsyncPartitionedParameterSwapper._configure_aio`` first allocates an unpinned
    ``torch.empty`` of the same size and then the locked copy: see
    :func:`ds_param_pool_unpinned_copy_bytes`.
    """
    return buffer_count * ds_align(buffer_size, alignment) * elem_bytes


def ds_param_pool_unpinned_copy_bytes(buffer_count: int, buffer_size: int, elem_bytes: int,
                                      alignment: int) -> int:
    """The unpinned ``torch.empty`` DeepSpeed allocates before the locked parameter pool, the
    same size as the pool (a transient 2× of address space at start-up).

    It is never written, so its pages are never faulted in: it costs virtual memory and
    commit charge (it can fail under ``vm.overcommit_memory=2``), not RSS. Measured: ``VmHWM``
    grew by exactly the locked pool at ``zero.Init``, not twice it.
    """
    return ds_param_pool_bytes(buffer_count, buffer_size, elem_bytes, alignment)


def ds_fp16_flat_cpu_numel(trainable_partition_numel: int, max_in_cpu: int,
                           params_on_nvme: bool) -> int:
    """Elements of the "fp16" flat CPU buffer of ZeRO-3 with parameter offload
    (``stage3._create_param_groups_fp16_flat_cpu_memory``): the whole partition with
    ``offload_param.device == "cpu"``, else ``min(partition, max_in_cpu)``. With the default
    ``max_in_cpu`` = 1e9 a model of up to 1e9 elements per rank stays entirely in CPU memory,
    not on NVMe (DeepSpeed issue #4221)."""
    if not params_on_nvme:
        return int(trainable_partition_numel)
    return int(min(trainable_partition_numel, max_in_cpu))


def ds_fp16_flat_cpu_bytes(trainable_partition_numel: int, max_in_cpu: int,
                           params_on_nvme: bool, elem_bytes: int) -> int:
    """Bytes of the fp16 flat CPU buffer (:func:`ds_fp16_flat_cpu_numel` × element size).

    DeepSpeed pins it whatever ``pin_memory`` says (on a CUDA machine); it is written at
    start-up, so it is resident.
    """
    return ds_fp16_flat_cpu_numel(trainable_partition_numel, max_in_cpu, params_on_nvme) * elem_bytes


def ds_subgroups_in_cpu(sub_group_partition_numels: Sequence[int], flat_numel: int,
                        params_on_nvme: bool) -> list[bool]:
    """Which sub-groups get a slice of the flat CPU buffer (the rest stay on NVMe): in order,
    while the running total fits in ``flat_numel`` (``_create_fp16_partitions_with_defragmentation``)."""
    out, offset = [], 0
    for n in sub_group_partition_numels:
        fits = (not params_on_nvme) or offset + n <= flat_numel
        out.append(fits)
        offset += n
    return out


def ds_partitioned_reserve_bytes(sub_groups_full_numels: Sequence[Sequence[int]],
                                 sub_group_partition_numels: Sequence[int],
                                 in_cpu: Sequence[bool], elem_bytes: int, alignment: int) -> int:
    """Locked "partitioned swap buffer" for writing updated parameters back to NVMe after each
    step (``reserve_partitioned_swap_space``), allocated only when some sub-group has no slice
    of the flat CPU buffer: ``Σ ⌈p.ds_numel⌉_A × elem_bytes`` over the parameters of the
    largest sub-group (largest by partition elements). It uses each parameter's *full* element
    count, not its partition, so it is oversized by about the data-parallel world size.

    Parameters
    ----------
    sub_groups_full_numels:
        Per sub-group, the full (unpartitioned) element count of each parameter.
    sub_group_partition_numels:
        Per sub-group, its total partition elements.
    in_cpu:
        Per sub-group, whether it has a slice of the flat CPU buffer.
    elem_bytes, alignment:
        Model element size and DeepSpeed's element alignment.
    """
    if all(in_cpu):
        return 0
    best = max(range(len(sub_group_partition_numels)), key=lambda i: (sub_group_partition_numels[i], -i))
    return sum(ds_align(n, alignment) for n in sub_groups_full_numels[best]) * elem_bytes


def ds_optimizer_pool_bytes(buffer_count: int, largest_subgroup_numel: int, master_bytes: int,
                            alignment: int) -> int:
    """Locked optimizer swap pool (``OptimizerSwapper`` → ``SwapBufferManager``), zero-filled:
    ``buffer_count × ⌈L⌉_A × master_bytes``, ``L`` the largest sub-group's partition elements
    (default 4 × 1e9 × 4 B = 16 GB for models of 1e9 elements or more)."""
    return buffer_count * ds_align(largest_subgroup_numel, alignment) * master_bytes


def ds_gradient_buffer_bytes(trainable_partition_numel: int, grad_bytes: int) -> int:
    """ZeRO-3's flat gradient buffer ``grad_partitions_flat_buffer``: every trainable
    partition element in the gradient-accumulation dtype, zero-filled (resident), pinned when
    ``offload_optimizer.pin_memory``."""
    return int(trainable_partition_numel) * grad_bytes


def ds_ipg_bucket_bytes(trainable_numel: int, reduce_bucket_size: int, elem_bytes: int,
                        contiguous_gradients: bool = True) -> int:
    """The part of ZeRO-3's contiguous-gradients bucket (``reduce_bucket_size`` elements,
    allocated with ``torch.empty``) that backward writes and so makes resident: the largest
    bucket fill, ``min(reduce_bucket_size, trainable elements)`` in the model dtype."""
    if not contiguous_gradients:
        return 0
    return int(min(reduce_bucket_size, trainable_numel)) * elem_bytes


def ds_reduce_scatter_copy_bytes(trainable_numel: int, reduce_bucket_size: int, elem_bytes: int,
                                 world_size: int = 1) -> int:
    """The flat copy ``reduce_scatter_coalesced`` makes of a reduce bucket's gradients
    (``torch.cat`` of every rank's padded chunks, on the compute device) and keeps while
    ``partition_grads`` reads its partition views: ``min(reduce_bucket_size, trainable)``
    elements, rounded up to the world size, in the communication dtype. memascend's drop-in
    skips it at world size 1 (each gradient is its own partition)."""
    n = int(min(reduce_bucket_size, trainable_numel))
    ws = max(1, int(world_size))
    return -(-n // ws) * ws * int(elem_bytes)


def ds_reduce_buckets(numels: Sequence[int], reduce_bucket_size: int) -> list[list[int]]:
    """Indices of the parameters in each of ZeRO-3's reduce buckets, as backward fills them:
    last parameter first; a gradient that does not fit flushes the bucket first."""
    out: list[list[int]] = [[]]
    filled = 0
    for i in reversed(range(len(numels))):
        if out[-1] and filled + int(numels[i]) > reduce_bucket_size:
            out.append([])
            filled = 0
        out[-1].append(i)
        filled += int(numels[i])
    return out


def ds_fp32_gradient_copy_allocations(numels: Sequence[int], partition_numels: Sequence[int],
                                      reduce_bucket_size: int,
                                      master_bytes: int = 4) -> list[int]:
    """fp32 copies of one reduce bucket's gradient partitions on their way to the NVMe
    optimizer tier (``partition_grads``: ``grad_buffer.float()`` per parameter, all alive
    until the bucket's swap-out), one allocation per partition of the fullest bucket
    (:func:`ds_reduce_buckets` over the full ``numels``). Freed afterwards; those below
    glibc's mmap threshold stay in the heap (:func:`heap_bytes`; measured:
    ``MALLOC_MMAP_THRESHOLD_=131072`` removes that much RSS)."""
    bucket = max(ds_reduce_buckets(numels, reduce_bucket_size),
                 key=lambda b: sum(int(partition_numels[i]) for i in b))
    return [int(partition_numels[i]) * master_bytes for i in bucket]


def ds_init_fp32_buffer_allocations(sub_group_partition_numels: Sequence[int],
                                    in_cpu: Sequence[bool], fast_init: bool,
                                    master_bytes: int = 4) -> list[int]:
    """Unpinned fp32 buffers of ``stage3._create_fp32_partitions`` for sub-groups whose
    parameters live on NVMe (no slice of the flat CPU buffer), without ``fast_init``: one
    ``torch.empty`` of the sub-group per iteration, assigned to the same variable, so the
    previous one is freed only after the next exists — the two largest at once (none with
    ``fast_init``)."""
    if fast_init:
        return []
    on_nvme = [n for n, cpu in zip(sub_group_partition_numels, in_cpu) if not cpu]
    return [int(n) * master_bytes for n in sorted(on_nvme, reverse=True)[:2]]


def ds_adam_first_step_bytes(largest_subgroup_numel: int, master_bytes: int = 4) -> int:
    """Transient of the first optimizer step with the optimizer on NVMe: Adam creates
    ``exp_avg`` and ``exp_avg_sq`` of a sub-group as ordinary tensors (they are not in the
    swap files yet), 2 × L × 4 B, before the swapper writes them out."""
    return 2 * int(largest_subgroup_numel) * master_bytes


def ds_overflow_check_bytes(trainable_partition_numel: int, grad_bytes: int,
                            fp16: bool) -> int:
    """Peak temporaries of stock ZeRO-3's fp16 overflow check (``has_overflow``):
    ``torch.isinf(buf)`` over the whole flat gradient buffer computes ``abs(buf)`` (one
    gradient-sized copy) and a bool result (1 B per element), then ``isnan`` a bool result:
    ``numel × (grad_bytes + 1)``. Only fp16 runs check (bf16 and fp32 do not)."""
    if not fp16:
        return 0
    return int(trainable_partition_numel) * (grad_bytes + 1)


def chunked_overflow_check_bytes(grad_bytes: int, fp16: bool = True,
                                 chunk_numel: int = OVERFLOW_CHUNK_NUMEL) -> int:
    """Peak temporaries of memascend's fused overflow check: the same two temporaries for one
    chunk of ``chunk_numel`` elements at a time (≈ 3 MiB for fp16), independent of the model."""
    if not fp16:
        return 0
    return chunk_numel * (grad_bytes + 1)


def ds_padding_bytes(numels: Sequence[int], elem_bytes: int, alignment: int) -> int:
    """Bytes DeepSpeed's element alignment adds over ``numels`` (``⌈n⌉_A − n`` each)."""
    return sum(ds_align(n, alignment) - n for n in numels) * elem_bytes
