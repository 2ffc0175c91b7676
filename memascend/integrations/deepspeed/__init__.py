"""memascend as a drop-in for DeepSpeed ZeRO-3 / ZeRO-Infinity's swappers.

One line before ``deepspeed.initialize`` (and before ``zero.Init``)::

    import memascend.integrations.deepspeed as ma_ds
    ma_ds.enable()                      # or enable(param_budget="512MiB", backend="uring")

From then on, DeepSpeed builds memascend's parameter swapper and optimizer swappers wherever
it would build its own, with the rest of the user's config unchanged. The same options can
be given in the DeepSpeed config as a ``"memascend": {...}`` block (keys of
:class:`~.runtime.Options`; an unknown key is a ConfigError; ``"enabled": false`` keeps the
stock swappers). DeepSpeed's ``offload_*``/``aio`` settings are honoured as described in
:mod:`.runtime`.

What changes (see :mod:`.params`, :mod:`.optim`, :mod:`.stream`, :mod:`.aio`,
:mod:`.overflow`): the optimizer steps each swapped sub-group in small pieces under its own
byte budget (no ``buffer_count`` x sub-group buffers, gradients read from stage 3's buffer
instead of swapped, Adam moments and step counts restored exactly from checkpoints); exact-size
pinned leases under a byte budget instead of fixed slots; one swap area per tier and rank
instead of one file per tensor; io_uring with every completion checked instead of libaio with
none (and no JIT-built ``async_io`` op); no "Not enough buffers" failure; no SIGABRT when
mlock is refused; the fp16 overflow check scans in chunks (no full-size temporaries).
Checkpoints made with memascend enabled hold the optimizer's swap area as one exported file
and load only with memascend enabled.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional

from ...errors import ConfigError
from . import state
from .runtime import Options, current_runtime, shutdown

__all__ = ["enable", "disable", "enabled", "stats", "Options", "shutdown"]

_ORIGINALS: dict[str, Any] = {}
_STAGE3_ORIGINALS: dict[str, Any] = {}


def _config_dict(config: Any) -> Optional[dict]:
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)) and os.path.exists(config):
        try:
            with open(config) as f:
                return json.load(f)
        except (OSError, ValueError) as exc:
            raise ConfigError("config", f"cannot read DeepSpeed config {config}: {exc}") from exc
    return None


def _use_memascend(block: Any) -> bool:
    opts = Options.merged(state.options(), block)  # validates the block
    return opts.enabled


def _param_swapper_factory(ds_config: Any, model_dtype: Any) -> Any:
    from deepspeed.runtime.swap_tensor.partitioned_param_swapper import (
        AsyncPartitionedParameterSwapper)

    from .params import MemAscendParamSwapper

    if _use_memascend(ds_config._param_dict.get("memascend")):
        return MemAscendParamSwapper(ds_config, model_dtype)
    return AsyncPartitionedParameterSwapper(ds_config, model_dtype)


def _optimizer_swapper_factory(pipelined: bool):
    def make(*args: Any, **kwargs: Any) -> Any:
        from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import (
            PartitionedOptimizerSwapper)
        from deepspeed.runtime.swap_tensor.pipelined_optimizer_swapper import (
            PipelinedOptimizerSwapper)

        from .optim import MemAscendPartitionedOptimizerSwapper, MemAscendPipelinedOptimizerSwapper
        from .stream import StreamingOptimizerSwapper, can_stream

        opts = state.options()
        if opts.enabled:
            optimizer, dtype = _arg(args, kwargs, 3, "optimizer"), _arg(args, kwargs, 6, "dtype")
            if opts.stream_optimizer and can_stream(optimizer, dtype) is None:
                cls = StreamingOptimizerSwapper
            else:
                cls = MemAscendPipelinedOptimizerSwapper if pipelined else \
                    MemAscendPartitionedOptimizerSwapper
        else:
            cls = PipelinedOptimizerSwapper if pipelined else PartitionedOptimizerSwapper
        return cls(*args, **kwargs)
    return make


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _wrap_initialize(original: Any) -> Any:
    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("config", kwargs.get("config_params"))
        if config is None:
            args_ns = kwargs.get("args", args[0] if args else None)
            config = getattr(args_ns, "deepspeed_config", None)
        block = (_config_dict(config) or {}).get("memascend")
        base = _ORIGINALS["options"]
        merged = Options.merged(base, block)
        merged.apply_heap()
        state.set_options(merged)
        try:
            return original(*args, **kwargs)
        finally:
            state.set_options(base)
            rt = current_runtime()
            if rt is not None:
                rt.trim()  # leases kept from initialisation are not training's working set
    return initialize


def _ours(engine: Any) -> Any:
    from .optim import _StoreBacked

    sw = getattr(getattr(engine, "optimizer", None), "optimizer_swapper", None)
    return sw if isinstance(sw, _StoreBacked) else None


def _wrap_save(original: Any) -> Any:
    @functools.wraps(original)
    def save_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        sw = _ours(self)
        if sw is None:
            return original(self, *args, **kwargs)
        live = sw.swap_folder
        sw.swap_folder = sw.export_for_checkpoint()
        try:
            return original(self, *args, **kwargs)
        finally:
            sw.swap_folder = live
    return save_checkpoint


def _wrap_load(original: Any) -> Any:
    @functools.wraps(original)
    def load_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        sw = _ours(self)
        if sw is None:
            return original(self, *args, **kwargs)
        live = sw.swap_folder
        sw.swap_folder = sw.begin_import()
        try:
            return original(self, *args, **kwargs)
        finally:
            sw.swap_folder = live
            sw.end_import()
    return load_checkpoint


def _overflow_check(original: Any) -> Any:
    @functools.wraps(original)
    def has_overflow(self: Any, partition_gradients: bool = True) -> bool:
        if not state.options().enabled:
            return original(self, partition_gradients)
        from .overflow import has_overflow as fused

        return fused(self, partition_gradients)
    return has_overflow


def enable(**options: Any) -> None:
    """Make DeepSpeed build memascend's swappers from now on (idempotent; call before
    ``deepspeed.initialize`` and before ``zero.Init``).

    Parameters
    ----------
    **options:
        Fields of :class:`~.runtime.Options` (``backend``, ``lock``, ``param_budget``,
        ``checksum``, ``heap_mmap_threshold``, ...); a ``"memascend"`` block in the DeepSpeed
        config overrides them. Unless ``heap_mmap_threshold`` is 0 (here or in the block),
        the first ``zero.Init`` or ``deepspeed.initialize`` after this also fixes glibc's
        mmap threshold for the whole process (:mod:`memascend.heap`), so freed tensors
        leave RSS instead of staying in the heap.

    Raises
    ------
    ConfigError
        An unknown or invalid option.
    ImportError
        DeepSpeed is not installed.
    """
    import deepspeed
    import deepspeed.runtime.engine as ds_engine
    import deepspeed.runtime.zero.partition_parameters as pp
    import deepspeed.runtime.zero.stage3 as stage3

    base = Options.merged(Options(), options)
    if not _ORIGINALS:
        _ORIGINALS.update(param=pp.AsyncPartitionedParameterSwapper,
                          part=stage3.PartitionedOptimizerSwapper,
                          pipe=stage3.PipelinedOptimizerSwapper,
                          initialize=deepspeed.initialize,
                          save=ds_engine.DeepSpeedEngine.save_checkpoint,
                          load=ds_engine.DeepSpeedEngine.load_checkpoint,
                          overflow=stage3.DeepSpeedZeroOptimizer_Stage3.has_overflow)
        pp.AsyncPartitionedParameterSwapper = _param_swapper_factory
        stage3.PartitionedOptimizerSwapper = _optimizer_swapper_factory(False)
        stage3.PipelinedOptimizerSwapper = _optimizer_swapper_factory(True)
        deepspeed.initialize = _wrap_initialize(_ORIGINALS["initialize"])
        ds_engine.DeepSpeedEngine.save_checkpoint = _wrap_save(_ORIGINALS["save"])
        ds_engine.DeepSpeedEngine.load_checkpoint = _wrap_load(_ORIGINALS["load"])
        stage3.DeepSpeedZeroOptimizer_Stage3.has_overflow = _overflow_check(_ORIGINALS["overflow"])
        from . import stage3 as hooks
        hooks.install(stage3.DeepSpeedZeroOptimizer_Stage3, _STAGE3_ORIGINALS)
    _ORIGINALS["options"] = base
    state.set_options(base)


def disable() -> None:
    """Undo :func:`enable`: DeepSpeed builds its stock swappers again (existing engines keep
    the swappers they have)."""
    if not _ORIGINALS:
        return
    import deepspeed
    import deepspeed.runtime.engine as ds_engine
    import deepspeed.runtime.zero.partition_parameters as pp
    import deepspeed.runtime.zero.stage3 as stage3

    pp.AsyncPartitionedParameterSwapper = _ORIGINALS["param"]
    stage3.PartitionedOptimizerSwapper = _ORIGINALS["part"]
    stage3.PipelinedOptimizerSwapper = _ORIGINALS["pipe"]
    deepspeed.initialize = _ORIGINALS["initialize"]
    ds_engine.DeepSpeedEngine.save_checkpoint = _ORIGINALS["save"]
    ds_engine.DeepSpeedEngine.load_checkpoint = _ORIGINALS["load"]
    stage3.DeepSpeedZeroOptimizer_Stage3.has_overflow = _ORIGINALS["overflow"]
    from . import stage3 as hooks
    hooks.uninstall(stage3.DeepSpeedZeroOptimizer_Stage3, _STAGE3_ORIGINALS)
    _ORIGINALS.clear()
    state.set_options(None)


def enabled() -> bool:
    """Whether :func:`enable` is in effect."""
    return state.enabled()


def stats() -> dict[str, Any]:
    """Pinned pool, engine and lease-recycling counters of the process's memascend runtime
    (empty before DeepSpeed built a memascend swapper)."""
    rt = current_runtime()
    if rt is None:
        return {}
    return {"pool": rt.pool.stats().to_dict(), "engine": dataclasses.asdict(rt.engine.stats()),
            "leases": rt.lease_stats()}
