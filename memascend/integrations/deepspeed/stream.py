"""Streamed optimizer steps for ZeRO-3 sub-groups on NVMe: pieces, never whole sub-groups.

Stock ZeRO-Infinity swaps a whole sub-group in for its optimizer step (fp32 master,
gradient, exp_avg and exp_avg_sq) into ``buffer_count`` pinned buffers, each the size of the
largest sub-group (4 x 1e9 x 4 B at the defaults), and DeepSpeedCPUAdam creates the Adam
state with full-size ``zeros_like`` on the first step. Adam is elementwise, so
:class:`StreamingOptimizerSwapper` stores each swapped sub-group as fixed pieces of
``optimizer_chunk`` bytes per tensor (keys ``{ds_id}/master/{k}``, ``/m/{k}``, ``/v/{k}`` in
the tier's one swap area) and steps it piece by piece through a budgeted
:class:`~memascend.swapper.TensorSwapper`: the next pieces are read ahead, finished ones
written behind, new state is zero-filled one piece at a time. Gradients are not swapped: stage
3 keeps every gradient partition in its flat buffer until the step, and each piece copies its
slice from there; or, with ``stream_grads``, :mod:`.grads` has written them as pieces
``{ds_id}/g/{k}`` during backward and the step reads each with its master and moments. The
updated master is converted into the compute-dtype parameters as each
piece finishes (a parameter on NVMe is staged whole in the compute dtype, then written).

Pieces start at multiples of the piece size within the sub-group, and DeepSpeed's Adam
kernel computes its bias correction once per step number, so the results are bitwise those of
a whole-sub-group step. The step count of each sub-group is kept in memory and stored as a
small key in the same area when the area is exported, so it survives a checkpoint.
:mod:`.stage3` routes stage 3's per-sub-group calls here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from deepspeed.runtime.swap_tensor.utils import MIN_AIO_BYTES
from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

from ...adam import adamw_update
from ...errors import MemAscendError
from ...sizing import ma_stream_tier_budget
from ...state_io import acquire_state, release_held
from ...swapper import TensorSwapper
from .grads import zero_outside
from .optim import _StoreBacked

_STEP_NUMEL = 512  # the step key: one 4 KiB int64 tensor, element 0 is the count


@dataclass
class _Part:
    """One parameter partition inside a sub-group: where its elements are."""

    param: Any  # the compute-dtype parameter (its ``ds_tensor`` is the partition)
    offset: int
    numel: int


def _is_ds_cpu_adam(optimizer: Any) -> bool:
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except ImportError:  # pragma: no cover - DeepSpeed without its Adam module
        return False
    return isinstance(optimizer, DeepSpeedCPUAdam)


def can_stream(optimizer: Any, dtype: Any) -> Optional[str]:
    """None if the streamed step supports this optimizer, else why not. Supported:
    DeepSpeedCPUAdam with fp32 state, and ``torch.optim.AdamW`` (single-tensor, ``foreach``
    or ``fused``, each through torch's own kernel of that form; no amsgrad, no maximize) -
    the updates whose math is elementwise."""
    if dtype != torch.float32:
        return f"master weights are {dtype}, not float32"
    if _is_ds_cpu_adam(optimizer):
        if not getattr(optimizer, "fp32_optimizer_states", True):
            return "DeepSpeedCPUAdam keeps its state in the parameter dtype"
        return None
    if type(optimizer) is torch.optim.AdamW:
        for g in optimizer.param_groups:
            for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
                if g.get(flag):
                    return f"torch AdamW with {flag}=True"
        return None
    return f"the optimizer is {type(optimizer).__name__} (streamed: DeepSpeedCPUAdam, AdamW)"


def _adam_update(optimizer: Any, group: dict[str, Any], step: int, master: Any, grad: Any,
                 m: Any, v: Any) -> None:
    """One elementwise Adam(W) update of a piece, as the whole-sub-group step computes it."""
    beta1, beta2 = group["betas"]
    if _is_ds_cpu_adam(optimizer):
        optimizer.ds_opt_adam.adam_update(optimizer.opt_id, step, group["lr"], beta1, beta2,
                                          group["eps"], group["weight_decay"],
                                          group["bias_correction"], master, grad, m, v)
        return
    step_t = torch.tensor(float(step - 1))  # the functional form adds one
    adamw_update(master, grad, m, v, step_t, lr=group["lr"], betas=(beta1, beta2),
                 eps=group["eps"], weight_decay=group["weight_decay"],
                 fused=bool(group.get("fused")), foreach=bool(group.get("foreach")))


class StreamingOptimizerSwapper(_StoreBacked):
    """Stage 3's optimizer swapper, streaming each sub-group in pieces (module docstring).

    Same constructor as DeepSpeed's optimizer swappers. Stage 3's calls that would hold a
    whole sub-group (``swap_in_optimizer_state`` and friends) are not served: the hooks in
    :mod:`.stage3` call :meth:`step_group` and :meth:`write_params` instead.
    """

    def __init__(self, swap_config, aio_config, base_folder, optimizer, largest_numel, device,
                 dtype, timers):
        self.aio_handle = self._open_store(swap_config, aio_config, base_folder)
        self.swap_folder = self._live_folder
        self.swap_config, self.aio_config = swap_config, aio_config
        self.optimizer = optimizer
        self.dtype = dtype
        self.largest_numel = largest_numel
        self.min_aio_bytes = max(MIN_AIO_BYTES, int(aio_config["block_size"]))
        opts = self.rt.options
        self.piece_numel = opts.optimizer_chunk // 4
        budget = ma_stream_tier_budget(opts.optimizer_chunk, opts.optimizer_budget)
        self.sw = TensorSwapper(self.store, pool=self.rt.pool, budget_bytes=budget,
                                plan_prefetch=False)
        self._numel: dict[str, int] = {}  # ds_id -> sub-group numel
        self._steps: dict[str, int] = {}  # ds_id -> steps taken (the step keys, or newer)
        self._unwritten_steps: set[str] = set()  # changed since the area last held them
        self.grads: Any = None  # the GradPieces stage 3 writes gradients through, if any
        self.rt.optimizer_streams = True  # fast init reads partitions itself (params.py)

    # ---- what stage 3 asks of every optimizer swapper ----
    def is_swappable_tensor(self, tensor: Any = None, numel: Optional[int] = None) -> bool:
        """DeepSpeed's rule: a tensor of at least ``max(1 MiB, aio block_size)`` bytes."""
        if tensor is not None:
            if not getattr(tensor, "swappable", True):
                return False
            numel = tensor.numel()
        if numel is None:
            raise MemAscendError("is_swappable_tensor needs a tensor or a numel")
        return numel * 4 >= self.min_aio_bytes

    def init_timers(self) -> None:  # noqa: D102 - DeepSpeed's timers: nothing to set up
        pass

    def log_timers(self) -> None:  # noqa: D102
        pass

    def pre_backward(self) -> None:  # noqa: D102 - no gradient swapper to flush
        pass

    def post_backward(self) -> None:  # noqa: D102
        pass

    def swap_out_gradients(self, parameter: Any, gradient_offsets: Any,
                           gradient_tensors: Any) -> None:
        """Nothing to write: the streamed step reads gradients from stage 3's flat buffer."""

    def purge_state(self) -> None:
        """Nothing to purge: the state lives in the swap area (and is replaced on import)."""

    def _whole(self, what: str) -> None:
        raise MemAscendError(f"{what}: memascend streams optimizer sub-groups in pieces and "
                             "never swaps one in whole; set \"memascend\": "
                             "{\"stream_optimizer\": false} for this DeepSpeed feature")

    def swap_in_optimizer_state(self, parameter: Any, async_parameter: Any = None) -> None:  # noqa: D102
        self._whole("swap_in_optimizer_state")

    def swap_out_optimizer_state(self, parameter: Any, async_swap: bool = False) -> None:  # noqa: D102
        self._whole("swap_out_optimizer_state")

    def release_swap_buffers(self, parameter: Any) -> None:  # noqa: D102
        self._whole("release_swap_buffers")

    def writeback_optimizer_state_and_gradients(self, *args: Any, **kwargs: Any) -> None:  # noqa: D102
        self._whole("writeback_optimizer_state_and_gradients")

    # ---- pieces ----
    def _pieces(self, numel: int) -> list[tuple[int, int]]:
        p = self.piece_numel
        return [(a, min(p, numel - a)) for a in range(0, numel, p)]

    def _key(self, ds_id: str, kind: str, k: int) -> str:
        return f"{ds_id}/{kind}/{k}"

    def _register(self, ds_id: str, numel: int) -> None:
        self._numel[ds_id] = numel
        opts = self.rt.options
        self.sw.limit_budget(ma_stream_tier_budget(  # small models: within their state
            opts.optimizer_chunk, opts.optimizer_budget, sum(self._numel.values()),
            max(self._numel.values())))
        for k, (_, n) in enumerate(self._pieces(numel)):
            for kind in ("master", "m", "v"):
                self.sw.register(self._key(ds_id, kind, k), (n,), torch.float32)

    def _write_masters(self, ds_id: str, numel: int, fill: Callable[[int, Any], None]) -> None:
        """Write a sub-group's fp32 master, piece by piece: ``fill(start, dst)`` fills a
        piece tensor with the elements from ``start`` on. The Adam state starts afresh."""
        self.finish_import()
        self._register(ds_id, numel)
        for kind in ("m", "v"):
            for k in range(len(self._pieces(numel))):
                if self._key(ds_id, kind, k) in self.store:
                    self.store.delete(self._key(ds_id, kind, k))
        self._set_step(ds_id, 0)
        handles = []
        for k, (a, n) in enumerate(self._pieces(numel)):
            piece = torch.empty(n, dtype=torch.float32)
            fill(a, piece)
            handles.append(self.sw.swap_out(self._key(ds_id, "master", k), piece))
            del piece
        for h in handles:
            h.wait()

    def initialize_parameters(self, parameters: list[Any], src_tensors: list[Any]) -> None:
        """Write each fp32 sub-group from its source tensor (any dtype), in pieces."""
        for param, src in zip(parameters, src_tensors):
            flat = src.reshape(-1)
            self._write_masters(str(param.ds_id), flat.numel(),
                                lambda a, dst, flat=flat: dst.copy_(flat.narrow(0, a,
                                                                               dst.numel())))

    def initialize_from_swapped_fp16_params(self, fp16_partitions_info: list[Any],
                                            fp16_num_elems: list[int], fp16_pinned_buffers: Any,
                                            fp32_parameters: list[Any]) -> None:
        """DeepSpeed's fast init: each sub-group's fp32 master from its compute-dtype
        partitions (read from the parameter tier one at a time), in pieces."""
        for info, numel, param in zip(fp16_partitions_info, fp16_num_elems, fp32_parameters):
            parts: list[tuple[int, int, Any, Optional[str]]] = []
            offset = 0
            for partitioned, n, path in info:
                parts.append((offset, int(n), partitioned, path))
                offset += int(n)
            cache: dict[int, Any] = {}

            def source(i: int, parts: list = parts, cache: dict = cache) -> Any:
                if i not in cache:
                    cache.clear()
                    _, n, partitioned, path = parts[i]
                    if path is None:
                        cache[i] = partitioned.data.reshape(-1)
                    else:
                        found = self.rt.store_for(path)
                        if found is None:
                            raise MemAscendError(f"fast init: {path} is in no memascend area")
                        store, key = found
                        cache[i] = store.read_tensor(key).wait().reshape(-1)[:n]
                return cache[i]

            def fill(a: int, dst: Any, parts: list = parts,
                     source: Callable = source) -> None:
                end = a + dst.numel()
                dst.zero_()
                for i, (o, n, _, _) in enumerate(parts):
                    lo, hi = max(a, o), min(end, o + n)
                    if lo < hi:
                        dst.narrow(0, lo - a, hi - lo).copy_(source(i).narrow(0, lo - o, hi - lo))

            self._write_masters(str(param.ds_id), int(numel), fill)
            cache.clear()

    # ---- the step count (a key, so that it travels with checkpoints) ----
    def _step_of(self, ds_id: str) -> int:
        if ds_id not in self._steps:
            key = f"{ds_id}/step"
            if key in self.store:
                self._steps[ds_id] = int(self.store.read_tensor(key).wait()[0])
            else:
                self._steps[ds_id] = 0
        return self._steps[ds_id]

    def _set_step(self, ds_id: str, step: int) -> None:
        """The sub-group's step count, in memory; it reaches the area when the area is
        exported (:meth:`_write_steps`), so a step writes no metadata of its own."""
        self._steps[ds_id] = step
        self._unwritten_steps.add(ds_id)

    def _write_steps(self) -> None:
        """Store the step counts changed since the last export (before an export)."""
        handles = []
        for ds_id in sorted(self._unwritten_steps):
            t = torch.zeros(_STEP_NUMEL, dtype=torch.int64)
            t[0] = self._steps[ds_id]
            handles.append(self.store.write(f"{ds_id}/step", t))
        for h in handles:
            h.wait()
        self._unwritten_steps.clear()

    # ---- the step ----
    def step_group(self, ds_id: str, parts: list[_Part],
                   grad_of: Optional[Callable[[int, Any], None]], inv_scale: Any,
                   group: dict[str, Any], lp_out: "ParamWriter",
                   next_ds_id: Optional[str] = None) -> None:
        """One Adam step of sub-group ``ds_id``, piece by piece.

        ``grad_of(start, dst)`` fills a piece with the gradient from ``start`` on (None:
        the gradient pieces ``{ds_id}/g/{k}`` in the area, read ahead with the rest);
        ``inv_scale`` multiplies it first (unscaling and clipping, as stage 3 does on a
        whole sub-group); ``lp_out`` receives each updated master piece.
        """
        self.finish_import()
        numel = self._numel.get(ds_id)
        if numel is None:
            raise MemAscendError(f"optimizer sub-group {ds_id} was never initialized")
        step = self._step_of(ds_id) + 1
        fresh = step == 1 or self._key(ds_id, "m", 0) not in self.store
        pieces = self._pieces(numel)

        def keys(k: int) -> list[str]:
            kinds = ("master",) if fresh else ("master", "m", "v")
            out = [self._key(ds_id, kind, k) for kind in kinds]
            if grad_of is None and self._key(ds_id, "g", k) in self.store:
                out.append(self._key(ds_id, "g", k))
            return out

        grad_lease = self.rt.lease(min(self.piece_numel, numel) * 4)
        try:
            self.sw.prefetch([key for k in range(min(2, len(pieces))) for key in keys(k)])
            for k, (a, n) in enumerate(pieces):
                if k + 2 < len(pieces):
                    self.sw.prefetch(keys(k + 2))
                elif next_ds_id is not None and k + 2 == len(pieces) and \
                        next_ds_id in self._numel:
                    self.sw.prefetch([self._key(next_ds_id, "master", 0)])
                grad = grad_lease.as_tensor(torch.float32, n)
                self._grad(ds_id, k, a, grad, grad_of, inv_scale)
                mk, m_k, v_k = (self._key(ds_id, kind, k) for kind in ("master", "m", "v"))
                held: list[str] = []
                state: dict[str, Any] = {}
                try:
                    state = acquire_state(self.sw, (mk, m_k, v_k), held,
                                          fresh=(m_k, v_k) if fresh else ())
                    _adam_update(self.optimizer, group, step, state[mk], grad, state[m_k],
                                 state[v_k])
                    lp_out.piece(parts, a, state[mk])
                    for key, t in state.items():
                        self.sw.swap_out(key, t)  # write-behind from its own buffer, no copy
                    del grad, t
                finally:
                    state.clear()  # no view may outlive its release, on an error either
                    release_held(self.sw, held)
        finally:
            self.rt.free(grad_lease)
        self.sw.wait_idle(self.sw.config.wait_timeout)
        lp_out.finish()
        self._set_step(ds_id, step)

    def _grad(self, ds_id: str, k: int, start: int, dst: Any,
              grad_of: Optional[Callable[[int, Any], None]], inv_scale: Any) -> None:
        """Piece ``k``'s gradient times ``inv_scale`` into ``dst``: from ``grad_of``, or
        from the gradient piece in the area (:mod:`.grads`; zeros if none was written)."""
        if grad_of is not None:
            grad_of(start, dst)
            dst.mul_(inv_scale)
            return
        key = self._key(ds_id, "g", k)
        if key not in self.store:
            dst.zero_()
            return
        try:
            torch.mul(self.sw.swap_in(key).wait(), inv_scale, out=dst)
        finally:
            self.sw.release(key)
        self.sw.forget(key)  # the next backward rewrites it; its buffer serves other pieces

    def write_params(self, ds_id: str, parts: list[_Part], lp_out: "ParamWriter") -> None:
        """Convert the stored fp32 master of ``ds_id`` into its compute-dtype parameters
        (after a checkpoint load: stage 3's ``reset_swap_buffers``)."""
        self.finish_import()
        numel = self._numel.get(ds_id)
        if numel is None:
            raise MemAscendError(f"optimizer sub-group {ds_id} was never initialized")
        pieces = self._pieces(numel)
        self.sw.prefetch([self._key(ds_id, "master", k) for k in range(len(pieces))])
        for k, (a, _) in enumerate(pieces):
            master = self.sw.swap_in(self._key(ds_id, "master", k)).wait()
            lp_out.piece(parts, a, master)
            del master
            self.sw.release(self._key(ds_id, "master", k))
        lp_out.finish()

    # ---- checkpoints and lifecycle ----
    def export_for_checkpoint(self) -> str:
        """Finish the write-behind, store the step counts, then export the area (see
        :class:`._StoreBacked`)."""
        self.sw.wait_idle(self.sw.config.wait_timeout)
        self._write_steps()
        return super().export_for_checkpoint()

    def finish_import(self) -> None:
        """Import a pending checkpoint; resident pieces and cached step counts are stale."""
        pending = self._import_pending
        super().finish_import()
        if pending and not self._import_pending:
            self.sw.drop_resident()
            self._steps.clear()
            self._unwritten_steps.clear()

    def stats(self) -> dict[str, Any]:
        """The streamed tier's swapper counters (bytes and counts); with streamed gradients,
        also ``grad_pieces`` (:meth:`.grads.GradPieces.stats`)."""
        out = self.sw.stats().to_dict()
        if self.grads is not None:
            out["grad_pieces"] = self.grads.stats()
        return out


class ParamWriter:
    """Takes updated fp32 master pieces and writes them into the compute-dtype parameters:
    in place for a partition held in memory, else through a staging lease per partition on
    NVMe, written when its last element has arrived (at most two writes in flight)."""

    def __init__(self) -> None:
        self._staged: dict[int, tuple[Any, Any, Any]] = {}  # id(param) -> (swapper, lease, t)
        self._inflight: list[tuple[Any, Any]] = []

    def piece(self, parts: list[_Part], start: int, master: Any) -> None:
        """Copy ``master`` (the sub-group's elements from ``start`` on) into the
        parameters it covers."""
        end = start + master.numel()
        for part in parts:
            lo, hi = max(start, part.offset), min(end, part.offset + part.numel)
            if lo >= hi:
                continue
            src = master.narrow(0, lo - start, hi - lo)
            ds = part.param.ds_tensor
            if ds.status == PartitionedParamStatus.AVAILABLE:
                ds.data.reshape(-1).narrow(0, lo - part.offset, hi - lo).copy_(src)
                continue
            entry = self._staged.get(id(part.param))
            if entry is None:
                swapper = part.param.nvme_swapper
                if not hasattr(swapper, "stage_partition"):
                    raise MemAscendError("a parameter on NVMe is not in a memascend parameter "
                                         "swapper; enable memascend for both tiers")
                lease, staged = swapper.stage_partition(part.param)
                entry = self._staged[id(part.param)] = (swapper, lease, staged)
            entry[2].narrow(0, lo - part.offset, hi - lo).copy_(src)
            if hi == part.offset + part.numel:
                self._write(part.param)

    def _write(self, param: Any) -> None:
        swapper, lease, staged = self._staged.pop(id(param))
        try:
            h = swapper.write_staged(param, lease, staged)
        except BaseException:
            swapper.rt.free(lease)
            raise
        self._inflight.append((h, (swapper, lease)))
        if len(self._inflight) > 2:
            self._drain(1)

    def _drain(self, count: int) -> None:
        first = None
        for _ in range(min(count, len(self._inflight))):
            h, (swapper, lease) = self._inflight.pop(0)
            try:
                h.wait()
            except BaseException as exc:  # noqa: B036 - re-raised after the rest drained
                first = first or exc
            finally:
                swapper.rt.free(lease)
        if first is not None:
            raise first

    def finish(self) -> None:
        """Wait for every write; a partition left incomplete is an error (a bug)."""
        left = list(self._staged)
        for key in left:
            swapper, lease, _ = self._staged.pop(key)
            swapper.rt.free(lease)
        self._drain(len(self._inflight))
        if left:
            raise MemAscendError(f"{len(left)} parameter partitions were not fully written")


def parts_of(stage3: Any, sub_group_id: int) -> list[_Part]:
    """Where each parameter partition of a sub-group lies in its flat fp32 master (the
    layout stage 3 writes back from: consecutive ``ds_tensor.ds_numel`` runs)."""
    parts, offset = [], 0
    for param, partitioned in zip(stage3.fp16_groups[sub_group_id],
                                  stage3.fp16_partitioned_groups[sub_group_id]):
        n = int(partitioned.ds_numel)
        parts.append(_Part(param, offset, n))
        offset += n
    return parts


def grad_reader(stage3: Any, sub_group_id: int) -> Callable[[int, Any], None]:
    """``fill(start, dst)``: the sub-group's flat fp32 gradient from ``start`` on, gathered
    from stage 3's per-parameter gradient partitions (zeros where no parameter lies)."""
    views = stage3._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
    spans = []
    for param in stage3.fp16_groups[sub_group_id]:
        _, offset, numel = stage3.grad_position[stage3.get_param_id(param)]
        spans.append((int(offset), int(numel), views[param.ds_id]))

    def fill(start: int, dst: Any) -> None:
        end = start + dst.numel()
        covered = 0
        for offset, numel, view in spans:
            lo, hi = max(start, offset), min(end, offset + numel)
            if lo < hi:
                dst.narrow(0, lo - start, hi - lo).copy_(view.narrow(0, lo - offset, hi - lo))
                covered += hi - lo
        if covered != dst.numel():  # alignment padding: no gradient span covers it
            zero_outside(dst, start, [(offset, numel) for offset, numel, _ in spans])
    return fill


def combined_inv_scale(stage3: Any, total_norm: Any) -> Any:
    """``1 / combined_scale`` exactly as stage 3's ``unscale_and_clip_grads`` computes it."""
    combined_scale = stage3.loss_scale
    if stage3.clip_grad > 0.:
        clip = ((total_norm / stage3.loss_scale) + 1e-6) / stage3.clip_grad
        clip = torch.clamp(clip, min=1.0)
        combined_scale = clip * stage3.loss_scale
    return 1. / combined_scale


__all__ = ["StreamingOptimizerSwapper", "ParamWriter", "can_stream", "parts_of",
           "grad_reader", "combined_inv_scale"]
