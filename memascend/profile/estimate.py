"""The footprint model: peak host memory, locked memory and SSD traffic of a configuration.

Builds on the rules in :mod:`memascend.sizing` and puts them together per system:

- ``deepspeed``: stock DeepSpeed 0.19.8 ZeRO-3 / ZeRO-Infinity with the given config;
- ``memascend-deepspeed``: the same config with memascend's drop-in swappers (exact-size
  parameter and optimizer budgets, no partitioned reserve, chunked overflow check);
- ``memascend``: memascend's plain-PyTorch path (``offload_model``) with its two budgets.

Each :class:`Estimate` lists its components (bytes, and whether they are *locked* — pinned
swap buffers —, *resident* — other memory held from start-up on —, *transient* — alive only
in one phase —, or *virtual* — address space never touched, not RSS), the phase in which the
peak falls and that peak. Peak = the persistent components + the largest phase's transients:
start-up (``init``), forward/backward (``backward``), the optimizer step (``step``) and, with
fp16, the overflow check before it (``overflow_check``).
Activations count toward host memory only when the model computes on the CPU (``gpus=0``).
Everything here is arithmetic on shapes; reading files is the caller's business.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .. import sizing as sz
from ..errors import ConfigError
from ..shapes import llama_parameter_shapes

KINDS = ("locked", "resident", "transient", "virtual")


@dataclass(frozen=True)
class Component:
    """One part of a footprint.

    Attributes
    ----------
    name:
        Stable identifier (``"param_pool"``, ``"optimizer_pool"``, ...).
    label:
        What it is, for people.
    nbytes:
        Its size in bytes.
    kind:
        ``"locked"``, ``"resident"``, ``"transient"`` or ``"virtual"`` (see module docstring).
    phase:
        For transients, the moment they belong to (``"init"``, ``"backward"``, ``"step"``,
        or ``"overflow_check"`` — the fp16 check at the start of a step, not at the same time
        as the step's other transients); ``""`` otherwise.
    note:
        Where the number comes from.
    """

    name: str
    label: str
    nbytes: int
    kind: str
    phase: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The component as a dict."""
        return {"name": self.name, "label": self.label, "bytes": self.nbytes, "kind": self.kind,
                "phase": self.phase, "note": self.note}


@dataclass(frozen=True)
class Estimate:
    """A footprint estimate for one system (per process / rank, and per node).

    Attributes
    ----------
    system:
        ``"deepspeed"``, ``"memascend-deepspeed"`` or ``"memascend"``.
    title:
        A one-line description.
    components:
        The parts (:class:`Component`).
    ranks:
        Training processes on this machine (one per GPU; 1 on a CPU-only run).
    ssd:
        Capacity and traffic per step, per rank.
    notes:
        Assumptions and warnings about the configuration itself.
    """

    system: str
    title: str
    components: tuple[Component, ...]
    ranks: int
    ssd: sz.SsdTraffic
    notes: tuple[str, ...] = ()

    def _sum(self, kinds: Sequence[str]) -> int:
        return sum(c.nbytes for c in self.components if c.kind in kinds)

    @property
    def persistent_bytes(self) -> int:
        """Locked plus resident bytes (held from start-up on)."""
        return self._sum(("locked", "resident"))

    @property
    def locked_bytes(self) -> int:
        """Pinned (mlock'ed) bytes per rank."""
        return self._sum(("locked",))

    def phase_bytes(self) -> dict[str, int]:
        """Transient bytes of each phase."""
        out = {"init": 0, "backward": 0, "step": 0}  # overflow_check too, when fp16
        for c in self.components:
            if c.kind == "transient":
                out[c.phase] = out.get(c.phase, 0) + c.nbytes
        return out

    @property
    def peak_phase(self) -> str:
        """The phase whose transients are largest (where the peak falls)."""
        phases = self.phase_bytes()
        return max(phases, key=lambda k: (phases[k], k == "step"))

    @property
    def peak_bytes(self) -> int:
        """Peak RSS of one rank: persistent bytes + the largest phase's transients."""
        return self.persistent_bytes + max(self.phase_bytes().values())

    @property
    def node_peak_bytes(self) -> int:
        """Peak RSS of the machine: ``ranks × peak_bytes`` (each rank has its own pools)."""
        return self.ranks * self.peak_bytes

    @property
    def virtual_bytes(self) -> int:
        """Address space reserved but never touched (not in RSS)."""
        return self._sum(("virtual",))

    def component(self, name: str) -> Optional[Component]:
        """The component called ``name``, or None."""
        return next((c for c in self.components if c.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        """The estimate as a JSON-ready dict."""
        return {"system": self.system, "title": self.title, "ranks": self.ranks,
                "peak_bytes": self.peak_bytes, "node_peak_bytes": self.node_peak_bytes,
                "peak_phase": self.peak_phase, "locked_bytes": self.locked_bytes,
                "node_locked_bytes": self.ranks * self.locked_bytes,
                "persistent_bytes": self.persistent_bytes, "virtual_bytes": self.virtual_bytes,
                "phase_transient_bytes": self.phase_bytes(),
                "components": [c.to_dict() for c in self.components],
                "ssd": self.ssd.to_dict(),
                "node_ssd": {k: v * self.ranks for k, v in self.ssd.to_dict().items()},
                "notes": list(self.notes)}


@dataclass(frozen=True)
class Workload:
    """What is trained and how (shared by every system's estimate).

    Attributes
    ----------
    model:
        LLaMA-style config dict (``configs/models/*.json`` or a HF ``config.json``).
    batch, seq:
        Micro-batch size and sequence length.
    gpus:
        Training processes with one GPU each; 0 means a CPU-only run (one process, the CPU
        accelerator), where activations are in host memory.
    micro_batches:
        Gradient accumulation steps per optimizer step.
    checkpointing:
        Per-layer activation checkpointing.
    runtime_bytes:
        Override of the measured Python + torch (+ transformers, DeepSpeed) runtime.
    """

    model: Mapping[str, Any]
    batch: int = 1
    seq: int = 512
    gpus: int = 1
    micro_batches: int = 1
    checkpointing: bool = False
    runtime_bytes: Optional[int] = None

    def __post_init__(self) -> None:
        for key in ("batch", "seq", "micro_batches"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(key, f"must be positive, got {getattr(self, key)}")
        if int(self.gpus) < 0:
            raise ConfigError("gpus", f"must be >= 0, got {self.gpus}")

    @property
    def world_size(self) -> int:
        """Data-parallel ranks (1 for a CPU-only run)."""
        return max(1, int(self.gpus))

    @property
    def host_activations(self) -> bool:
        """Whether activations live in host memory (CPU-only compute)."""
        return int(self.gpus) == 0

    @property
    def tokens(self) -> int:
        """Tokens per micro-batch."""
        return int(self.batch) * int(self.seq)


def _model_numels(model: Mapping[str, Any]) -> list[int]:
    return [math.prod(shape) for _name, shape in llama_parameter_shapes(dict(model))]


def _freed(name: str, label: str, allocations: Sequence[int], phase: str, note: str,
           heap_threshold: Optional[int]) -> list[Component]:
    """A transient made of ``allocations``. With a glibc heap model (``heap_threshold``, the
    mmap threshold in force), the allocations below the threshold stay in the heap once freed
    and count as resident (``name_heap``); the rest is mmapped and returned on free: a
    transient of ``phase`` (``name``, left out when all of it is in the heap). Without one,
    all of it is a transient."""
    total = sum(int(a) for a in allocations)
    heap = sz.heap_bytes(allocations, heap_threshold) if heap_threshold else 0
    out = []
    if total - heap or not heap:
        out.append(Component(name, label, total - heap, "transient", phase, note))
    if heap:
        out.append(Component(f"{name}_heap", f"{label}, kept in glibc's heap", heap, "resident",
                             note=f"{note}; freed below the {heap_threshold:,} B mmap threshold"))
    return out


def _activations(w: Workload, elem_bytes: int, largest: int,
                 heap_threshold: Optional[int] = None) -> list[Component]:
    """Host-memory activation components of the backward phase (CPU compute only). The saved
    activations are per-layer tensors of at most ``tokens × max(hidden, intermediate)``
    elements and the logits (``tokens × vocab``, also in fp32 when the model is not)."""
    if not w.host_activations:
        return []
    acts = sz.llama_activation_bytes(w.model, w.batch, w.seq, elem_bytes, w.checkpointing)
    vocab = int(w.model["vocab_size"])
    logits = [w.tokens * vocab * elem_bytes] + ([w.tokens * vocab * 4] if elem_bytes != 4 else [])
    piece = w.tokens * max(int(w.model["hidden_size"]), int(w.model["intermediate_size"])) * \
        elem_bytes
    rest = max(0, acts - sum(logits))
    layer = [piece] * (rest // piece) + ([rest % piece] if rest % piece else [])
    return [
        *_freed("activations", "activations saved for backward", logits + layer, "backward",
                f"LLaMA, {w.batch}x{w.seq} tokens" + (", checkpointed" if w.checkpointing
                                                      else ""), heap_threshold),
        *_freed("backward_temporaries", "logits gradients + one weight gradient",
                sz.backward_transient_allocations(largest, elem_bytes, w.tokens, vocab),
                "backward", "2 x tokens x vocab x 4 B + largest parameter", heap_threshold),
    ]


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
    notes = list(ds.notes)
    ws = w.world_size
    e, ge = ds.model_bytes, ds.grad_bytes
    a = sz.ds_numel_alignment(e, ds.aio_intra_op_parallelism)
    a32 = sz.ds_numel_alignment(4, ds.aio_intra_op_parallelism)
    full = _model_numels(w.model)
    parts = [sz.ds_partition_numel(n, ws) for n in full]
    n_part = sum(parts)
    groups = sz.ds_sub_groups(parts, ds.sub_group_size)
    group_totals = [sum(g) for g in groups]
    largest_group = max(group_totals)
    flat = sz.ds_fp16_flat_cpu_numel(n_part, ds.max_in_cpu, ds.params_on_nvme) \
        if ds.param_device != "none" else 0
    in_cpu = sz.ds_subgroups_in_cpu(group_totals, flat, ds.params_on_nvme)
    full_groups, i = [], 0
    for g in groups:
        full_groups.append(full[i:i + len(g)])
        i += len(g)
    swapped = [p for p in parts if sz.ds_is_swappable(p, e, ds.aio_block_size)]
    # Partitions read from NVMe in training: those of the sub-groups outside the flat buffer.
    fetched = [p for g, cpu in zip(groups, in_cpu) if not cpu for p in g
               if sz.ds_is_swappable(p, e, ds.aio_block_size)] if flat < n_part else []
    # glibc: stock runs with its dynamic mmap threshold (up to 32 MiB); the drop-in fixes it.
    heap_at = ds.heap_mmap_threshold if not stock and ds.heap_mmap_threshold else \
        int(mmap_threshold or sz.GLIBC_MMAP_THRESHOLD_MAX)
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

    # Parameter swap pool (ZeRO-Infinity parameter offload to NVMe).
    if ds.params_on_nvme:
        largest_swapped = max(swapped, default=0)
        if stock:
            if largest_swapped and sz.ds_align(largest_swapped, a) > sz.ds_align(ds.param_buffer_size, a):
                notes.append(f"the largest swapped parameter partition has {largest_swapped:,} "
                             f"elements > offload_param.buffer_size {ds.param_buffer_size:,}: "
                             "DeepSpeed refuses to start (issue #3506)")
            pool = sz.ds_param_pool_bytes(ds.param_buffer_count, ds.param_buffer_size, e, a)
            comps.append(Component("param_pool", "parameter swap pool", pool, "locked",
                                   note=f"{ds.param_buffer_count} x {sz.ds_align(ds.param_buffer_size, a):,} "
                                        f"elements x {e} B"))
            comps.append(Component("param_pool_unpinned_copy",
                                   "unpinned copy of the parameter pool at start-up", pool,
                                   "virtual", note="torch.empty never written: address space, "
                                                   "not RSS"))
        else:
            budget = sz.ds_param_budget_bytes(ds.param_buffer_count,
                                              sz.ds_align(largest_swapped, a) * e)
            pool = min(budget, sz.ma_param_tier_bytes(ds.param_buffer_count,
                                                      [sz.ds_align(p, a) * e for p in fetched]))
            comps.append(Component("param_pool", "parameter tier leases (exact-size)", pool,
                                   "locked", note=f"the {ds.param_buffer_count} largest "
                                                  "partitions read in training, 4096-rounded"
                                   if fetched else "none: no partition is read in training"))
        if stock:
            reserve = sz.ds_partitioned_reserve_bytes(full_groups, group_totals, in_cpu, e, a)
            comps.append(Component("partitioned_reserve", "partitioned swap reserve (write-back)",
                                   reserve, "locked",
                                   note="largest sub-group, full numel" if reserve else
                                   "not allocated: every sub-group is in the flat CPU buffer"))
        else:
            comps.append(Component("partitioned_reserve", "partitioned swap reserve", 0,
                                   "locked", note="none: one exact-size staging lease at a time"))
    if ds.param_device != "none":
        fb = flat * e
        comps.append(Component("fp16_flat_cpu", "fp16 flat CPU parameter buffer (max_in_cpu)", fb,
                               "resident", note=f"min(partition, max_in_cpu={ds.max_in_cpu:,}) x {e} B"
                               if ds.params_on_nvme else "whole partition (offload to CPU)"))
        if ds.params_on_nvme and flat >= n_part and swapped:
            notes.append("max_in_cpu >= the model: every parameter stays in the CPU flat buffer, "
                         "none is read from NVMe during training (DeepSpeed issue #4221)")

    # Optimizer swap pool.
    swappable_opt = ds.optimizer_on_nvme and sz.ds_is_swappable(largest_group, 4, ds.aio_block_size)
    # The drop-in's streamed step (DeepSpeedCPUAdam, fp32 state): swapped sub-groups in pieces.
    streamed = [not stock and ds.optimizer_on_nvme and ds.stream_optimizer and
                sz.ds_is_swappable(n, 4, ds.aio_block_size) for n in group_totals]
    grads_streamed = [s and ds.stream_grads for s in streamed]
    whole = [n for n, s in zip(group_totals, streamed) if not s]  # stepped whole
    largest_whole = max(whole, default=0)
    if any(streamed):
        chunk = ds.optimizer_chunk
        comps.append(Component("optimizer_pool", "streamed optimizer tier budget",
                               sz.ma_stream_budget_bytes(
                                   chunk, ds.optimizer_budget,
                                   max(n for n, s in zip(group_totals, streamed) if s),
                                   sum(n for n, s in zip(group_totals, streamed) if s)),
                               "locked",
                               note=f"pieces of {chunk:,} B per tensor; budget + one gradient "
                                    "piece"))
        if largest_whole:
            notes.append("sub-groups too small to swap are stepped whole in CPU memory")
        if ds.pipeline_read or ds.pipeline_write:
            notes.append("pipeline_read/pipeline_write do not apply to the streamed step")
    elif ds.optimizer_on_nvme:
        if stock:
            opool = sz.ds_optimizer_pool_bytes(ds.optimizer_buffer_count, largest_group, 4, a32)
            note = f"{ds.optimizer_buffer_count} x {sz.ds_align(largest_group, a32):,} elements x 4 B"
        else:
            opool = sz.ds_optimizer_budget_bytes(ds.optimizer_buffer_count, largest_group)
            note = f"{ds.optimizer_buffer_count} x largest sub-group x 4 B, 4096-rounded"
        comps.append(Component("optimizer_pool", "optimizer swap pool" if stock else
                               "optimizer tier budget (exact-size)", opool, "locked", note=note))
        if ds.pipeline_read or ds.pipeline_write:
            notes.append("pipelined optimizer swapping needed buffer_count >= 12 to run in "
                         "DeepSpeed 0.19.8 (\"ran out of swap buffers\" below)")
    elif ds.optimizer_device == "cpu":
        comps.append(Component("optimizer_cpu", "fp32 master + Adam moments in CPU memory",
                               3 * n_part * 4, "resident", note="optimizer offload to CPU"))

    kept = [n for n, s in zip(group_totals, grads_streamed) if not s]
    comps.append(Component("gradient_buffer", "flat gradient buffer",
                           sz.ds_gradient_buffer_bytes(sum(kept), ge), "resident",
                           note=f"every partition element x {ge} B ({ds.grad_accum_dtype})"
                           if len(kept) == len(groups) else
                           f"sub-groups not streamed only x {ge} B"))
    if any(grads_streamed):
        comps.append(Component("grad_pieces", "streamed gradients: a partition and open pieces",
                               sz.ma_grad_pieces_bytes(
                                   max(parts), ge, ds.optimizer_chunk,
                                   sum(-(-n * 4 // ds.optimizer_chunk) for n, s in
                                       zip(group_totals, grads_streamed) if s)),
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
    if host and (stock or ws > 1):
        comps.extend(_freed("reduce_scatter_copy", "reduce-scatter's flat copy of a bucket",
                            [sz.ds_reduce_scatter_copy_bytes(sum(full), ds.reduce_bucket_size,
                                                             e, ws)],
                            "backward", f"min(reduce_bucket_size, model) x {e} B", heap_at))
    if swappable_opt:
        # Streamed gradients run stage 3's partition_grads one partition at a time, so its
        # fp32 copies list holds one partition's copy, freed when that call ends.
        per_partition = not stock and any(grads_streamed)
        allocs = [min(ds.reduce_bucket_size, max(parts)) * 4] if per_partition else \
            sz.ds_fp32_gradient_copy_allocations(full, parts, ds.reduce_bucket_size)
        label = f"fp32 gradient copies of one {'partition' if per_partition else 'bucket'}"
        comps.extend(_freed("fp32_gradient_copies", label, allocs, "backward",
                            "one per partition, freed after the swap-out", heap_at))
        # The streamed drop-in always builds the master piece by piece (fast_init's path).
        init32 = sz.ds_init_fp32_buffer_allocations(group_totals, in_cpu,
                                                    ds.fast_init or any(streamed)) \
            if ds.params_on_nvme else []
        if init32:
            comps.extend(_freed("init_fp32_buffers", "unpinned fp32 sub-group buffers at "
                                "initialize", init32, "init_fp32_partitions",
                                "two of the largest NVMe-resident sub-groups x 4 B", heap_at))
        if ds.fast_init and not stock and ds.params_on_nvme and not any(streamed):
            comps.append(Component("fast_init_buffers", "fast_init staging leases",
                                   ds.param_buffer_count * sz.round_up(largest_group * e),
                                   "transient", "init_fp32_partitions",
                                   note="buffer_count x largest sub-group, model dtype"))
        if largest_whole:
            comps.extend(_freed("init_gradient_buffer", "fp32 gradient buffer at initialize",
                                [largest_whole * 4], "init",
                                "initialize_optimizer_states: largest sub-group stepped whole "
                                "x 4 B", heap_at))
            comps.extend(_freed("adam_first_step", "Adam moments created by the first step",
                                [sz.ds_adam_first_step_bytes(largest_whole) // 2] * 2, "step",
                                "2 x largest sub-group stepped whole x 4 B", heap_at))
        if any(streamed):
            comps.append(Component("adam_first_step_piece", "new Adam state, one piece",
                                   ds.optimizer_chunk, "transient", "step",
                                   note="zero-filled piece on the first step"))
    if ds.model_dtype == "float16":
        # Before the sub-group loop of the step: its own moment, not added to the Adam moments.
        ovf = sz.ds_overflow_check_bytes(n_part, ge, True) if stock else \
            sz.chunked_overflow_check_bytes(ge, True)
        # an abs() copy in the gradient dtype and a bool result (1 B per element)
        comps.extend(_freed("overflow_check", "fp16 overflow-check temporaries",
                            [ovf * ge // (ge + 1), ovf // (ge + 1)], "overflow_check",
                            "isinf/isnan over the whole gradient buffer" if stock
                            else "1 Mi elements at a time", heap_at))
    pad = sz.ds_padding_bytes(swapped, e, a) if ds.params_on_nvme else 0
    notes.append(f"DeepSpeed's {a}-element alignment pads the swapped parameters by "
                 f"{pad:,} B in all")
    comps.extend(_activations(w, e, max(full), heap_at))
    if not w.host_activations:
        notes.append("activations are in GPU memory (not counted); use --gpus 0 for a CPU run")
    ssd = sz.ds_ssd_traffic(parts, groups, in_cpu, ds, page_aligned=not stock,
                            recompute=w.checkpointing, micro_batches=w.micro_batches)
    if not stock:  # what memascend's areas hold beyond the state (overwrites in flight)
        staging = sum(c.nbytes for c in comps
                      if c.name in ("param_pool", "optimizer_pool", "grad_pieces"))
        ssd = dataclasses.replace(ssd, capacity_peak=ssd.capacity +
                                  sz.store_slack_bytes(ssd.capacity, staging))
    title = ("stock DeepSpeed ZeRO-3" if stock else "memascend swappers in DeepSpeed ZeRO-3") + \
        f" ({ds.model_dtype}, params {ds.param_device}, optimizer {ds.optimizer_device})"
    return Estimate("deepspeed" if stock else "memascend-deepspeed", title, tuple(comps),
                    1 if w.host_activations else ws, ssd, tuple(notes))


def estimate_offload(w: Workload, *, compute_dtype: str = "float32",
                     budget: Optional[int] = None, optimizer_budget: Optional[int] = None,
                     meta_init: bool = True) -> Estimate:
    """Footprint of memascend's plain-PyTorch path (``offload_model``) for one process.

    Persistent: the runtime, the training runtime and the two tiers' pinned arenas
    (:func:`memascend.sizing.offload_pinned_bytes`), reserved whole. Transients: at start-up
    the largest parameter materialized in fp32 (with ``meta_init``; otherwise the whole model
    built in RAM first); in backward the activations and gradients (CPU compute), the
    gradients handed to the optimizer's worker and not yet used
    (:func:`memascend.sizing.offload_queue_bytes`) and, the step being fused into backward,
    the AdamW temporaries of the largest parameter. ``offload_model`` fixes glibc's mmap
    threshold at 128 KiB (its ``heap_mmap_threshold``), so freed tensors are not retained.

    Parameters
    ----------
    w:
        The workload (``gpus`` > 1 is not supported: the plain path is one process).
    compute_dtype:
        ``"float32"``, ``"bfloat16"`` or ``"float16"``.
    budget, optimizer_budget:
        The pinned budgets (defaults as ``offload_model``: 1 GiB, and the same).
    meta_init:
        The model is built under :func:`memascend.meta_parameters`.

    Raises
    ------
    ConfigError
        Bad dtype or budget.
    """
    ce = sz.dtype_bytes(compute_dtype)
    numels = _model_numels(w.model)
    largest = max(numels)
    b, ob = sz.offload_budgets(budget, optimizer_budget)
    for key, val in (("budget", b), ("optimizer_budget", ob)):
        if val <= 0:
            raise ConfigError(key, f"must be positive, got {val}")
    pp, po = sz.offload_pinned_bytes(numels, ce, b, ob)
    keep_grads = sz.offload_stores_grads(w.micro_batches)
    tp, to = sz.offload_tier_bytes(numels, ce, grads=keep_grads)
    notes = []
    if sz.round_up(largest * ce) > b:
        notes.append(f"the largest parameter ({sz.round_up(largest * ce):,} B) does not fit the "
                     f"parameter budget {b:,} B: offload_model raises PoolExhaustedError")
    if sz.round_up(largest * 4) > ob:
        notes.append(f"the largest fp32 tensor ({sz.round_up(largest * 4):,} B) does not fit the "
                     f"optimizer budget {ob:,} B: offload_model raises PoolExhaustedError")
    runtime = w.runtime_bytes if w.runtime_bytes is not None else sz.runtime_bytes(transformers=True)
    comps = [
        Component("runtime", "Python + torch + transformers + memascend", runtime, "resident",
                  note="measured constant" if w.runtime_bytes is None else "given"),
        Component("training_runtime", "model skeleton, kernels, autograd, swap engine",
                  sz.TRAINING_RUNTIME_BYTES, "resident", note="measured constant"),
        Component("param_pool", "parameter tier pinned arena", pp, "locked",
                  note=f"min(budget {b:,}, tier) + largest tensor"),
        Component("optimizer_pool", "optimizer tier pinned arena", po, "locked",
                  note=f"min(optimizer_budget {ob:,}, tier) + largest tensor"),
        Component("materialize", "largest parameter materialized at start-up" if meta_init
                  else "whole model built in RAM before offload", (largest if meta_init else
                                                                   sum(numels)) * 4,
                  "transient", "init", note="fp32"),
        Component("step_temporaries", "AdamW temporaries of the largest parameter "
                  "(the step runs in backward)", sz.offload_step_transient_bytes(largest),
                  "transient", "backward", note="2 x largest x 4 B"),
        Component("gradient_queue", "gradients handed to the optimizer's worker, not yet "
                  "used", sz.offload_queue_bytes(numels, ob), "transient", "backward",
                  note="max(largest, optimizer budget / 4 up to 64 MiB)"),
    ]
    fp16 = compute_dtype in ("float16", "fp16", "half")
    if fp16:
        comps.append(Component("overflow_check", "fused overflow check (chunked)",
                               sz.chunked_overflow_check_bytes(ce, True), "transient", "backward",
                               note="1 Mi elements at a time"))
    if w.host_activations:
        comps.extend(_activations(w, ce, largest))
    else:
        notes.append("activations are in GPU memory (not counted); use --gpus 0 for a CPU run")
        comps.append(Component("gradient", "one weight gradient before it is offloaded",
                               largest * ce, "transient", "backward", note="largest parameter"))
    if w.gpus > 1:
        notes.append("offload_model trains in one process; --gpus > 1 is modelled as one rank")
    ssd = sz.offload_ssd_traffic(numels, ce, b, ob, micro_batches=w.micro_batches,
                                 grads=keep_grads)
    return Estimate("memascend", f"memascend offload_model ({compute_dtype}, budgets "
                                 f"{b / sz.MiB:.0f} + {ob / sz.MiB:.0f} MiB)",
                    tuple(comps), 1, ssd, tuple(notes))


def machine_warnings(estimates: Sequence[Estimate], phys_bytes: int,
                     lockable_bytes: Optional[int]) -> list[str]:
    """Warnings when an estimate exceeds this machine's RAM or memlock limit.

    Parameters
    ----------
    estimates:
        The estimates to check.
    phys_bytes:
        Physical memory of the machine.
    lockable_bytes:
        What this user may lock (None: unlimited).
    """
    out = []
    for est in estimates:
        if est.node_peak_bytes > phys_bytes:
            out.append(f"{est.system}: estimated peak {est.node_peak_bytes / sz.GiB:.2f} GiB exceeds "
                       f"this machine's RAM ({phys_bytes / sz.GiB:.2f} GiB)")
        locked = est.ranks * est.locked_bytes
        if lockable_bytes is not None and locked > lockable_bytes:
            consequence = ("DeepSpeed aborts (SIGABRT) when mlock fails"
                           if est.system == "deepspeed" else
                           "memascend goes on with unlocked memory (lock='auto')")
            out.append(f"{est.system}: {locked / sz.MiB:.0f} MiB locked exceeds the memlock limit "
                       f"({lockable_bytes / sz.MiB:.0f} MiB): {consequence}")
    return out


@dataclass(frozen=True)
class EstimateReport:
    """Everything ``memascend profile estimate`` reports."""

    model: Mapping[str, Any]
    parameters: int
    workload: Workload
    estimates: tuple[Estimate, ...]
    warnings: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        w = self.workload
        return {"model": dict(self.model), "parameters": self.parameters,
                "workload": {"batch": w.batch, "seq": w.seq, "gpus": w.gpus,
                             "micro_batches": w.micro_batches, "checkpointing": w.checkpointing},
                "estimates": {e.system: e.to_dict() for e in self.estimates},
                "warnings": list(self.warnings)}
