"""The replacements the DeepSpeed drop-in installs for DeepSpeed's own names.

Each public function here takes DeepSpeed's original (a class or a function) and returns what
replaces it; :mod:`.patches` lists which name each one replaces and installs them. The
swapper factories build memascend's swappers unless the config's ``"memascend"`` block says
``"enabled": false`` (then DeepSpeed's original); ``deepspeed.initialize`` merges that block on
the options of ``enable()`` while the engine is built; the engine's checkpoint methods point
DeepSpeed's copy of the optimizer swap folder at memascend's exported swap area; stage 3's
``has_overflow`` scans in chunks. Stage 3's optimizer methods are wrapped in :mod:`.stage3`.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import warnings
from typing import Any, Optional

from ...errors import ConfigError
from . import state
from .marker import CLIENT_KEY, WrittenBy, layout_of
from .activations import attach_activations
from .runtime import Options, current_runtime


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


def param_swapper(original: Any) -> Any:
    """Replaces ``partition_parameters.AsyncPartitionedParameterSwapper`` (what ``zero.Init``
    builds): memascend's parameter swapper unless the config's block disables it."""
    def make(ds_config: Any, model_dtype: Any) -> Any:
        from .params import MemAscendParamSwapper

        if _use_memascend(ds_config._param_dict.get("memascend")):
            return MemAscendParamSwapper(ds_config, model_dtype)
        return original(ds_config, model_dtype)
    return make


def partitioned_optimizer_swapper(original: Any) -> Any:
    """Replaces ``stage3.PartitionedOptimizerSwapper``."""
    return _optimizer_swapper_factory(original, pipelined=False)


def pipelined_optimizer_swapper(original: Any) -> Any:
    """Replaces ``stage3.PipelinedOptimizerSwapper``."""
    return _optimizer_swapper_factory(original, pipelined=True)


def _optimizer_swapper_factory(original: Any, pipelined: bool) -> Any:
    def make(*args: Any, **kwargs: Any) -> Any:
        from .optim import MemAscendPartitionedOptimizerSwapper, MemAscendPipelinedOptimizerSwapper
        from .stream import StreamingOptimizerSwapper, can_stream

        opts = state.options()
        if opts.enabled:
            optimizer, dtype = _arg(args, kwargs, 3, "optimizer"), _arg(args, kwargs, 6, "dtype")
            why = can_stream(optimizer, dtype) if opts.stream_optimizer else None
            if opts.stream_optimizer and why is None:
                cls = StreamingOptimizerSwapper
            else:
                if why is not None:
                    warnings.warn(f"memascend: the optimizer step is not streamed ({why}): "
                                  "DeepSpeed's whole-sub-group swapping runs on memascend's "
                                  "store, with buffers of the largest sub-group; set "
                                  "\"stream_optimizer\": false in the config's \"memascend\" "
                                  "block to silence this", stacklevel=2)
                cls = MemAscendPipelinedOptimizerSwapper if pipelined else \
                    MemAscendPartitionedOptimizerSwapper
        else:
            cls = original
        return cls(*args, **kwargs)
    return make


def _arg(args: tuple, kwargs: dict, index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def wrap_initialize(original: Any) -> Any:
    """Replaces ``deepspeed.initialize``: the config's ``"memascend"`` block is merged on the
    options of ``enable()`` for the engine being built."""
    @functools.wraps(original)
    def initialize(*args: Any, **kwargs: Any) -> Any:
        config = kwargs.get("config", kwargs.get("config_params"))
        if config is None:
            args_ns = kwargs.get("args", args[0] if args else None)
            config = getattr(args_ns, "deepspeed_config", None)
        cfg = _config_dict(config)
        base = state.base_options()
        merged = Options.merged(base, (cfg or {}).get("memascend"))
        merged.apply_heap()
        state.set_options(merged)
        state.set_aio_given(cfg is None or "aio" in cfg)  # a config not read here: as given
        try:
            out = original(*args, **kwargs)
            if merged.enabled and merged.activations:
                attach_activations(out[0], cfg, merged)
            return out
        finally:
            state.set_options(base)
            state.set_aio_given(True)
            rt = current_runtime()
            if rt is not None:
                rt.trim()  # leases kept from initialisation are not training's working set
    return initialize


def _ours(engine: Any) -> Any:
    from .optim import _StoreBacked

    sw = getattr(getattr(engine, "optimizer", None), "optimizer_swapper", None)
    return sw if isinstance(sw, _StoreBacked) else None


def _offload_ckpt_dir(engine: Any, args: tuple, kwargs: dict) -> Optional[str]:
    """Where ``save_checkpoint(*args, **kwargs)`` copies the optimizer swap folder (the path
    DeepSpeed's own ``save_checkpoint`` computes)."""
    from deepspeed.checkpoint.ds_to_universal import dp_index_to_str

    save_dir = _arg(args, kwargs, 0, "save_dir")
    if save_dir is None:
        return None
    tag = _arg(args, kwargs, 1, "tag")
    tag = str(f"global_step{engine.global_steps}" if tag is None else tag)
    rank = engine.local_rank if engine.use_node_local_storage() else engine.global_rank
    return os.path.join(save_dir, tag, "offloaded_tensors", "rank" + dp_index_to_str(rank))


def _with_marker(args: tuple, kwargs: dict, marker: Any) -> tuple[tuple, dict]:
    """``save_checkpoint``'s arguments with the writer's record added to ``client_state``
    (:mod:`.marker`)."""
    client = dict(_arg(args, kwargs, 2, "client_state") or {})
    client[CLIENT_KEY] = marker
    if len(args) > 2:
        return args[:2] + (client,) + args[3:], kwargs
    return args, dict(kwargs, client_state=client)


def wrap_save(original: Any) -> Any:
    """Replaces ``DeepSpeedEngine.save_checkpoint``: DeepSpeed copies the optimizer tier's
    exported swap area into the checkpoint instead of the live folder. Saving the same tag
    again (HF Trainer does, twice per checkpoint under ZeRO-3 without gathered weights;
    DeepSpeed's copy refuses an existing folder) replaces the earlier copy: it is moved aside
    first and put back if the save fails. The model-states file records the writer
    (:mod:`.marker`), so that stock DeepSpeed refuses to load the checkpoint."""
    @functools.wraps(original)
    def save_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        sw = _ours(self)
        if sw is None:
            return original(self, *args, **kwargs)
        exported = sw.export_for_checkpoint()  # may fail: nothing moved aside yet
        args, kwargs = _with_marker(args, kwargs, WrittenBy(layout_of(sw)))
        target = _offload_ckpt_dir(self, args, kwargs)
        aside = None
        if target is not None and os.path.isdir(target):
            aside = target + ".memascend-old"
            if os.path.isdir(aside):
                shutil.rmtree(aside)
            os.rename(target, aside)
        live = sw.swap_folder
        sw.swap_folder = exported
        try:
            out = original(self, *args, **kwargs)
        except BaseException:
            if aside is not None:
                shutil.rmtree(target, ignore_errors=True)
                os.rename(aside, target)
            raise
        finally:
            sw.swap_folder = live
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return out
    return save_checkpoint


def wrap_load(original: Any) -> Any:
    """Replaces ``DeepSpeedEngine.load_checkpoint``: DeepSpeed copies the checkpoint's swap
    area into an exchange folder that memascend then imports (a checkpoint without
    memascend's export is a ``MetadataError``, never a silent start from the live state);
    then what DeepSpeed's NVMe load leaves out is restored (:mod:`.resume`: in-memory
    sub-groups, the loss scaler)."""
    @functools.wraps(original)
    def load_checkpoint(self: Any, *args: Any, **kwargs: Any) -> Any:
        sw = _ours(self)
        if sw is None:
            return original(self, *args, **kwargs)
        live = sw.swap_folder
        sw.swap_folder = sw.begin_import()
        try:
            out = original(self, *args, **kwargs)
        except BaseException:
            sw.swap_folder = live
            sw.end_import()
            raise
        sw.swap_folder = live
        load_path = out[0] if isinstance(out, tuple) and out else None
        sw.end_import(loaded=load_path is not None)  # no export: MetadataError
        if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], dict):
            out[1].pop(CLIENT_KEY, None)  # the writer's record is not the client's state
        if load_path is not None and not _arg(args, kwargs, 5, "load_module_only"):
            from .resume import restore_in_memory_groups

            load_opt = _arg(args, kwargs, 3, "load_optimizer_states")
            restore_in_memory_groups(self, _arg(args, kwargs, 0, "load_dir"),
                                     _arg(args, kwargs, 1, "tag"),
                                     load_optimizer_states=load_opt is not False)
        return out
    return load_checkpoint


def overflow_check(original: Any) -> Any:
    """Replaces stage 3's ``has_overflow``: a chunked scan (:mod:`.overflow`)."""
    @functools.wraps(original)
    def has_overflow(self: Any, partition_gradients: bool = True) -> bool:
        if not state.options().enabled:
            return original(self, partition_gradients)
        from .overflow import has_overflow as fused

        return fused(self, partition_gradients)
    return has_overflow
