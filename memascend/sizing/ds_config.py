"""A DeepSpeed config as the sizing rules read it: :func:`parse_deepspeed_config` (see
:mod:`memascend.sizing`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from ..errors import ConfigError
from .common import dtype_bytes
from .deepspeed import ds_swap_threshold_bytes


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
    from ..dropin_options import Options

    o = Options.merged(Options(), block)
    return {"stream_optimizer": o.stream_optimizer, "stream_grads": o.stream_grads,
            "optimizer_chunk": o.optimizer_chunk, "optimizer_budget": o.optimizer_budget,
            "heap_mmap_threshold": o.heap_mmap_threshold}
