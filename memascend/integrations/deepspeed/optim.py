"""The two optimizer swappers of ZeRO-3, on memascend's store, engine and pool.

DeepSpeed's ``PartitionedOptimizerSwapper`` and ``PipelinedOptimizerSwapper`` keep their
bookkeeping (sub-group state tensors, gradient partitions split into aligned heads and
remainders, the order of swaps around each sub-group's step). Their subclasses here change
what is underneath: the aio handles are :class:`~.aio.StoreAioHandle` (one swap area per
rank, io_uring, every completion checked, no libaio and no JIT-built ``async_io`` op) and the
pinned buffers are exact-size leases from the shared pool.

Checkpoints: DeepSpeed copies the optimizer swap folder into ``offloaded_tensors/rank*`` of a
checkpoint and back on load. With memascend that folder would hold a live swap area, so
:func:`~memascend.integrations.deepspeed.enable` wraps ``save_checkpoint`` /
``load_checkpoint``: before a save the area is exported (a consistent copy) to an exchange
folder that DeepSpeed then copies; on load DeepSpeed copies the checkpoint into the exchange
folder and the area imports it before the first read.
"""
from __future__ import annotations

import os
import shutil
from typing import Any

from deepspeed import comm as dist
from deepspeed.runtime.swap_tensor.async_swapper import AsyncTensorSwapper
from deepspeed.runtime.swap_tensor.optimizer_utils import OptimizerSwapper
from deepspeed.runtime.swap_tensor.partitioned_optimizer_swapper import PartitionedOptimizerSwapper
from deepspeed.runtime.swap_tensor.pipelined_optimizer_swapper import (
    ASYNC_SWAP_IN, ASYNC_SWAP_OUT, SYNC_SWAP_IN, SYNC_SWAP_OUT, PipelinedOptimizerSwapper)

from ...errors import MetadataError
from ...files import private_dirs
from . import state
from .aio import StoreAioHandle
from .marker import LAYOUT_NAME, check_layout, read_layout, write_layout
from .runtime import runtime

EXPORT_NAME = "memascend-optim.swp"


def _not_a_gradient(key: str) -> bool:
    """Whether a key of the optimizer tier is state a checkpoint needs (gradient pieces of
    the streamed step are ``<ds_id>/g/<k>``; DeepSpeed's own gradient swap files have
    ``gradient`` in their names)."""
    return "/g/" not in key and "gradient" not in key.rsplit("/", 1)[-1]


