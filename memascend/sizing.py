"""Sizing rules: how much host memory and SSD a configuration of SSD-offloaded training needs.

One module of pure functions (no I/O, no torch) shared by the footprint estimator
(``memascend profile estimate``), the plain-PyTorch path (:mod:`memascend.offload`) and the
DeepSpeed drop-in (:mod:`memascend.integrations.deepspeed`), so that what is estimated is
what is allocated. Three families of rules:

- **Stock DeepSpeed 0.19.8 ZeRO-3 / ZeRO-Infinity** (``ds_*``), read from its source
  (``runtime/swap_tensor/``, ``runtime/zero/stage3.py``) and checked by measurement: the
  parameter swap pool, the partitioned reserve, the fp16 flat CPU buffer (``max_in_cpu``), the
  optimizer swap pool, the gradient buffer, the overflow-check temporaries and the I/O
  alignment. Every swap tensor is padded to the element alignment
  ``A = 1024 × intra_op_parallelism / element size`` and only tensors of at least
  ``max(1 MiB, aio.block_size)`` bytes are swapped.
- **memascend as a DeepSpeed drop-in** (:func:`ds_param_budget_bytes`,
  :func:`ds_optimizer_budget_bytes`, ``ma_*``): the same buffer *count* as DeepSpeed's
  config, each buffer exact-size (rounded to 4096) for the largest real tensor instead of
  ``buffer_size`` elements; no partitioned reserve; the chunked overflow check. With the
  streamed step (the ``"memascend"`` block's ``stream_optimizer``, default on) the optimizer
  tier is one budget of pieces (:func:`ma_stream_budget_bytes`) instead of ``buffer_count``
  sub-groups, and with ``stream_grads`` stage 3's flat gradient buffer is replaced by
  gradient pieces (:func:`ma_grad_pieces_bytes` while backward runs). The block is validated
  by the drop-in's own ``Options`` (the one import outside this module).
- **memascend's plain path** (``offload_*``): two swappers whose pinned bytes never exceed
  their budgets (``budget`` default 1 GiB, ``optimizer_budget`` default ``budget``), leases
  rounded to 4096; the parameter tier holds each parameter in the compute dtype, the optimizer
  tier fp32 master, gradient and the two AdamW moments.

Host memory that is not a swap buffer is modelled too, where it can be: the saved
activations of a LLaMA forward pass (:func:`llama_activation_bytes`, counted from the tensors
autograd saves), the temporaries of a streamed AdamW update, and the Python + torch runtime
(measured constants, below). Sizes are bytes; element counts are called ``numel``.

Measured constants (torch 2.13.0+cpu, Python 3.11, transformers 4.x, DeepSpeed 0.19.8, glibc,
x86-64; ``VmRSS`` from ``/proc/self/status``; they vary by a few MiB between versions, so the
estimator takes a ``runtime_bytes`` override, and the accuracy tests measure the runtime in
the same run):

- :data:`TORCH_RUNTIME_BYTES`: RSS after ``import torch`` (218 MiB);
  :data:`MEMASCEND_IMPORT_BYTES`: ``import memascend`` on top (3.5 MiB);
  :data:`TRANSFORMERS_LLAMA_IMPORT_BYTES`: ``import transformers.models.llama.modeling_llama``
  on top (111 MiB); :data:`DEEPSPEED_IMPORT_BYTES`: ``import deepspeed`` plus
  ``init_distributed("gloo")`` on top of those (25 MiB).
- :data:`TRAINING_RUNTIME_BYTES`: what the first forward + backward + optimizer step of a
  74 K-parameter LLaMA adds to the runtime (model skeleton, kernel and autograd start-up, the
  swap engine's rings and threads; 22 MiB): the part of a training process that does not
  grow with the model.
- :data:`DEEPSPEED_ENGINE_BYTES`: what DeepSpeed's engine adds on top of that for the same
  74 K-parameter model under ZeRO-3 NVMe offload, beyond its swap pools (the cpu_adam op,
  aio handles, engine objects; 48 MiB).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Sequence

from .errors import ConfigError
from .extents import round_up as _round_up

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

#: Alignment of a memascend pool lease and of a swap-store extent (O_DIRECT).
PAGE = 4096
#: DeepSpeed swaps a tensor only from this many bytes on (``swap_tensor/utils.MIN_AIO_BYTES``).
DS_MIN_AIO_BYTES = 1 << 20
#: DeepSpeed's per-thread I/O alignment in bytes (``swap_tensor/utils.AIO_ALIGNED_BYTES``).
DS_AIO_ALIGNED_BYTES = 1024
#: Elements the fused overflow check (plain path and drop-in) scans at a time.
OVERFLOW_CHUNK_NUMEL = 1 << 20
#: glibc serves allocations at least this large with their own mmap whatever its dynamic
#: threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit): freed, they leave the process.
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB

TORCH_RUNTIME_BYTES = 218 * MiB
MEMASCEND_IMPORT_BYTES = 3 * MiB + 512 * KiB
TRANSFORMERS_LLAMA_IMPORT_BYTES = 111 * MiB
DEEPSPEED_IMPORT_BYTES = 25 * MiB
TRAINING_RUNTIME_BYTES = 22 * MiB
DEEPSPEED_ENGINE_BYTES = 48 * MiB

#: Bytes per element of the dtype names DeepSpeed configs and torch use.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2,
                               "float16": 2, "fp16": 2, "half": 2}

#: ``offload_model``'s default pinned budget of the parameter tier (the optimizer tier
#: defaults to the same).
OFFLOAD_DEFAULT_BUDGET = 1 * GiB


def round_up(n: int, alignment: int = PAGE) -> int:
    """``n`` rounded up to a multiple of ``alignment``.

    Parameters
    ----------
    n:
        A non-negative integer.
    alignment:
        A positive integer.

    Returns
    -------
    int
    """
    return _round_up(int(n), alignment)


def dtype_bytes(name: str) -> int:
    """Element size of a dtype name (``"bfloat16"``, ``"bf16"``, ``"torch.float32"``, ...).

    Raises
    ------
    ConfigError
        Unknown dtype name.
    """
    key = str(name).replace("torch.", "").lower()
    if key not in DTYPE_BYTES:
        raise ConfigError("dtype", f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


def runtime_bytes(*, transformers: bool = True, deepspeed: bool = False) -> int:
    """Resident bytes of a training process before it builds its model (measured constants).

    Parameters
    ----------
    transformers:
        The process imports ``transformers``' LLaMA modelling code.
    deepspeed:
        The process imports DeepSpeed and initializes its process group.

    Returns
    -------
    int
        :data:`TORCH_RUNTIME_BYTES` + :data:`MEMASCEND_IMPORT_BYTES` and the optional parts.
    """
    return (TORCH_RUNTIME_BYTES + MEMASCEND_IMPORT_BYTES
            + (TRANSFORMERS_LLAMA_IMPORT_BYTES if transformers else 0)
            + (DEEPSPEED_IMPORT_BYTES if deepspeed else 0))


# ---------------------------------------------------------------------------------------------
# DeepSpeed configuration
# ---------------------------------------------------------------------------------------------

def _cfg_int(section: Mapping[str, Any], key: str, default: int, path: str,
             notes: list[str]) -> int:
    value = section.get(key, default)
    if value == "auto":
        notes.append(f"{path}.{key} is 'auto' (set by the HF Trainer); assumed DeepSpeed's "
                     f"default {default:,}")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 \
            or (isinstance(value, float) and not value.is_integer()):
        raise ConfigError(f"{path}.{key}", f"expected a non-negative integer, got {value!r}")
    return int(value)


def _cfg_bool(section: Mapping[str, Any], key: str, default: bool, path: str) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{path}.{key}", f"expected true or false, got {value!r}")
    return value


def _cfg_section(cfg: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    value = cfg.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{path}{key}", f"expected an object, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class DeepSpeedConfig:
    """The parts of a DeepSpeed config that size host memory and SSD, with DeepSpeed 0.19.8's
    defaults (build it with :func:`parse_deepspeed_config`).

    Attributes
    ----------
    model_dtype:
        ``"bfloat16"`` (``bf16.enabled``), ``"float16"`` (``fp16.enabled``) or ``"float32"``.
    grad_accum_dtype:
        ``data_types.grad_accum_dtype``, default the model dtype.
    stage:
        ``zero_optimization.stage`` (default 0).
    param_device, optimizer_device:
        ``offload_param.device`` / ``offload_optimizer.device``: ``"none"``, ``"cpu"`` or
        ``"nvme"`` (default ``"none"``).
    param_buffer_count, param_buffer_size, max_in_cpu, param_pin_memory:
        ``offload_param``: defaults 5, 100,000,000 elements, 1,000,000,000 elements, True.
    optimizer_buffer_count, optimizer_pin_memory, pipeline_read, pipeline_write, fast_init:
        ``offload_optimizer``: defaults 4, True, False, False, False.
    sub_group_size:
        ``zero_optimization.sub_group_size`` (default 1,000,000,000 elements).
    reduce_bucket_size:
        ``zero_optimization.reduce_bucket_size`` (default 500,000,000 elements).
    contiguous_gradients:
        ``zero_optimization.contiguous_gradients`` (default True).
    aio_block_size, aio_queue_depth, aio_intra_op_parallelism, aio_single_submit,
    aio_overlap_events, aio_use_gds:
        ``aio``: defaults 1,048,576, 8, 1, False, True, False. Other ``aio`` keys are ignored,
        as DeepSpeed ignores them (and noted).
    stream_optimizer, stream_grads, optimizer_chunk, optimizer_budget, heap_mmap_threshold:
        The ``"memascend"`` block's settings for the drop-in (defaults True, True, 16 MiB,
        None = 16 pieces, 1 MiB); stock DeepSpeed ignores them.
    notes:
        What parsing assumed (``"auto"`` values, ignored keys).
    """

    model_dtype: str = "float32"
    grad_accum_dtype: str = "float32"
    stage: int = 0
    param_device: str = "none"
    param_buffer_count: int = 5
    param_buffer_size: int = 100_000_000
    max_in_cpu: int = 1_000_000_000
    param_pin_memory: bool = True
    optimizer_device: str = "none"
    optimizer_buffer_count: int = 4
    optimizer_pin_memory: bool = True
    pipeline_read: bool = False
    pipeline_write: bool = False
    fast_init: bool = False
    sub_group_size: int = 1_000_000_000
    reduce_bucket_size: int = 500_000_000
    contiguous_gradients: bool = True
    aio_block_size: int = 1_048_576
    aio_queue_depth: int = 8
    aio_intra_op_parallelism: int = 1
    aio_single_submit: bool = False
    aio_overlap_events: bool = True
    aio_use_gds: bool = False
    stream_optimizer: bool = True
    stream_grads: bool = True
    optimizer_chunk: int = 16 << 20
    optimizer_budget: Optional[int] = None
    heap_mmap_threshold: int = 1 << 20
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def model_bytes(self) -> int:
        """Element size of the model (parameter) dtype."""
        return dtype_bytes(self.model_dtype)

    @property
    def grad_bytes(self) -> int:
        """Element size of the gradient-accumulation dtype."""
        return dtype_bytes(self.grad_accum_dtype)

    @property
    def params_on_nvme(self) -> bool:
        """ZeRO-3 with ``offload_param.device == "nvme"``."""
        return self.stage == 3 and self.param_device == "nvme"

    @property
    def optimizer_on_nvme(self) -> bool:
        """ZeRO-3 with ``offload_optimizer.device == "nvme"``."""
        return self.stage == 3 and self.optimizer_device == "nvme"

    @property
    def swap_threshold_bytes(self) -> int:
        """Smallest tensor DeepSpeed swaps: ``max(1 MiB, aio.block_size)``."""
        return ds_swap_threshold_bytes(self.aio_block_size)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        from dataclasses import asdict

        d = asdict(self)
        d["notes"] = list(self.notes)
        return d


_DTYPE_ALIASES = {"fp32": "float32", "float32": "float32", "float": "float32",
                  "bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16",
                  "float16": "float16", "half": "float16"}
_AIO_KEYS = {"block_size", "queue_depth", "intra_op_parallelism", "single_submit",
             "overlap_events", "use_gds"}


def parse_deepspeed_config(cfg: Mapping[str, Any]) -> DeepSpeedConfig:
    """Read the sizing-relevant parts of a DeepSpeed config dict, with DeepSpeed's defaults.

    Parameters
    ----------
    cfg:
        A DeepSpeed config as a dict (the JSON file's object): ``bf16`` / ``bfloat16`` /
        ``fp16`` (``enabled``), ``data_types.grad_accum_dtype``, ``zero_optimization``
        (``stage``, ``sub_group_size``, ``reduce_bucket_size``, ``contiguous_gradients``,
        ``offload_param``, ``offload_optimizer``) and ``aio``.

    Returns
    -------
    DeepSpeedConfig

    Raises
    ------
    ConfigError
        A value of the wrong type or out of range; the error's key is the config path.
    """
    if not isinstance(cfg, Mapping):
        raise ConfigError("deepspeed config", f"expected a JSON object, got {type(cfg).__name__}")
    notes: list[str] = []
    dtype = "float32"
    for key, name in (("bf16", "bfloat16"), ("bfloat16", "bfloat16"), ("fp16", "float16")):
        sec = _cfg_section(cfg, key, "")
        if sec and _cfg_bool(sec, "enabled", False, key):
            if dtype != "float32" and dtype != name:
                raise ConfigError(key, "both fp16 and bf16 are enabled")
            dtype = name
    grad_dtype = dtype
    dt = _cfg_section(cfg, "data_types", "")
    if dt.get("grad_accum_dtype") is not None:
        raw = str(dt["grad_accum_dtype"]).lower()
        if raw not in _DTYPE_ALIASES:
            raise ConfigError("data_types.grad_accum_dtype", f"unknown dtype {raw!r}")
        grad_dtype = _DTYPE_ALIASES[raw]
    zo = _cfg_section(cfg, "zero_optimization", "")
    stage = _cfg_int(zo, "stage", 0, "zero_optimization", notes)
    if stage not in (0, 1, 2, 3):
        raise ConfigError("zero_optimization.stage", f"must be 0-3, got {stage}")
    op = _cfg_section(zo, "offload_param", "zero_optimization.")
    oo = _cfg_section(zo, "offload_optimizer", "zero_optimization.")
    aio = _cfg_section(cfg, "aio", "")

    def device(sec: Mapping[str, Any], path: str) -> str:
        dev = sec.get("device", "none") or "none"
        if dev not in ("none", "cpu", "nvme"):
            raise ConfigError(f"{path}.device", f"must be none, cpu or nvme, got {dev!r}")
        return str(dev)

    for key in sorted(set(aio) - _AIO_KEYS):
        notes.append(f"aio.{key} is not an aio option DeepSpeed reads; ignored as DeepSpeed "
                     "ignores it")
    out = DeepSpeedConfig(
        model_dtype=dtype, grad_accum_dtype=grad_dtype, stage=stage,
        param_device=device(op, "zero_optimization.offload_param"),
        param_buffer_count=_cfg_int(op, "buffer_count", 5, "zero_optimization.offload_param", notes),
        param_buffer_size=_cfg_int(op, "buffer_size", 100_000_000,
                                   "zero_optimization.offload_param", notes),
        max_in_cpu=_cfg_int(op, "max_in_cpu", 1_000_000_000, "zero_optimization.offload_param",
                            notes),
        param_pin_memory=_cfg_bool(op, "pin_memory", True, "zero_optimization.offload_param"),
        optimizer_device=device(oo, "zero_optimization.offload_optimizer"),
        optimizer_buffer_count=_cfg_int(oo, "buffer_count", 4,
                                        "zero_optimization.offload_optimizer", notes),
        optimizer_pin_memory=_cfg_bool(oo, "pin_memory", True,
                                       "zero_optimization.offload_optimizer"),
        pipeline_read=_cfg_bool(oo, "pipeline_read", False, "zero_optimization.offload_optimizer"),
        pipeline_write=_cfg_bool(oo, "pipeline_write", False,
                                 "zero_optimization.offload_optimizer"),
        fast_init=_cfg_bool(oo, "fast_init", False, "zero_optimization.offload_optimizer"),
        sub_group_size=_cfg_int(zo, "sub_group_size", 1_000_000_000, "zero_optimization", notes),
        reduce_bucket_size=_cfg_int(zo, "reduce_bucket_size", 500_000_000, "zero_optimization",
                                    notes),
        contiguous_gradients=_cfg_bool(zo, "contiguous_gradients", True, "zero_optimization"),
        aio_block_size=_cfg_int(aio, "block_size", 1_048_576, "aio", notes),
        aio_queue_depth=_cfg_int(aio, "queue_depth", 8, "aio", notes),
        aio_intra_op_parallelism=max(1, _cfg_int(aio, "intra_op_parallelism", 1, "aio", notes)),
        aio_single_submit=_cfg_bool(aio, "single_submit", False, "aio"),
        aio_overlap_events=_cfg_bool(aio, "overlap_events", True, "aio"),
        aio_use_gds=_cfg_bool(aio, "use_gds", False, "aio"),
        **_memascend_block(cfg.get("memascend")),
        notes=tuple(notes))
    if out.reduce_bucket_size <= 0:
        raise ConfigError("zero_optimization.reduce_bucket_size", "must be > 0")
    return out


def _memascend_block(block: Any) -> dict[str, Any]:
    """The drop-in's streaming settings from a ``"memascend"`` block (validated as the
    drop-in validates it)."""
    from .integrations.deepspeed.runtime import Options

    o = Options.merged(Options(), block)
    return {"stream_optimizer": o.stream_optimizer, "stream_grads": o.stream_grads,
            "optimizer_chunk": o.optimizer_chunk, "optimizer_budget": o.optimizer_budget,
            "heap_mmap_threshold": o.heap_mmap_threshold}


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


#: glibc's ceiling on its dynamic mmap threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit).
#: Freeing an mmapped chunk raises the threshold to the chunk's size, up to this; from then on
#: every allocation below it comes from the heap, and heap memory freed below the top stays
#: resident.
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB


def heap_bytes(allocations: Sequence[int], mmap_threshold: int) -> int:
    """Of a phase's allocations, the bytes glibc serves from its heap (each below
    ``mmap_threshold``; the rest are mmapped and go back to the system on free). Heap memory a
    phase frees stays resident and later phases, allocating other sizes, do not fit in it, so
    these bytes count as held from that phase on (measured on stock ZeRO-3: the heap grew by
    the first step's Adam moments although backward had freed more than that)."""
    return sum(int(a) for a in allocations if int(a) < int(mmap_threshold))


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


# ---------------------------------------------------------------------------------------------
# memascend's plain path (offload_model)
# ---------------------------------------------------------------------------------------------

def offload_budgets(budget: Optional[int] = None,
                    optimizer_budget: Optional[int] = None) -> tuple[int, int]:
    """The two pinned budgets ``offload_model`` uses: ``budget`` (default 1 GiB) and
    ``optimizer_budget`` (default: ``budget``), as ``OffloadedModel.__init__`` resolves them."""
    b = OFFLOAD_DEFAULT_BUDGET if budget is None else int(budget)
    return b, (int(optimizer_budget) if optimizer_budget else b)


def offload_tier_bytes(numels: Sequence[int], compute_bytes: int,
                       grads: bool = True) -> tuple[int, int]:
    """Bytes each tier of ``offload_model`` stores, as pool leases / store extents (4096-
    rounded per tensor): the parameter tier one compute-dtype copy per parameter (in fp32 it
    is the master weight itself); the optimizer tier AdamW's ``m`` and ``v``, the fp32 master
    when the compute dtype is not fp32, and the accumulated gradient ``g`` when gradients are
    stored (``grads``: see :func:`offload_stores_grads`), fp32 each.

    Returns
    -------
    (param_tier_bytes, optimizer_tier_bytes)
    """
    p = sum(round_up(n * compute_bytes) for n in numels)
    per = 2 + (compute_bytes != 4) + bool(grads)
    o = per * sum(round_up(n * 4) for n in numels)
    return p, o


def offload_stores_grads(micro_batches: int = 1, accumulation_declared: bool = False,
                         clipping: bool = False) -> bool:
    """Whether ``offload_model`` keeps gradients in its optimizer tier at steady state: when
    micro-batches accumulate, when the window length is learned rather than declared
    (``accumulation_steps=None``, the default: a fused window keeps its gradients so that a
    longer one can be undone), or with gradient clipping (to redo a clipped window)."""
    return micro_batches > 1 or not accumulation_declared or clipping


def offload_arena_bytes(numels: Sequence[int], compute_bytes: int,
                        budget: Optional[int] = None,
                        optimizer_budget: Optional[int] = None) -> tuple[int, int]:
    """The pinned arena ``offload_model`` maps (and locks) once per tier: the tier's budget,
    or what the tier can use if less (the parameter copies; up to four fp32 tensors per
    parameter in the optimizer tier), plus the tier's largest tensor as slack against
    fragmentation. The whole arena is reserved at the first lease and kept until close.

    Returns
    -------
    (param_arena, optimizer_arena)
    """
    b, ob = offload_budgets(budget, optimizer_budget)
    numels = list(numels) or [1]
    per_opt = 3 if compute_bytes == 4 else 4  # m, v, g (+ the fp32 master)
    need_p = sum(round_up(n * compute_bytes) for n in numels)
    need_o = sum(per_opt * round_up(n * 4) for n in numels)
    big = max(numels)
    return (min(b, need_p) + round_up(big * compute_bytes),
            min(ob, need_o) + round_up(big * 4))


def offload_pinned_bytes(numels: Sequence[int], compute_bytes: int, budget: Optional[int] = None,
                         optimizer_budget: Optional[int] = None) -> tuple[int, int]:
    """Pinned bytes of each of ``offload_model``'s two tiers: its arena
    (:func:`offload_arena_bytes`), reserved and locked whole from the first lease.

    Returns
    -------
    (param_pinned, optimizer_pinned)
    """
    return offload_arena_bytes(numels, compute_bytes, budget, optimizer_budget)


def offload_queue_bytes(numels: Sequence[int], optimizer_budget: int) -> int:
    """Most gradient bytes backward hands to the optimizer's worker before it waits: the
    largest parameter's fp32 bytes, or a quarter of the optimizer budget up to 64 MiB."""
    return max(max(numels, default=1) * 4, min(int(optimizer_budget) // 4, 64 << 20))


def offload_step_transient_bytes(largest_numel: int) -> int:
    """Unpinned peak of one AdamW update: the single-tensor form computes
    ``exp_avg_sq.sqrt()`` and divides it (two fp32 temporaries of the parameter's size). With
    the step fused into backward this is on the worker thread during backward."""
    return 2 * int(largest_numel) * 4


def backward_transient_allocations(largest_numel: int, compute_bytes: int, tokens: int,
                                   vocab_size: int) -> list[int]:
    """Unpinned transients at the start of backward, on top of the saved activations: the
    gradient of the log-softmax input and output (2 × tokens × vocab fp32) and one weight
    gradient in the compute dtype (the largest) before its hook (or DeepSpeed's bucket) takes
    it."""
    return [int(tokens) * int(vocab_size) * 4] * 2 + [int(largest_numel) * compute_bytes]


def llama_activation_bytes(cfg: Mapping[str, Any], batch: int, seq: int, elem_bytes: int,
                           checkpointing: bool = False) -> int:
    """Bytes autograd saves in a LLaMA forward pass for backward (transformers
    ``LlamaForCausalLM`` with SDPA attention, which on CPU does not keep the S × S matrix).

    Per token and decoder layer: ``5h + 3·q_dim + 2·kv_dim + 4·I`` elements (the RMSNorm
    inputs and outputs, rotated q and k, v, the attention output and its contiguous copy, and
    the four MLP tensors: gate, up, SiLU(gate), their product); per token once: ``3h + V``
    (final norm, log-softmax output). Counted with ``saved_tensors_hooks`` (unique storages)
    for three shapes, within 0.3 %. With per-layer activation checkpointing only each layer's
    input is kept, plus one layer's worth during its recompute.

    Parameters
    ----------
    cfg:
        LLaMA config dict (``hidden_size``, ``intermediate_size``, ``num_hidden_layers``,
        ``num_attention_heads``, optional ``num_key_value_heads``, ``head_dim``,
        ``vocab_size``).
    batch, seq:
        Sequences per micro-batch and tokens per sequence.
    elem_bytes:
        Compute dtype size (4 for fp32). A non-fp32 model also keeps fp32 logits.
    checkpointing:
        Per-layer activation checkpointing.
    """
    h = int(cfg["hidden_size"])
    inter = int(cfg["intermediate_size"])
    layers = int(cfg["num_hidden_layers"])
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    vocab = int(cfg["vocab_size"])
    tokens = int(batch) * int(seq)
    per_layer = 5 * h + 3 * heads * head_dim + 2 * kv * head_dim + 4 * inter
    top = 3 * h + vocab
    if checkpointing:
        elems = layers * h + per_layer + top
    else:
        elems = layers * per_layer + top
    extra_fp32_logits = tokens * vocab * 4 if elem_bytes != 4 else 0
    return tokens * elems * elem_bytes + extra_fp32_logits


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
        ahead (at most 1/16, :func:`store_slack_bytes`).
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


def store_slack_bytes(stored: int, staging: int) -> int:
    """Space memascend's non-durable swap areas may take beyond the ``stored`` bytes: the new
    versions of overwrites in flight (an overwritten extent is reused once its replacement
    is recorded, and what is in flight is at most the ``staging`` pinned bytes that hold it)
    and growing ahead (at most 1/16 of an area, :data:`memascend.store.GROW_AHEAD_DIV`).
    The overwrites in flight are no more than what is stored, too: a small model's areas may
    come to about twice its state, a large one's stay within ~1.1x."""
    flight = min(int(staging), int(stored))
    return flight + (int(stored) + flight) // 16


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
                        optimizer_budget: Optional[int] = None, *,
                        micro_batches: int = 1, grads: Optional[bool] = None) -> SsdTraffic:
    """SSD capacity and steady-state traffic per step of ``offload_model`` (the step fused
    into backward, :mod:`memascend.fused`).

    Capacity: the two tiers' stored bytes (:func:`offload_tier_bytes`). At its peak, in a
    step, the areas also hold the old version of every parameter and of its optimizer state
    that the step has updated (an update is a speculation until ``step()`` commits it, kept
    aside for an exact undo: :mod:`memascend.fused`), so about twice the state without the
    gradients, plus the overwrites in flight and what the areas grew ahead
    (:func:`store_slack_bytes` of the two budgets). Per step:
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
    aside = p + state  # old versions of what the window updated, until step() commits
    return SsdTraffic(capacity=p + o,
                      capacity_peak=p + o + aside + store_slack_bytes(p + o + aside, b + ob),
                      read_per_step=read, written_per_step=written)
