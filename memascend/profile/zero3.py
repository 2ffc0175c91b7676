"""The ZeRO-3 footprint, stock DeepSpeed or the memascend drop-in: :func:`estimate_deepspeed`.

What both flavours derive from the workload and the config (partitions, sub-groups, what
stays in the flat CPU buffer, what is swapped and read in training, glibc's mmap threshold)
is a :class:`_Layout`. What differs is the swap tiers, and each flavour builds its own:
:class:`_StockTiers` (DeepSpeed's rules: fixed ``buffer_size`` slots, the partitioned
reserve, ``buffer_count`` x the largest sub-group, one flat gradient buffer, the full-size
overflow check) and :class:`_DropInTiers` (exact-size leases, no reserve, the streamed step's
pieces and gradient pieces, the chunked overflow check). The rest (runtime, start-up,
activations, gradient copies, SSD traffic) is shared, in :func:`estimate_deepspeed`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from .. import sizing as sz
from ..errors import ConfigError
from .estimate import Component, Estimate, Workload, _activations, _freed, _model_numels


@dataclass
class _Layout:
    """What both flavours derive from the workload and the config."""

    w: Workload
    ds: sz.DeepSpeedConfig
    stock: bool
    heap_at: int  # glibc's mmap threshold in force

    def __post_init__(self) -> None:
        ds = self.ds
        self.ws = self.w.world_size
        self.e, self.ge = ds.model_bytes, ds.grad_bytes
        self.a = sz.ds_numel_alignment(self.e, ds.aio_intra_op_parallelism)
        self.a32 = sz.ds_numel_alignment(4, ds.aio_intra_op_parallelism)
        self.full = _model_numels(self.w.model)
        self.parts = [sz.ds_partition_numel(n, self.ws) for n in self.full]
        self.n_part = sum(self.parts)
        self.groups = sz.ds_sub_groups(self.parts, ds.sub_group_size)
        self.group_totals = [sum(g) for g in self.groups]
        self.largest_group = max(self.group_totals)
        self.flat = sz.ds_fp16_flat_cpu_numel(self.n_part, ds.max_in_cpu, ds.params_on_nvme) \
            if ds.param_device != "none" else 0
        self.in_cpu = sz.ds_subgroups_in_cpu(self.group_totals, self.flat, ds.params_on_nvme)
        self.full_groups, i = [], 0
        for g in self.groups:
            self.full_groups.append(self.full[i:i + len(g)])
            i += len(g)
        self.swapped = [p for p in self.parts if sz.ds_is_swappable(p, self.e, ds.aio_block_size)]
        # Partitions read from NVMe in training: those of the sub-groups outside the flat buffer.
        self.fetched = [p for g, cpu in zip(self.groups, self.in_cpu) if not cpu for p in g
                        if sz.ds_is_swappable(p, self.e, ds.aio_block_size)] \
            if self.flat < self.n_part else []
        # The drop-in's streamed step (DeepSpeedCPUAdam, fp32 state): swapped sub-groups in
        # pieces; stock steps every sub-group whole.
        self.streamed = [not self.stock and ds.optimizer_on_nvme and ds.stream_optimizer and
                         sz.ds_is_swappable(n, 4, ds.aio_block_size) for n in self.group_totals]
        self.grads_streamed = [s and ds.stream_grads for s in self.streamed]
        self.largest_whole = max((n for n, s in zip(self.group_totals, self.streamed) if not s),
                                 default=0)


class _StockTiers:
    """DeepSpeed 0.19.8's own swap tiers."""

    @staticmethod
    def params(L: _Layout, notes: list[str]) -> list[Component]:
        ds, a, e = L.ds, L.a, L.e
        largest_swapped = max(L.swapped, default=0)
        if largest_swapped and sz.ds_align(largest_swapped, a) > sz.ds_align(ds.param_buffer_size, a):
            notes.append(f"the largest swapped parameter partition has {largest_swapped:,} "
                         f"elements > offload_param.buffer_size {ds.param_buffer_size:,}: "
                         "DeepSpeed refuses to start (issue #3506)")
        pool = sz.ds_param_pool_bytes(ds.param_buffer_count, ds.param_buffer_size, e, a)
        reserve = sz.ds_partitioned_reserve_bytes(L.full_groups, L.group_totals, L.in_cpu, e, a)
        return [
            Component("param_pool", "parameter swap pool", pool, "locked",
                      note=f"{ds.param_buffer_count} x {sz.ds_align(ds.param_buffer_size, a):,} "
                           f"elements x {e} B"),
            Component("param_pool_unpinned_copy",
                      "unpinned copy of the parameter pool at start-up", pool, "virtual",
                      note="torch.empty never written: address space, not RSS"),
            Component("partitioned_reserve", "partitioned swap reserve (write-back)", reserve,
                      "locked", note="largest sub-group, full numel" if reserve else
                      "not allocated: every sub-group is in the flat CPU buffer")]

    @staticmethod
    def optimizer(L: _Layout, notes: list[str]) -> list[Component]:
        ds = L.ds
        opool = sz.ds_optimizer_pool_bytes(ds.optimizer_buffer_count, L.largest_group, 4, L.a32)
        if ds.pipeline_read or ds.pipeline_write:
            notes.append("pipelined optimizer swapping needed buffer_count >= 12 to run in "
                         "DeepSpeed 0.19.8 (\"ran out of swap buffers\" below)")
        return [Component("optimizer_pool", "optimizer swap pool", opool, "locked",
                          note=f"{ds.optimizer_buffer_count} x "
                               f"{sz.ds_align(L.largest_group, L.a32):,} elements x 4 B")]

    @staticmethod
    def overflow(L: _Layout) -> tuple[int, str]:
        return (sz.ds_overflow_check_bytes(L.n_part, L.ge, True),
                "isinf/isnan over the whole gradient buffer")


