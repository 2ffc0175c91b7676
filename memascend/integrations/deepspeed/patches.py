"""The one table of what the DeepSpeed drop-in changes in DeepSpeed and relies on.

Everything DeepSpeed-internal the drop-in touches is listed here, and nowhere else:

- :data:`PATCHES`: every DeepSpeed name it replaces (module attributes such as the swapper
  classes and ``deepspeed.initialize``; methods of the engine and of stage 3's optimizer,
  name-mangled ones spelled out), each with the memascend factory that builds the
  replacement from DeepSpeed's original (:mod:`.wrappers`, :mod:`.stage3`);
- :data:`RELIED`: the private attributes and methods of DeepSpeed objects it reads, writes or
  calls without replacing them, and the names its modules import from DeepSpeed;
- :data:`COPIED`: the DeepSpeed functions whose bodies memascend carries an adapted copy of
  (or whose call contract it re-implements), with a fingerprint of the upstream source.

:func:`check` verifies all of it against the installed DeepSpeed (version range, every name
present, every fingerprint equal) and returns what differs; :func:`install` applies every
patch or none (a failure part-way puts back what it changed); :func:`uninstall` restores
DeepSpeed's originals. ``tests/test_deepspeed_patches.py`` runs :func:`check` against the
installed DeepSpeed, so an upgrade fails in CI first; the upgrade procedure is in
``docs/deepspeed-upgrade.md``.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, Callable

SUPPORTED = ("0.19.8", "0.20")  # DeepSpeed versions >= the first, < the second
TESTED = "0.19.8"

S3 = "deepspeed.runtime.zero.stage3:DeepSpeedZeroOptimizer_Stage3"
ENGINE = "deepspeed.runtime.engine:DeepSpeedEngine"
PPS = "deepspeed.runtime.swap_tensor.partitioned_param_swapper:AsyncPartitionedParameterSwapper"
OPT_UTILS = "deepspeed.runtime.swap_tensor.optimizer_utils"
PIPE = "deepspeed.runtime.swap_tensor.pipelined_optimizer_swapper"
PART = "deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper"
PP = "deepspeed.runtime.zero.partition_parameters"


@dataclass(frozen=True)
class Patch:
    """``owner.name`` (owner: ``module`` or ``module:Class``) is replaced by
    ``factory(original)``; ``factory`` is ``.module:function`` in this package."""

    owner: str
    name: str
    factory: str


_S3_HOOKS = {  # stage 3 optimizer method -> its wrapper factory in .stage3
    "initialize_optimizer_states": "_initialize_optimizer_states",
    "_prepare_sub_group": "_prepare_sub_group",
    "unscale_and_clip_grads": "_unscale_and_clip_grads",
    "_optimizer_step": "_optimizer_step",
    "_reassign_or_swap_out_partitioned_parameters": "_reassign",
    "_release_sub_group": "_release_sub_group",
    "_setup_for_real_optimizer": "_setup_for_real_optimizer",
    "partition_grads": "_partition_grads",
    "independent_gradient_partition_epilogue": "_epilogue",
    "_pre_step": "_pre_step",
    "finalize_gradient_accumulation_boundary": "_finalize_boundary",
    "_constant_buffered_norm2": "_norm2",
    "_DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads": "_avg_scatter",
}

PATCHES: tuple[Patch, ...] = (
    Patch(PP, "AsyncPartitionedParameterSwapper", ".wrappers:param_swapper"),
    Patch("deepspeed.runtime.zero.stage3", "PartitionedOptimizerSwapper",
          ".wrappers:partitioned_optimizer_swapper"),
    Patch("deepspeed.runtime.zero.stage3", "PipelinedOptimizerSwapper",
          ".wrappers:pipelined_optimizer_swapper"),
    Patch("deepspeed", "initialize", ".wrappers:wrap_initialize"),
    Patch(ENGINE, "save_checkpoint", ".wrappers:wrap_save"),
    Patch(ENGINE, "load_checkpoint", ".wrappers:wrap_load"),
    Patch(S3, "has_overflow", ".wrappers:overflow_check"),
    *(Patch(S3, name, f".stage3:{factory}") for name, factory in _S3_HOOKS.items()),
)

# (owner, name): a class attribute or method (``hasattr``), a module attribute, or, for
# instance attributes (set in methods), ``self.<name>`` in the class's source.
RELIED: tuple[tuple[str, str], ...] = (
    *((S3, a) for a in (
        "__param_id_to_grad_partition", "grad_partitions_flat_buffer", "ipg_buckets",
        "reduce_bucket_size", "contiguous_gradients", "fp32_partitioned_groups_flat",
        "fp16_groups", "fp16_partitioned_groups", "fp16_partitioned_groups_flat",
        "fp16_partitioned_groups_flat_numel", "next_swappable_fp32_partitioned_groups",
        "sub_group_to_group_id", "subgroup_to_device", "optimizer_swapper",
        "offload_optimizer_pin_memory", "offload_optimizer_fast_init",
        "params_in_nvme_and_cpu", "grad_position", "micro_step_id", "dtype",
        "gradient_accumulation_dtype", "device", "postscale_gradients",
        "gradient_predivide_factor", "dp_process_group", "clip_grad", "loss_scale",
        "_swappable_optimizer_subgroup", "_unflatten_partitioned_parameters",
        "_create_fp32_partitions", "_create_next_swappable_fp32_groups",
        "_get_param_partition_group", "_assert_same_partition_group",
        "_gradient_averaging_world_size", "_get_param_partition_rank", "get_param_id",
        "_model_parallel_all_reduce", "step", "reset_swap_buffers")),
    ("deepspeed.runtime.zero.stage3:IPGBucketZ3", "buffer"),
    *((ENGINE, a) for a in ("global_steps", "local_rank", "global_rank",
                            "use_node_local_storage", "zero_nvme_offload_optimizer")),
    ("deepspeed.checkpoint.ds_to_universal", "dp_index_to_str"),
    *((ENGINE, a) for a in ("_get_zero_ckpt_name",)),
    *((S3, a) for a in ("_set_fp32_optimizer_param_groups", "_clear_fp32_optimizer_param_groups",
                        "optimizer", "loss_scaler", "dynamic_loss_scale", "overflow")),
    *(("deepspeed.checkpoint.constants", n) for n in ("FP32_FLAT_GROUPS", "LOSS_SCALER",
                                                       "OPTIMIZER_STATE_DICT")),
    ("deepspeed.runtime.config:DeepSpeedConfig", "_param_dict"),
    ("deepspeed.runtime.config:DeepSpeedConfig", "aio_config"),
    *((PPS, a) for a in (
        "param_id_to_numel", "param_id_to_buffer_id", "param_id_to_swap_buffer",
        "available_params", "available_numel", "invalid_buffer", "partitioned_swap_buffer",
        "_io_aligned_numel", "_get_swap_paths", "_update_inflight_swap_in",
        "synchronize_reads", "synchronize_writes", "_swap_out", "swap_out_and_release",
        "get_path", "swappable_tensor")),
    *((f"{OPT_UTILS}:OptimizerSwapper", a) for a in (
        "swap_folder", "numel_alignment", "largest_numel", "timers", "print_exclude_list",
        "swap_params_info")),
    ("deepspeed.ops.adam.cpu_adam:DeepSpeedCPUAdam", "ds_opt_adam"),
    ("deepspeed.ops.adam.cpu_adam:DeepSpeedCPUAdam", "opt_id"),
    ("deepspeed.ops.adam.cpu_adam:DeepSpeedCPUAdam", "fp32_optimizer_states"),
    # names memascend's modules import from DeepSpeed
    ("deepspeed", "comm"),
    ("deepspeed.accelerator", "get_accelerator"),
    ("deepspeed.utils", "logger"),
    ("deepspeed.runtime.zero.utils", "get_norm_dtype"),
    ("deepspeed.runtime.swap_tensor.async_swapper", "AsyncTensorSwapper"),
    (OPT_UTILS, "OptimizerSwapper"),
    (PART, "PartitionedOptimizerSwapper"),
    *((PIPE, n) for n in ("ASYNC_SWAP_IN", "ASYNC_SWAP_OUT", "SYNC_SWAP_IN", "SYNC_SWAP_OUT",
                          "PipelinedOptimizerSwapper")),
    ("deepspeed.runtime.swap_tensor.partitioned_param_swapper", "PartitionedParamStatus"),
    ("deepspeed.runtime.swap_tensor.utils", "AIO_ALIGNED_BYTES"),
    ("deepspeed.runtime.swap_tensor.utils", "MIN_AIO_BYTES"),
    (PP, "PartitionedParamStatus"),
    ("deepspeed.ops.adam", "DeepSpeedCPUAdam"),
)

# upstream function -> fingerprint of its source (see _fingerprint): memascend carries an
# adapted copy of its body, or re-implements the contract it relies on (``where``).
COPIED: dict[str, tuple[str, str]] = {
    f"{S3}._setup_for_real_optimizer": ("0230b3e769765e67", "stage3.py, grads.py setup"),
    f"{S3}._DeepSpeedZeroOptimizer_Stage3__avg_scatter_grads": ("039f10e607c5ad2c",
                                                               "stage3.py _avg_scatter"),
    f"{S3}.initialize_optimizer_states": ("7c4649dc4a9bfc60", "stage3.py"),
    f"{S3}._constant_buffered_norm2": ("0e40fbdf9b3d5ffd", "grads.py GradPieces.norm2"),
    f"{S3}.has_overflow": ("4778da6df5e7534e", "overflow.py"),
    f"{S3}.unscale_and_clip_grads": ("0fe1c92e67ff4e17", "stream.py combined_inv_scale"),
    f"{S3}._partitioned_params_swap_out": ("c5c303eef9fec897", "stream.py parts_of"),
    f"{S3}._reassign_or_swap_out_partitioned_parameters": ("082dcb44891af112",
                                                          "stream.py ParamWriter"),
    f"{S3}.partition_grads": ("ef0ab1c41f74894c", "grads.py"),
    f"{S3}._offload_grad_partition_at_boundary": ("9eea82cddee25fcf", "stream.py grad_reader"),
    f"{S3}._get_sub_group_partitions": ("aca7e99c8045f694", "stream.py"),
    f"{S3}._configure_tensor_swapping": ("75cdf5844dab6e8b", "wrappers.py swapper factories"),
    f"{ENGINE}.save_checkpoint": ("8d086fd60fc41e4f", "wrappers.py _offload_ckpt_dir"),
    f"{ENGINE}.load_checkpoint": ("0479aef5c18093a2", "wrappers.py wrap_load"),
    f"{ENGINE}._load_checkpoint": ("9227b26835477dbd", "marker.py (its name and locals)"),
    f"{ENGINE}._save_zero_checkpoint": ("6b1f17108edb9868", "resume.py (the ZeRO file)"),
    f"{S3}._rigid_load_state_dict": ("2b97ce59ae021ead", "resume.py"),
    "deepspeed.ops.adam.cpu_adam:DeepSpeedCPUAdam.step": ("5087412e98e777fd",
                                                          "stream.py _adam_update"),
    f"{OPT_UTILS}:OptimizerSwapper._initialize_from_swapped_fp16_params": (
        "02e430586b371cec", "stream.py"),
    f"{OPT_UTILS}:OptimizerSwapper.is_swappable_tensor": ("07fbb722f631ae26", "stream.py"),
    f"{PART}:PartitionedOptimizerSwapper.__init__": ("7e1251e17f425ae6", "optim.py"),
    f"{PIPE}:PipelinedOptimizerSwapper.__init__": ("438fe46d3530d8ac", "optim.py"),
    f"{PPS}.__init__": ("c8c92a6c9a0e0648", "params.py"),
    f"{PPS}._configure_aio": ("85ae7cf67cce254d", "params.py"),
    f"{PPS}.available_swap_in_buffers": ("ef5283a278d989d6", "params.py"),
    f"{PPS}._track_numel": ("acb9400c89d084eb", "params.py"),
    f"{PPS}._allocate_and_return_buffers_for_swap_in": ("e31cf4a06009ebc1", "params.py"),
    f"{PPS}.get_buffer": ("585c95a88d483215", "params.py"),
    f"{PPS}.swap_in": ("5ed745110f532413", "params.py"),
    f"{PPS}.swap_into_buffer": ("1512b01f8bc162eb", "params.py"),
    f"{PPS}.remove_partition_and_release_buffers": ("7f9396bb28d17af5", "params.py"),
    f"{PPS}.reserve_available_buffers": ("57c54b816f0d297f", "params.py"),
    f"{PPS}.release_reserved_buffers": ("4518e2a02021d544", "params.py"),
    f"{PPS}.reserve_partitioned_swap_space": ("eeed6697ea7731e5", "params.py"),
    f"{PPS}.swap_out_partitioned_params": ("c5f55a4b47a6a842", "params.py"),
}

_INSTALLED: list[tuple[Any, str, Any, Any]] = []  # (owner object, name, original, replacement)


def _owner(path: str) -> Any:
    """``module`` or ``module:Class`` -> the object."""
    module, _, cls = path.partition(":")
    obj = importlib.import_module(module)
    for part in filter(None, cls.split(".")):
        obj = getattr(obj, part)
    return obj


def _unwrap(func: Any, name: str) -> Any:
    """The function whose source is DeepSpeed's method: through ``__wrapped__`` and through
    decorators that keep it in their closure without it (DeepSpeed's ``instrument_w_nvtx``)."""
    func = inspect.unwrap(func)
    for cell in getattr(func, "__closure__", None) or ():
        inner = cell.cell_contents
        if callable(inner) and inner is not func and \
                name.endswith(str(getattr(inner, "__name__", "\0"))):
            return _unwrap(inner, name)
    return func


def _fingerprint(func: Any, name: str) -> str:
    src = textwrap.dedent(inspect.getsource(_unwrap(func, name)))
    src = "\n".join(line.rstrip() for line in src.splitlines())
    return hashlib.sha256(src.encode()).hexdigest()[:16]


def _original(owner: Any, name: str) -> Any:
    """``owner.name`` as DeepSpeed defines it (also while patched)."""
    for obj, n, original, _replacement in _INSTALLED:
        if obj is owner and n == name:
            return original
    return getattr(owner, name)


def fingerprint(qualified: str) -> str:
    """The fingerprint of an upstream function named ``module:Class.method`` as installed."""
    owner, _, name = qualified.rpartition(".")
    return _fingerprint(_original(_owner(owner), name), name)


def _has(obj: Any, name: str) -> bool:
    if hasattr(obj, name):
        return True
    if inspect.isclass(obj):
        if name.startswith("__") and hasattr(obj, f"_{obj.__name__}{name}"):
            return True
        try:
            src = inspect.getsource(obj)
        except (OSError, TypeError):
            return False
        return f"self.{name} " in src or f"self.{name}=" in src or f"self.{name}[" in src \
            or f"self.{name}." in src or f"self.{name}\n" in src or f"self.{name})" in src
    return False


def _version_tuple(v: str) -> tuple[int, ...]:
    out = []
    for part in v.split("+")[0].split("."):
        digits = "".join(ch for ch in part if ch.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


def check() -> list[str]:
    """What about the installed DeepSpeed differs from what the drop-in was written against:
    an unsupported version, a missing name, a changed upstream body (empty: all is as
    expected). Imports DeepSpeed."""
    import deepspeed

    problems = []
    v = _version_tuple(deepspeed.__version__)
    if not _version_tuple(SUPPORTED[0]) <= v < _version_tuple(SUPPORTED[1]):
        problems.append(f"DeepSpeed {deepspeed.__version__} is outside the supported range "
                        f">={SUPPORTED[0]},<{SUPPORTED[1]}")
    for p in PATCHES:
        try:
            owner = _owner(p.owner)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{p.owner} is missing ({exc})")
            continue
        if not hasattr(owner, p.name):
            problems.append(f"{p.owner}.{p.name}, which memascend replaces, is missing")
    for owner_path, name in RELIED:
        try:
            owner = _owner(owner_path)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{owner_path} is missing ({exc})")
            continue
        if not _has(owner, name):
            problems.append(f"{owner_path}.{name}, which memascend relies on, is missing")
    for qualified, (want, where) in COPIED.items():
        try:
            got = fingerprint(qualified)
        except (ImportError, AttributeError, OSError, TypeError) as exc:
            problems.append(f"{qualified} (copied in memascend's {where}) is missing ({exc})")
            continue
        if got != want:
            problems.append(f"{qualified} changed upstream (fingerprint {got}, memascend's "
                            f"{where} was written against {want})")
    return problems


def _factory(spec: str) -> Callable[[Any], Any]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module, __package__), name)


def installed() -> bool:
    """Whether :func:`install` is in effect."""
    return bool(_INSTALLED)


def install() -> None:
    """Apply every patch of :data:`PATCHES`, or none: the replacements are all built first,
    and a failure while setting them puts back what was set before it is raised.
    Idempotent."""
    if _INSTALLED:
        return
    planned = []
    for p in PATCHES:
        owner = _owner(p.owner)
        original = getattr(owner, p.name)
        planned.append((owner, p.name, original, _factory(p.factory)(original)))
    try:
        for owner, name, original, replacement in planned:
            setattr(owner, name, replacement)
            _INSTALLED.append((owner, name, original, replacement))
    except BaseException:
        uninstall()
        raise


def uninstall() -> list[str]:
    """Put DeepSpeed's originals back, in reverse order. A name that was replaced again by
    someone else since is left as it is; the list of such names is returned."""
    others = []
    while _INSTALLED:
        owner, name, original, replacement = _INSTALLED.pop()
        if getattr(owner, name, None) is replacement:
            setattr(owner, name, original)
        else:
            others.append(f"{getattr(owner, '__name__', owner)}.{name}")
    return others