class _StoreBacked:
    """What both memascend optimizer swappers add: the store, and checkpoint exchange."""

    def _open_store(self, swap_config: Any, aio_config: Any, base_folder: str) -> StoreAioHandle:
        folder = os.path.join(base_folder, "optimizer", f"rank{dist.get_rank()}")
        self.rt = runtime(state.options(), aio_config, bool(swap_config.pin_memory),
                          aio_given=state.aio_given())
        self.rt.drop_store(folder)
        self.store = self.rt.store(folder)
        self._live_folder = folder
        self._exchange = os.path.join(base_folder, "memascend-checkpoint", f"rank{dist.get_rank()}")
        self._import_pending = False
        return self._handle(aio_config)

    def _handle(self, aio_config: Any) -> StoreAioHandle:
        return StoreAioHandle(self.rt, self.store, self._live_folder,
                              block_size=aio_config["block_size"],
                              queue_depth=aio_config["queue_depth"])

    # ---- checkpoint exchange (driven by the engine wrappers in __init__) ----
    def export_for_checkpoint(self) -> str:
        """Write a consistent copy of the swap area to the exchange folder, without gradients
        (consumed by the step, as stock DeepSpeed leaves its gradient files out); returns
        it."""
        shutil.rmtree(self._exchange, ignore_errors=True)
        private_dirs(self._exchange)
        self.store.export(os.path.join(self._exchange, EXPORT_NAME), include=_not_a_gradient)
        write_layout(self._exchange, self)
        return self._exchange

    def begin_import(self) -> str:
        """Empty the exchange folder for DeepSpeed to copy a checkpoint into; the area
        imports it before its next read (:meth:`finish_import`)."""
        shutil.rmtree(self._exchange, ignore_errors=True)
        private_dirs(self._exchange)
        self._import_pending = True
        return self._exchange

    def finish_import(self) -> None:
        """Import a checkpoint copied into the exchange folder, if one is pending.

        Raises
        ------
        MetadataError
            The checkpoint records another layout (:func:`.marker.check_layout`); nothing
            was imported.
        """
        if not self._import_pending:
            return
        src = os.path.join(self._exchange, EXPORT_NAME)
        if os.path.exists(src):  # DeepSpeed reads state before it copies the checkpoint in
            try:
                check_layout(read_layout(self._exchange), self,
                             os.path.join(self._exchange, LAYOUT_NAME))
            except MetadataError:
                self._import_pending = False
                raise
            self.store.import_from(src)
            self._import_pending = False

    def end_import(self, loaded: bool = False) -> None:
        """After ``load_checkpoint``: import if DeepSpeed copied but never read, then stop
        waiting for a checkpoint.

        Raises
        ------
        MetadataError
            ``loaded`` (DeepSpeed loaded a checkpoint) and it held no memascend export: it was
            written by DeepSpeed's stock swappers, or is incomplete. Never a silent start from
            the state this process had.
        """
        self.finish_import()
        pending, self._import_pending = self._import_pending, False
        if not (pending and loaded):
            return
        found = sorted(os.listdir(self._exchange)) if os.path.isdir(self._exchange) else []
        what = (f"it holds {', '.join(found[:3])}{', ...' if len(found) > 3 else ''}, files of "
                "DeepSpeed's stock optimizer swapper" if found
                else "it is empty (an incomplete checkpoint)")
        raise MetadataError(
            f"the checkpoint's offloaded optimizer state has no memascend export "
            f"({EXPORT_NAME}): {what}. It was not saved with memascend's drop-in enabled; load "
            "it with stock DeepSpeed (memascend disabled). The optimizer state was not "
            "loaded, but the engine's counters were: rebuild the engine before training",
            path=os.path.join(self._exchange, EXPORT_NAME))

    def swap_in_optimizer_state(self, parameter: Any, async_parameter: Any = None) -> None:
        """DeepSpeed's swap-in, after importing a pending checkpoint."""
        self.finish_import()
        super().swap_in_optimizer_state(parameter, async_parameter)  # type: ignore[misc]


class MemAscendPartitionedOptimizerSwapper(_StoreBacked, PartitionedOptimizerSwapper):
    """Drop-in for ``PartitionedOptimizerSwapper`` (same constructor)."""

    def __init__(self, swap_config, aio_config, base_folder, optimizer, largest_numel, device,
                 dtype, timers):
        self.aio_handle = self._open_store(swap_config, aio_config, base_folder)
        OptimizerSwapper.__init__(self, swap_config, aio_config, base_folder, optimizer,
                                  largest_numel, device, dtype, timers, self.aio_handle)
        self.rt.optimizer_largest_numel = self.largest_numel
        self.gradient_swapper = AsyncTensorSwapper(aio_handle=self.aio_handle,
                                                   numel_alignment=self.numel_alignment,
                                                   timers=self.timers)
        self.print_exclude_list += ["aio_handle", "gradient_swapper", "print_exclude_list", "rt",
                                    "store"]


class MemAscendPipelinedOptimizerSwapper(_StoreBacked, PipelinedOptimizerSwapper):
    """Drop-in for ``PipelinedOptimizerSwapper`` (same constructor)."""

    def __init__(self, swap_config, aio_config, base_folder, optimizer, largest_numel, device,
                 dtype, timers):
        self.write_aio_handle = self._open_store(swap_config, aio_config, base_folder)
        self.read_aio_handle = self._handle(aio_config)
        OptimizerSwapper.__init__(self, swap_config, aio_config, base_folder, optimizer,
                                  largest_numel, device, dtype, timers, self.write_aio_handle)
        self.rt.optimizer_largest_numel = self.largest_numel
        self.gradient_swapper = AsyncTensorSwapper(aio_handle=self.write_aio_handle,
                                                   numel_alignment=self.numel_alignment,
                                                   timers=self.timers)
        self.async_swap_in = swap_config.pipeline_read
        self.async_swap_out = swap_config.pipeline_write
        self.swap_ops = {SYNC_SWAP_IN: None, ASYNC_SWAP_IN: None, SYNC_SWAP_OUT: None,
                         ASYNC_SWAP_OUT: None}
        self.print_exclude_list += ["gradient_swapper", "read_aio_handle", "write_aio_handle",
                                    "swap_ops", "print_exclude_list", "rt", "store"]