class _DropInTiers:
    """memascend's swappers in DeepSpeed."""

    @staticmethod
    def params(L: _Layout, notes: list[str]) -> list[Component]:
        ds, a, e = L.ds, L.a, L.e
        budget = sz.ds_param_budget_bytes(ds.param_buffer_count,
                                          sz.ds_align(max(L.swapped, default=0), a) * e)
        pool = min(budget, sz.ma_param_tier_bytes(ds.param_buffer_count,
                                                  [sz.ds_align(p, a) * e for p in L.fetched]))
        return [
            Component("param_pool", "parameter tier leases (exact-size)", pool, "locked",
                      note=f"the {ds.param_buffer_count} largest partitions read in training, "
                           "4096-rounded" if L.fetched else
                           "none: no partition is read in training"),
            Component("partitioned_reserve", "partitioned swap reserve", 0, "locked",
                      note="none: one exact-size staging lease at a time")]

    @staticmethod
    def optimizer(L: _Layout, notes: list[str]) -> list[Component]:
        ds = L.ds
        if not any(L.streamed):  # DeepSpeed's whole-sub-group swappers on memascend's store
            if ds.pipeline_read or ds.pipeline_write:
                notes.append("pipelined optimizer swapping needed buffer_count >= 12 to run in "
                             "DeepSpeed 0.19.8 (\"ran out of swap buffers\" below)")
            return [Component("optimizer_pool", "optimizer tier budget (exact-size)",
                              sz.ds_optimizer_budget_bytes(ds.optimizer_buffer_count,
                                                           L.largest_group), "locked",
                              note=f"{ds.optimizer_buffer_count} x largest sub-group x 4 B, "
                                   "4096-rounded")]
        chunk = ds.optimizer_chunk
        sizes = [n for n, s in zip(L.group_totals, L.streamed) if s]
        if L.largest_whole:
            notes.append("sub-groups too small to swap are stepped whole in CPU memory")
        if ds.pipeline_read or ds.pipeline_write:
            notes.append("pipeline_read/pipeline_write do not apply to the streamed step")
        return [Component("optimizer_pool", "streamed optimizer tier budget",
                          sz.ma_stream_budget_bytes(chunk, ds.optimizer_budget, max(sizes),
                                                    sum(sizes)), "locked",
                          note=f"pieces of {chunk:,} B per tensor; budget + one gradient piece")]

    @staticmethod
    def overflow(L: _Layout) -> tuple[int, str]:
        return sz.chunked_overflow_check_bytes(L.ge, True), "1 Mi elements at a time"


