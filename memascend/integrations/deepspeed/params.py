"""The parameter swapper for ZeRO-3: DeepSpeed's bookkeeping, memascend's memory and I/O.

Stock ``AsyncPartitionedParameterSwapper`` locks ``buffer_count`` slots of ``buffer_size``
elements at start-up (1 GB by default, after an unpinned copy of the same size), reads and
writes one file per parameter through libaio without checking completions, fails with "Not
enough buffers" when prefetch outruns the slots, and locks a second buffer as large as the
biggest sub-group's parameters for the post-step write-back.

:class:`MemAscendParamSwapper` keeps DeepSpeed's status protocol on ``param.ds_tensor``
(AVAILABLE / INFLIGHT / NOT_AVAILABLE, ``.data`` a view while resident) and its method set,
but:

- each resident parameter gets an **exact-size lease** (aligned to DeepSpeed's I/O numel
  alignment) taken when it is swapped in and returned when it is released;
- the slots are bounded in bytes: ``buffer_count`` × the largest swapped partition
  (:func:`memascend.sizing.ds_param_budget_bytes`, or ``param_budget``).
  ``available_swap_in_buffers()``, which bounds DeepSpeed's prefetch, says how many more of
  the largest partition fit, and (without ``param_budget``) keeps at most ``buffer_count``
  partitions resident as stock does, so resident bytes are the real partitions' sizes. A
  fetch DeepSpeed *needs* (not a prefetch) is never refused: beyond the budget it is served
  and counted as ``overdraft_bytes``;
- tensors live in one swap area per tier through :class:`~.aio.StoreAioHandle` (io_uring,
  every completion checked);
- the post-step write-back converts each fp32 partition through one exact-size staging lease
  at a time instead of a locked buffer the size of a whole sub-group.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Optional

import torch
from deepspeed import comm as dist
from deepspeed.runtime.swap_tensor.partitioned_param_swapper import (
    AsyncPartitionedParameterSwapper, PartitionedParamStatus)
from deepspeed.runtime.swap_tensor.utils import AIO_ALIGNED_BYTES, MIN_AIO_BYTES

from ...errors import ConfigError, MemAscendError
from ...files import private_dirs
from ...sizing import ds_param_budget_bytes
from .aio import StoreAioHandle
from .runtime import Options, runtime
from . import state


class MemAscendParamSwapper(AsyncPartitionedParameterSwapper):
    """Drop-in for DeepSpeed's parameter swapper (see the module docstring)."""

    # ---- construction (replaces the stock _configure_aio: no locked slots, no libaio) ----
    def _configure_aio(self, ds_config: Any) -> None:
        self.swap_config = ds_config.zero_config.offload_param
        self.aio_config = ds_config.aio_config
        if self.aio_config["use_gds"]:
            raise ConfigError("aio.use_gds", "GPUDirect Storage is not supported by memascend")
        self.options = Options.merged(state.options(), ds_config._param_dict.get("memascend"))
        self.options.apply_heap()
        dtype_name = str(self.dtype).split(".")[1]
        self.swap_folder = os.path.join(self.swap_config.nvme_path, "zero_stage_3",
                                        f"{dtype_name}params", f"rank{dist.get_rank()}")
        self.rt = runtime(self.options, self.aio_config, bool(self.swap_config.pin_memory),
                          aio_given="aio" in ds_config._param_dict)
        self.rt.drop_store(self.swap_folder)
        shutil.rmtree(self.swap_folder, ignore_errors=True)
        private_dirs(self.swap_folder)
        self.store = self.rt.store(self.swap_folder)
        self.swap_element_size = torch.tensor([], dtype=self.dtype).element_size()
        self.use_gds = False
        self.min_aio_bytes = max(MIN_AIO_BYTES, self.aio_config["block_size"])
        self.aligned_bytes = AIO_ALIGNED_BYTES * self.aio_config["intra_op_parallelism"]
        self.numel_alignment = self.aligned_bytes // self.swap_element_size
        self.elements_per_buffer = self.swap_config.buffer_size
        self.aligned_elements_per_buffer = self._io_aligned_numel(self.elements_per_buffer)
        self.param_buffer_count = self.swap_config.buffer_count
        handle = dict(block_size=self.aio_config["block_size"],
                      queue_depth=self.aio_config["queue_depth"])
        self.aio_read_handle = StoreAioHandle(self.rt, self.store, self.swap_folder, **handle)
        self.aio_write_handle = StoreAioHandle(self.rt, self.store, self.swap_folder, **handle)
        self.aio_handle = None
        self.buffers = None  # no slot array: leases are per parameter
        self.available_buffer_ids: list[int] = list(range(self.param_buffer_count))
        self.reserved_buffer_ids: list[int] = []
        self._next_id = self.param_buffer_count
        self._leases: dict[int, Any] = {}  # buffer id -> lease
        self._largest_bytes = 0  # largest aligned partition seen (sizes the default budget)
        self.in_use_bytes = 0
        self.peak_in_use_bytes = 0
        self.overdraft_bytes = 0
        self.swap_out_params = []

    # ---- the byte budget ----
    def budget_bytes(self) -> int:
        """Pinned bytes the parameter tier may hold (see the module docstring)."""
        if self.options.param_budget is not None:
            return int(self.options.param_budget)
        return ds_param_budget_bytes(self.param_buffer_count, self._largest_bytes)

    def _note_numel(self, numel: int) -> int:
        nbytes = self._io_aligned_numel(numel) * self.swap_element_size
        self._largest_bytes = max(self._largest_bytes, nbytes)
        return nbytes

    def _track_numel(self, params: list[Any]) -> None:
        for p in params:
            if p.ds_tensor is None:
                raise MemAscendError(f"param {p.ds_id} has no partition to swap")
            self.param_id_to_numel[p.ds_id] = p.ds_tensor.ds_numel
            self._note_numel(p.ds_tensor.ds_numel)

    def available_swap_in_buffers(self) -> int:
        """How many more partitions DeepSpeed may prefetch now: as many of the largest size as
        fit in the budget and, unless ``param_budget`` was given, no more resident partitions
        than ``buffer_count`` (as stock). Without that count the byte budget would fill with
        many small partitions and the exact sizing would save nothing."""
        largest = max(self._largest_bytes, 1)
        free = max(0, (self.budget_bytes() - self.in_use_bytes) // largest)
        if self.options.param_budget is None:
            free = min(free, max(0, self.param_buffer_count - len(self._leases)))
        return free

    def _take_buffer(self, numel: int) -> tuple[int, Any]:
        aligned = self._io_aligned_numel(numel)
        nbytes = self._note_numel(numel)
        over = self.in_use_bytes + nbytes - self.budget_bytes()
        if over > 0:
            self.overdraft_bytes += min(over, nbytes)
        if self.available_buffer_ids:
            bid = self.available_buffer_ids.pop()
        else:
            bid, self._next_id = self._next_id, self._next_id + 1
        lease = self.rt.lease(nbytes)
        self._leases[bid] = lease
        self.in_use_bytes += nbytes
        self.peak_in_use_bytes = max(self.peak_in_use_bytes, self.in_use_bytes)
        return bid, lease.as_tensor(self.dtype, aligned)

    def _give_back(self, bid: int) -> None:
        lease = self._leases.pop(bid, None)
        if lease is not None:
            self.in_use_bytes -= lease.nbytes
            self.rt.free(lease)
        if bid < self.param_buffer_count:
            self.available_buffer_ids.append(bid)

    # ---- buffer assignment (stock: slices of the locked slot array) ----
    def _allocate_and_return_buffers_for_swap_in(self, params: list[Any]):
        compute_buffers, swap_buffers = [], []
        for p in params:
            pid = p.ds_id
            if pid not in self.param_id_to_numel:
                raise MemAscendError(f"param {pid}: number of elements unknown (never swapped out)")
            if pid in self.param_id_to_buffer_id:
                raise MemAscendError(f"param {pid} already has a swap buffer")
            numel = self.param_id_to_numel[pid]
            bid, swap_buffer = self._take_buffer(numel)
            self.param_id_to_buffer_id[pid] = bid
            self.param_id_to_swap_buffer[pid] = swap_buffer
            compute_buffers.append(swap_buffer.narrow(0, 0, numel))
            swap_buffers.append(swap_buffer)
        return compute_buffers, swap_buffers

    def get_buffer(self, param: Any, numel: int) -> Any:
        """A buffer for ``param``'s new partition of ``numel`` elements (any size: there is no
        ``buffer_size`` limit)."""
        pid = param.ds_id
        self.param_id_to_numel[pid] = numel
        bid, swap_buffer = self._take_buffer(numel)
        self.param_id_to_buffer_id[pid] = bid
        self.param_id_to_swap_buffer[pid] = swap_buffer
        return swap_buffer.narrow(0, 0, numel)

    def swap_in(self, params: list[Any], async_op: bool = True, swap_in_buffers: Any = None):
        """Start reading ``params``' partitions into fresh exact-size buffers (never fails
        for lack of buffers; see the module docstring)."""
        # DeepSpeed's prefetch walks its trace, where a parameter used twice appears twice.
        params = list({id(p): p for p in params}.values())
        for p in params:
            if p.ds_tensor.status != PartitionedParamStatus.NOT_AVAILABLE:
                raise MemAscendError(f"param {p.ds_id} is already available or in flight")
        paths = self._get_swap_paths(params)
        if swap_in_buffers is None:
            compute, swap_in_buffers = self._allocate_and_return_buffers_for_swap_in(params)
            inflight = sum(t.numel() for t in compute)
        else:
            inflight = sum(t.numel() for t in swap_in_buffers)
        for buf, path in zip(swap_in_buffers, paths):
            self.aio_read_handle.async_pread(buf, path)
        self._update_inflight_swap_in(params, swap_in_buffers, inflight)
        if not async_op:
            self.synchronize_reads()

    def swap_into_buffer(self, param: Any, dest_buffer: Any) -> None:
        """Read ``param``'s partition straight into ``dest_buffer`` (blocking)."""
        if param.ds_tensor.status != PartitionedParamStatus.NOT_AVAILABLE:
            raise MemAscendError(f"param {param.ds_id} is already available or in flight")
        path = self._get_swap_paths([param])[0]
        self.aio_read_handle.async_pread(dest_buffer, path)
        self._update_inflight_swap_in([param], [dest_buffer], dest_buffer.numel())
        self.synchronize_reads()

    def remove_partition_and_release_buffers(self, params: list[Any]) -> None:
        """Release ``params``' buffers (their leases go back to the pool)."""
        for p in params:
            pid = p.ds_id
            if pid in self.param_id_to_buffer_id:
                bid = self.param_id_to_buffer_id.pop(pid)
                del self.param_id_to_swap_buffer[pid]
                if pid in self.available_params:
                    self.available_params.remove(pid)
                    self.available_numel -= self.param_id_to_numel[pid]
                p.ds_tensor.data = self.invalid_buffer.data  # drop the view, then the lease
                self._give_back(bid)
            else:
                p.ds_tensor.data = self.invalid_buffer.data
            p.ds_tensor.status = PartitionedParamStatus.NOT_AVAILABLE

    def reserve_available_buffers(self) -> list[Any]:
        """Buffers for DeepSpeed's fast optimizer initialisation (transient;
        :meth:`release_reserved_buffers` frees them): one per free slot, each as large as the
        optimizer's largest sub-group (what DeepSpeed requires of them) rather than
        ``buffer_size`` elements when the optimizer swapper is known. The streamed optimizer
        swapper reads the partitions itself, one at a time, and ignores these buffers: it
        gets one page each (DeepSpeed only checks that there are some)."""
        numel = self._io_aligned_numel(self.rt.optimizer_largest_numel or
                                       self.aligned_elements_per_buffer)
        if self.rt.optimizer_streams:
            numel = max(1, 4096 // self.swap_element_size)
        out = []
        for bid in self.available_buffer_ids:
            lease = self.rt.lease(numel * self.swap_element_size)
            self._leases[bid] = lease
            self.reserved_buffer_ids.append(bid)
            out.append(lease.as_tensor(self.dtype, numel))
        self.available_buffer_ids = []
        return out

    def release_reserved_buffers(self) -> None:
        """Free the buffers of :meth:`reserve_available_buffers`."""
        for bid in self.reserved_buffer_ids:
            lease = self._leases.pop(bid, None)
            if lease is not None:
                self.rt.free(lease)
            self.available_buffer_ids.append(bid)
        self.reserved_buffer_ids = []

    # ---- the post-step write-back of new compute-dtype partitions ----
    def reserve_partitioned_swap_space(self, partition_num_elems: list[int]) -> None:
        """Stock locks a buffer for the largest sub-group here; memascend stages one
        partition at a time instead, so nothing is reserved."""
        self.partitioned_swap_buffer = None

    def swap_out_partitioned_params(self, dst_fp16_params: list[Any],
                                    src_fp32_params: list[Any]) -> None:
        """Write each fp32 partition, converted to the compute dtype, as its parameter's
        tensor: one exact-size staging lease per partition, at most two writes in flight."""
        if len(dst_fp16_params) != len(src_fp32_params):
            raise MemAscendError(f"{len(dst_fp16_params)} parameters but "
                                 f"{len(src_fp32_params)} fp32 partitions")
        paths = self._get_swap_paths(dst_fp16_params, must_exist=True)
        self._prepare_overwrite(dst_fp16_params)
        inflight: list[tuple[Any, Any]] = []
        first: Optional[BaseException] = None
        try:
            for src, path in zip(src_fp32_params, paths):
                aligned = self._io_aligned_numel(src.numel())
                lease = self.rt.lease(aligned * self.swap_element_size)
                staged = lease.as_tensor(self.dtype, aligned)
                staged.narrow(0, 0, src.numel()).copy_(src)
                if aligned > src.numel():
                    staged.narrow(0, src.numel(), aligned - src.numel()).zero_()
                try:
                    h = self.store.write(self.aio_write_handle.key_of(path), staged)
                except BaseException:
                    self.rt.free(lease)
                    raise
                del staged
                inflight.append((h, lease))
                if len(inflight) >= 2:
                    h0, l0 = inflight.pop(0)
                    try:
                        h0.wait()
                    finally:
                        self.rt.free(l0)
        finally:
            for h, lease in inflight:  # drain every write before raising the first failure
                try:
                    h.wait()
                except BaseException as exc:  # noqa: B036 - re-raised below
                    first = first or exc
                self.rt.free(lease)
            for param in dst_fp16_params:
                param.ds_tensor.status = PartitionedParamStatus.NOT_AVAILABLE
        if first is not None:
            raise first

    def _prepare_overwrite(self, params: list[Any]) -> None:
        """Before new values of ``params`` are written: finish our writes, and drop any
        buffer that holds (or is being read with) their old values."""
        self.synchronize_writes()
        # A parameter DeepSpeed prefetched for the next forward is in flight with the old
        # values: finish the read and drop that buffer, the new values are written below.
        if any(p.ds_tensor.status == PartitionedParamStatus.INFLIGHT for p in params):
            self.synchronize_reads()
        stale = [p for p in params if p.ds_id in self.param_id_to_buffer_id]
        if stale:
            self.remove_partition_and_release_buffers(stale)

    def stage_partition(self, param: Any) -> tuple[Any, Any]:
        """An exact-size staging lease for ``param``'s partition in the compute dtype and
        its tensor (the I/O-aligned tail zeroed): fill ``tensor[:ds_numel]``, then hand
        both to :meth:`write_staged`."""
        numel = int(param.ds_tensor.ds_numel)
        aligned = self._io_aligned_numel(numel)
        lease = self.rt.lease(aligned * self.swap_element_size)
        staged = lease.as_tensor(self.dtype, aligned)
        if aligned > numel:
            staged.narrow(0, numel, aligned - numel).zero_()
        return lease, staged

    def write_staged(self, param: Any, lease: Any, staged: Any) -> Any:
        """Start writing a filled staging tensor as ``param``'s tensor; returns the handle.
        The caller frees ``lease`` once the handle is done."""
        path = self._get_swap_paths([param], must_exist=True)[0]
        self._prepare_overwrite([param])
        h = self.store.write(self.aio_write_handle.key_of(path), staged)
        param.ds_tensor.status = PartitionedParamStatus.NOT_AVAILABLE
        return h

    def stats(self) -> dict[str, int]:
        """Budget and use of the parameter tier, in bytes."""
        return {"budget_bytes": self.budget_bytes(), "in_use_bytes": self.in_use_bytes,
                "peak_in_use_bytes": self.peak_in_use_bytes,
                "overdraft_bytes": self.overdraft_bytes,
                "largest_partition_bytes": self._largest_bytes}
