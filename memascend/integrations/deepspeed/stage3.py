"""Stage 3's per-sub-group step, routed to the streamed optimizer swapper.

``DeepSpeedZeroOptimizer_Stage3.step`` runs, for each sub-group: ``_prepare_sub_group``
(swap in master, gradient and Adam state), ``unscale_and_clip_grads``, ``_optimizer_step``,
``_reassign_or_swap_out_partitioned_parameters`` (master into the compute-dtype parameters)
and ``_release_sub_group`` (swap out). When the optimizer swapper is a
:class:`~.stream.StreamingOptimizerSwapper` and the sub-group is swapped, these hooks make
prepare and release no-ops, remember the unscale factor, and run the whole update, parameter
write-back included, inside ``_optimizer_step`` piece by piece. ``initialize_optimizer_states``
(which swaps every sub-group in whole with a largest-sub-group gradient buffer) is skipped for
swapped sub-groups: their Adam state starts at the first step, one piece at a time. Outside a
step, the write-back (``reset_swap_buffers`` after a checkpoint load) streams the stored
master into the parameters. With ``stream_grads`` (:mod:`.grads`), ``_setup_for_real_optimizer``
gives stage 3 a flat gradient buffer for the other sub-groups only, ``partition_grads`` sends
streamed partitions to the gradient pieces, the backward epilogue and ``_pre_step`` write the
open pieces, and ``finalize_gradient_accumulation_boundary`` (client-managed accumulation,
which reads every partition) is refused with a clear error, and ``_constant_buffered_norm2``
(each partition's gradient norm) converts into a reused scratch (same bits). With one rank in
the partition group, ``__avg_scatter_grads`` hands each bucketed gradient on as its own
partition instead of copying the bucket into a fresh buffer and reduce-scattering it over
that one rank (same values; DeepSpeed's scalings and dtype changes are kept). Every other
case calls DeepSpeed's own method. Each ``_name(original)`` here builds the wrapper of one
method; :data:`.patches.PATCHES` says which and installs them.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ...errors import MemAscendError
from .grads import GradPieces, setup_buffers
from .stream import (ParamWriter, StreamingOptimizerSwapper, combined_inv_scale, grad_reader,
                     parts_of)

def _streamed(self: Any, sub_group_id: int) -> bool:
    sw = getattr(self, "optimizer_swapper", None)
    return isinstance(sw, StreamingOptimizerSwapper) and \
        self._swappable_optimizer_subgroup(sub_group_id) and \
        getattr(self, "subgroup_to_device", {}).get(sub_group_id, "cpu") == "cpu"


def _initialize_optimizer_states(original: Any) -> Any:
    @functools.wraps(original)
    def initialize_optimizer_states(self: Any) -> None:
        if not isinstance(getattr(self, "optimizer_swapper", None), StreamingOptimizerSwapper):
            return original(self)
        # Swapped sub-groups: nothing to do (state is created per piece at the first step).
        # Others get the pinned gradient buffer DeepSpeed gives them.
        for i in range(len(self.fp16_groups)):
            if _streamed(self, i):
                continue
            n = int(self.fp16_partitioned_groups_flat_numel[i])
            dtype = self.fp32_partitioned_groups_flat[i].dtype
            buf = torch.zeros(n, dtype=dtype, device=self.device)
            if self.offload_optimizer_pin_memory:
                from deepspeed.accelerator import get_accelerator
                buf = get_accelerator().pin_memory(buf)
            self.fp32_partitioned_groups_flat[i].grad = buf
    return initialize_optimizer_states


def _prepare_sub_group(original: Any) -> Any:
    @functools.wraps(original)
    def _prepare_sub_group(self: Any, sub_group_id: int, timer_names: Any) -> None:
        if not _streamed(self, sub_group_id):
            return original(self, sub_group_id, timer_names)
        return None  # the streamed step reads what it needs, piece by piece
    return _prepare_sub_group


def _unscale_and_clip_grads(original: Any) -> Any:
    @functools.wraps(original)
    def unscale_and_clip_grads(self: Any, sub_group_id: int, total_norm: Any) -> None:
        if not _streamed(self, sub_group_id):
            return original(self, sub_group_id, total_norm)
        self._ma_inv_scale = getattr(self, "_ma_inv_scale", {})
        self._ma_inv_scale[sub_group_id] = combined_inv_scale(self, total_norm)
    return unscale_and_clip_grads


def _optimizer_step(original: Any) -> Any:
    @functools.wraps(original)
    def _optimizer_step(self: Any, sub_group_id: int) -> None:
        if not _streamed(self, sub_group_id):
            return original(self, sub_group_id)
        group = self.optimizer.param_groups[self.sub_group_to_group_id[sub_group_id]]
        inv_scale = getattr(self, "_ma_inv_scale", {}).pop(sub_group_id, 1.0)
        nxt = self.next_swappable_fp32_partitioned_groups[sub_group_id]
        grads = getattr(self, "_ma_grads", None)
        from_pieces = grads is not None and sub_group_id in grads.groups
        self.optimizer_swapper.step_group(
            str(self.fp32_partitioned_groups_flat[sub_group_id].ds_id),
            parts_of(self, sub_group_id),
            None if from_pieces else grad_reader(self, sub_group_id), inv_scale, group,
            ParamWriter(), next_ds_id=str(nxt.ds_id) if nxt is not None else None)
        if self.fp16_partitioned_groups_flat[sub_group_id] is not None:
            self._unflatten_partitioned_parameters(sub_group_id)
        self._ma_stepped = getattr(self, "_ma_stepped", set())
        self._ma_stepped.add(sub_group_id)
    return _optimizer_step


def _reassign(original: Any) -> Any:
    @functools.wraps(original)
    def _reassign_or_swap_out_partitioned_parameters(self: Any, sub_group_id: int) -> None:
        if not _streamed(self, sub_group_id):
            return original(self, sub_group_id)
        stepped = getattr(self, "_ma_stepped", set())
        if sub_group_id in stepped:  # the streamed step wrote the parameters already
            stepped.discard(sub_group_id)
            return None
        self.optimizer_swapper.write_params(str(self.fp32_partitioned_groups_flat[sub_group_id]
                                                .ds_id), parts_of(self, sub_group_id),
                                            ParamWriter())
        if self.fp16_partitioned_groups_flat[sub_group_id] is not None:
            self._unflatten_partitioned_parameters(sub_group_id)
        return None
    return _reassign_or_swap_out_partitioned_parameters


def _release_sub_group(original: Any) -> Any:
    @functools.wraps(original)
    def _release_sub_group(self: Any, sub_group_id: int, timer_names: Any) -> None:
        if not _streamed(self, sub_group_id):
            return original(self, sub_group_id, timer_names)
        return None  # the streamed step wrote everything back
    return _release_sub_group


def _setup_for_real_optimizer(original: Any) -> Any:
    @functools.wraps(original)
    def _setup_for_real_optimizer(self: Any) -> None:
        sw = getattr(self, "optimizer_swapper", None)
        if not isinstance(sw, StreamingOptimizerSwapper):
            return original(self)
        # Parameters on NVMe: build each fp32 master from the stored partitions piece by
        # piece (DeepSpeed's fast_init path, served by the streamed swapper) instead of two
        # whole fp32 sub-groups in memory at once. The master's values are the same.
        if getattr(self, "params_in_nvme_and_cpu", False):
            self.offload_optimizer_fast_init = True
        if not sw.rt.options.stream_grads:
            return original(self)
        # DeepSpeed 0.19.8's body, but for the flat gradient buffer (grads.setup_buffers).
        from deepspeed import comm as dist
        from deepspeed.utils import logger

        self._create_fp32_partitions()
        dist.barrier()
        self._create_next_swappable_fp32_groups()
        self.initialize_optimizer_states()
        dist.barrier()
        if dist.get_rank() == 0:
            logger.info("optimizer state initialized")
        streamed = [i for i in range(len(self.fp16_groups)) if _streamed(self, i)]
        self._ma_grads = GradPieces(sw, streamed) if streamed else None
        sw.grads = self._ma_grads
        setup_buffers(self, self._ma_grads or GradPieces(sw, []))
        return None
    return _setup_for_real_optimizer


def _partition_grads(original: Any) -> Any:
    @functools.wraps(original)
    def partition_grads(self: Any, params_to_release: Any, grad_partitions: Any) -> Any:
        grads = getattr(self, "_ma_grads", None)
        if grads is None:
            return original(self, params_to_release, grad_partitions)
        return grads.partition(self, original, params_to_release, grad_partitions)
    return partition_grads


def _epilogue(original: Any) -> Any:
    @functools.wraps(original)
    def independent_gradient_partition_epilogue(self: Any) -> None:
        original(self)
        grads = getattr(self, "_ma_grads", None)
        if grads is not None:
            grads.flush()  # every gradient piece of this backward is on disk before the step
    return independent_gradient_partition_epilogue


def _pre_step(original: Any) -> Any:
    @functools.wraps(original)
    def _pre_step(self: Any) -> None:
        original(self)
        grads = getattr(self, "_ma_grads", None)
        if grads is not None:
            grads.flush()
            grads.steps += 1
        # No trim here: kept leases stay within the in-use peak since initialisation (the
        # runtime sheds them as the step's pieces need room), and trimming every step made
        # each forward and backward map, populate and lock its partitions afresh.
    return _pre_step


def _finalize_boundary(original: Any) -> Any:
    @functools.wraps(original)
    def finalize_gradient_accumulation_boundary(self: Any) -> None:
        if getattr(self, "_ma_grads", None) is not None:
            raise MemAscendError("managed_gradient_accumulation false reads every gradient "
                                 "partition at the step; memascend streams them to the swap "
                                 "area. Set \"memascend\": {\"stream_grads\": false} for it")
        return original(self)
    return finalize_gradient_accumulation_boundary


def _norm2(original: Any) -> Any:
    @functools.wraps(original)
    def _constant_buffered_norm2(self: Any, input: Any, buffer_size: int = 250000000) -> Any:
        grads = getattr(self, "_ma_grads", None)
        if grads is None:
            return original(self, input, buffer_size)
        from deepspeed.runtime.zero.utils import get_norm_dtype

        return grads.norm2(input, buffer_size, get_norm_dtype())  # same bits, no fresh copy
    return _constant_buffered_norm2


def _avg_scatter(original: Any) -> Any:
    @functools.wraps(original)
    def __avg_scatter_grads(self: Any, params_to_reduce: Any, communication_data_type: Any) -> Any:
        from deepspeed import comm as dist

        if getattr(self, "_ma_grads", None) is None or \
                dist.get_world_size(group=self._get_param_partition_group(
                    params_to_reduce[0])) != 1:
            return original(self, params_to_reduce, communication_data_type)
        # One rank in the partition group: DeepSpeed 0.19.8's reduce-scatter copies the bucket
        # into a fresh flat buffer, divides it by 1 and reduce-scatters it over that one rank,
        # which gives back the same values. Each gradient itself (a view of the bucket) is
        # its partition; the scalings and dtype changes around it are DeepSpeed's.
        self._assert_same_partition_group(params_to_reduce)
        grads = [p.grad for p in params_to_reduce]
        if communication_data_type != self.dtype:
            grads = [g.to(communication_data_type) for g in grads]
        if self.postscale_gradients and self.gradient_predivide_factor != 1.0:
            grads = [g.div(self.gradient_predivide_factor) for g in grads]
        parts = [g.reshape(-1) for g in grads]
        # DeepSpeed's test is "factor != 1.0 and factor != group size"; the size is 1 here
        if self.postscale_gradients and self.gradient_predivide_factor != 1.0:
            parts = [g.mul(self.gradient_predivide_factor) for g in parts]
        averaging = self._gradient_averaging_world_size(params_to_reduce, 1)
        if averaging != 1:
            parts = [g.mul(1 / float(averaging)) for g in parts]
        if communication_data_type != self.gradient_accumulation_dtype:
            parts = [g.to(self.gradient_accumulation_dtype) for g in parts]
        return parts
    return __avg_scatter_grads