def estimate_deepspeed(w: Workload, ds: sz.DeepSpeedConfig, *, flavor: str = "stock",
                       mmap_threshold: Optional[int] = None) -> Estimate:
    """Footprint of ZeRO-3 with this DeepSpeed config, stock or with memascend's swappers.

    Parameters
    ----------
    w:
        The workload.
    ds:
        The parsed DeepSpeed config (:func:`memascend.sizing.parse_deepspeed_config`).
    flavor:
        ``"stock"`` (DeepSpeed's own swappers) or ``"memascend"`` (the drop-in).
    mmap_threshold:
        glibc's mmap threshold the stock run has (``MALLOC_MMAP_THRESHOLD_``); default: its
        dynamic threshold, which rises to 32 MiB. Freed allocations below it stay in the heap.
        The drop-in sets its own (``memascend.heap_mmap_threshold``).

    Returns
    -------
    Estimate

    Raises
    ------
    ConfigError
        Not ZeRO stage 3, or an unknown flavor.
    """
    if mmap_threshold is not None and int(mmap_threshold) <= 0:
        raise ConfigError("mmap_threshold", f"must be positive, got {mmap_threshold}")
    if flavor not in ("stock", "memascend"):
        raise ConfigError("flavor", f"must be 'stock' or 'memascend', got {flavor!r}")
    if ds.stage != 3:
        raise ConfigError("zero_optimization.stage",
                          f"the estimate models ZeRO stage 3 (ZeRO-Infinity), got {ds.stage}")
    stock = flavor == "stock"
    tiers = _StockTiers if stock else _DropInTiers
    # glibc: stock runs with its dynamic mmap threshold (up to 32 MiB); the drop-in fixes it.
    heap_at = ds.heap_mmap_threshold if not stock and ds.heap_mmap_threshold else \
        int(mmap_threshold or sz.GLIBC_MMAP_THRESHOLD_MAX)
    L = _Layout(w, ds, stock, heap_at)
    notes = list(ds.notes)
    e, ge, full, parts = L.e, L.ge, L.full, L.parts
    comps: list[Component] = []

    runtime = w.runtime_bytes if w.runtime_bytes is not None else \
        sz.runtime_bytes(transformers=True, deepspeed=True)
    comps.append(Component("runtime", "Python + torch + transformers + DeepSpeed", runtime,
                           "resident", note="measured constant" if w.runtime_bytes is None
                           else "given"))
    comps.append(Component("training_runtime", "model skeleton, kernels, autograd",
                           sz.TRAINING_RUNTIME_BYTES, "resident", note="measured constant"))
    comps.append(Component("deepspeed_engine", "DeepSpeed engine, cpu_adam, aio handles",
                           sz.DEEPSPEED_ENGINE_BYTES, "resident", note="measured constant"))

    if w.host_activations:
        # zero.Init on the CPU builds each parameter in fp32, casts it to the model dtype and
        # partitions it, one module at a time (on a GPU run this happens in GPU memory).
        heap = sz.heap_bytes([n * 4 for n in full], heap_at)
        big = max((n for n in full if n * 4 >= heap_at), default=0)
        comps.append(Component("init_materialize", "parameters built whole at zero.Init",
                               big * (4 + e), "transient", "init",
                               note=f"the largest above the mmap threshold, fp32 + {e} B"))
        if heap:
            comps.append(Component("init_materialize_heap", "parameters built whole at "
                                   "zero.Init, kept in glibc's heap", heap, "resident",
                                   note=f"fp32 size of those below the {heap_at:,} B mmap "
                                        "threshold (an upper bound: 35-80 % measured)"))

    if ds.params_on_nvme:  # the parameter tier (ZeRO-Infinity parameter offload to NVMe)
        comps.extend(tiers.params(L, notes))
    if ds.param_device != "none":
        comps.append(Component("fp16_flat_cpu", "fp16 flat CPU parameter buffer (max_in_cpu)",
                               L.flat * e, "resident",
                               note=f"min(partition, max_in_cpu={ds.max_in_cpu:,}) x {e} B"
                               if ds.params_on_nvme else "whole partition (offload to CPU)"))
        if ds.params_on_nvme and L.flat >= L.n_part and L.swapped:
            notes.append("max_in_cpu >= the model: every parameter stays in the CPU flat buffer, "
                         "none is read from NVMe during training (DeepSpeed issue #4221)")

    if ds.optimizer_on_nvme:
        comps.extend(tiers.optimizer(L, notes))
    elif ds.optimizer_device == "cpu":
        comps.append(Component("optimizer_cpu", "fp32 master + Adam moments in CPU memory",
                               3 * L.n_part * 4, "resident", note="optimizer offload to CPU"))

    kept = [n for n, s in zip(L.group_totals, L.grads_streamed) if not s]
    comps.append(Component("gradient_buffer", "flat gradient buffer",
                           sz.ds_gradient_buffer_bytes(sum(kept), ge), "resident",
                           note=f"every partition element x {ge} B ({ds.grad_accum_dtype})"
                           if len(kept) == len(L.groups) else
                           f"sub-groups not streamed only x {ge} B"))
    if any(L.grads_streamed):
        comps.append(Component("grad_pieces", "streamed gradients: a partition and open pieces",
                               sz.ma_grad_pieces_bytes(
                                   max(parts), ge, ds.optimizer_chunk,
                                   sum(-(-n * 4 // ds.optimizer_chunk) for n, s in
                                       zip(L.group_totals, L.grads_streamed) if s)),
                               "locked",
                               note=f"largest partition x {ge} B + "
                                    f"{2 * sz.GRAD_PIECES_OPEN} pieces (open, in flight); pinned "
                                    "leases, kept for reuse after backward"))
    # The contiguous-gradients bucket and reduce_scatter_coalesced's flat copy of it are on
    # the compute device: host memory only when the model computes on the CPU.
    host = w.host_activations
    comps.append(Component("ipg_bucket", "contiguous-gradients bucket (written part)",
                           sz.ds_ipg_bucket_bytes(sum(full), ds.reduce_bucket_size, e,
                                                  ds.contiguous_gradients) if host else 0,
                           "resident", note=f"min(reduce_bucket_size, model) x {e} B" if host
                           else "on the GPU"))
    if host and (stock or L.ws > 1):
        comps.extend(_freed("reduce_scatter_copy", "reduce-scatter's flat copy of a bucket",
                            [sz.ds_reduce_scatter_copy_bytes(sum(full), ds.reduce_bucket_size,
                                                             e, L.ws)],
                            "backward", f"min(reduce_bucket_size, model) x {e} B", heap_at))
    if ds.optimizer_on_nvme and sz.ds_is_swappable(L.largest_group, 4, ds.aio_block_size):
        comps.extend(_optimizer_transients(L, heap_at))
    if ds.model_dtype == "float16":
        # Before the sub-group loop of the step: its own moment, not added to the Adam moments.
        ovf, how = tiers.overflow(L)
        # an abs() copy in the gradient dtype and a bool result (1 B per element)
        comps.extend(_freed("overflow_check", "fp16 overflow-check temporaries",
                            [ovf * ge // (ge + 1), ovf // (ge + 1)], "overflow_check", how,
                            heap_at))
    pad = sz.ds_padding_bytes(L.swapped, e, L.a) if ds.params_on_nvme else 0
    notes.append(f"DeepSpeed's {L.a}-element alignment pads the swapped parameters by "
                 f"{pad:,} B in all")
    comps.extend(_activations(w, e, max(full), heap_at))
    if not w.host_activations:
        notes.append("activations are in GPU memory (not counted); use --gpus 0 for a CPU run")
    ssd = sz.ds_ssd_traffic(parts, L.groups, L.in_cpu, ds, page_aligned=not stock,
                            recompute=w.checkpointing, micro_batches=w.micro_batches)
    if not stock:  # what memascend's areas hold beyond the state (overwrites in flight)
        staging = sum(c.nbytes for c in comps
                      if c.name in ("param_pool", "optimizer_pool", "grad_pieces"))
        # the largest tensor an area stores whole: a parameter partition, or a sub-group's
        # fp32 state that is not streamed in pieces (streamed pieces: optimizer_chunk)
        largest = max(max(parts, default=0) * L.e, L.largest_whole * 4,
                      ds.optimizer_chunk if any(L.streamed) else 0)
        ssd = dataclasses.replace(ssd, capacity_peak=ssd.capacity +
                                  sz.store_slack_bytes(ssd.capacity, staging, largest))
    title = ("stock DeepSpeed ZeRO-3" if stock else "memascend swappers in DeepSpeed ZeRO-3") + \
        f" ({ds.model_dtype}, params {ds.param_device}, optimizer {ds.optimizer_device})"
    return Estimate("deepspeed" if stock else "memascend-deepspeed", title, tuple(comps),
                    1 if w.host_activations else L.ws, ssd, tuple(notes))


def _optimizer_transients(L: _Layout, heap_at: int) -> list[Component]:
    """Start-up and step transients of an optimizer on NVMe: gradient copies, the fp32
    buffers at initialize, the first step's Adam state."""
    ds, stock = L.ds, L.stock
    out: list[Component] = []
    # Streamed gradients run stage 3's partition_grads one partition at a time, so its fp32
    # copies list holds one partition's copy, freed when that call ends.
    per_partition = not stock and any(L.grads_streamed)
    allocs = [min(ds.reduce_bucket_size, max(L.parts)) * 4] if per_partition else \
        sz.ds_fp32_gradient_copy_allocations(L.full, L.parts, ds.reduce_bucket_size)
    label = f"fp32 gradient copies of one {'partition' if per_partition else 'bucket'}"
    out += _freed("fp32_gradient_copies", label, allocs, "backward",
                  "one per partition, freed after the swap-out", heap_at)
    # The streamed drop-in always builds the master piece by piece (fast_init's path).
    init32 = sz.ds_init_fp32_buffer_allocations(L.group_totals, L.in_cpu,
                                                ds.fast_init or any(L.streamed)) \
        if ds.params_on_nvme else []
    if init32:
        out += _freed("init_fp32_buffers", "unpinned fp32 sub-group buffers at initialize",
                      init32, "init_fp32_partitions",
                      "two of the largest NVMe-resident sub-groups x 4 B", heap_at)
    if ds.fast_init and not stock and ds.params_on_nvme and not any(L.streamed):
        out.append(Component("fast_init_buffers", "fast_init staging leases",
                             ds.param_buffer_count * sz.round_up(L.largest_group * L.e),
                             "transient", "init_fp32_partitions",
                             note="buffer_count x largest sub-group, model dtype"))
    if L.largest_whole:
        out += _freed("init_gradient_buffer", "fp32 gradient buffer at initialize",
                      [L.largest_whole * 4], "init",
                      "initialize_optimizer_states: largest sub-group stepped whole x 4 B",
                      heap_at)
        out += _freed("adam_first_step", "Adam moments created by the first step",
                      [sz.ds_adam_first_step_bytes(L.largest_whole) // 2] * 2, "step",
                      "2 x largest sub-group stepped whole x 4 B", heap_at)
    if any(L.streamed):
        out.append(Component("adam_first_step_piece", "new Adam state, one piece",
                             ds.optimizer_chunk, "transient", "step",
                             note="zero-filled piece on the first step"))
    return out
