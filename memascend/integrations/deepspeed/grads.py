"""Stage 3's gradient partitions for streamed sub-groups, kept as pieces in the swap area.

With ``offload_optimizer``, stage 3 allocates one flat buffer for the gradient partition of
every parameter (``grad_partitions_flat_buffer``: the whole model in the gradient
accumulation dtype, pinned), copies each reduced gradient into it during backward and reads
it at the step. For the sub-groups the streamed optimizer steps, :class:`GradPieces`
replaces that buffer with pieces of the sub-group's flat gradient, laid out like its master
and Adam state (keys ``{ds_id}/g/{k}``, ``optimizer_chunk`` bytes each). A gradient that
arrives is handed to stage 3's own ``partition_grads`` (so the norm, the accumulation and its
dtype are DeepSpeed's): a float32 partition that lies inside one piece is written straight
into it; any other goes to a temporary the size of that one partition and is then copied into
the pieces it covers. The norm stage 3 takes of each partition is computed in one float64
scratch kept for the backward pass, not a fresh copy per partition
(:meth:`GradPieces.norm2`). A piece is written straight from its lease (no staging copy) as
soon as every parameter in it has arrived, with at most ``MAX_INFLIGHT`` writes in flight.
At most ``MAX_OPEN`` pieces are open at once: when more are needed the oldest is written
while incomplete and read back when its next parameter comes (elements nobody wrote keep
their stored value, as they keep their old value in stage 3's buffer). With gradient
accumulation, a piece of a later micro-step starts from the stored sum. The step then reads
each gradient piece with the piece's master and moments (:meth:`.stream.
StreamingOptimizerSwapper.step_group`). Parameters of other sub-groups keep views into a flat
buffer that holds only them. The fp16 overflow flag is taken on every partition as it
arrives (the fused check), so no full-size scan is needed at the step.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ...errors import MemAscendError
from ...overflow import has_inf_or_nan
from ...sizing import GRAD_PIECES_OPEN

MAX_OPEN = GRAD_PIECES_OPEN  # open gradient pieces (optimizer_chunk bytes each) in backward
MAX_INFLIGHT = GRAD_PIECES_OPEN  # pieces being written (straight from their leases)


class GradViews(dict):
    """Stage 3's ``param ds_id -> gradient partition`` map. Streamed parameters are in it
    only while their gradient is being accumulated; asking for one at another time is an
    error that says why (instead of a KeyError deep inside DeepSpeed)."""

    streamed: frozenset = frozenset()

    def __missing__(self, ds_id: Any) -> Any:
        if ds_id in self.streamed:
            raise MemAscendError(
                f"the gradient partition of parameter ds_id={ds_id} is in the swap area "
                "(memascend streams gradients of swapped sub-groups); set \"memascend\": "
                "{\"stream_grads\": false} for DeepSpeed features that read it directly")
        raise KeyError(ds_id)


@dataclass
class _Piece:
    lease: Any
    t: Any  # fp32 view of the lease, the piece's elements
    covered: set = field(default_factory=set)  # ds_ids written in this micro-step
    loaded: bool = False  # filled from the store at open (else only its gaps were zeroed)


@dataclass
class _Span:
    ds_id: Any
    group: int  # sub-group index
    offset: int  # elements into the sub-group's flat gradient
    numel: int


class GradPieces:
    """The gradient pieces of one stage-3 optimizer (module docstring).

    ``swapper`` is its :class:`~.stream.StreamingOptimizerSwapper` (store, budgeted
    swapper, piece size); ``streamed`` the indices of the sub-groups it steps.
    """

    def __init__(self, swapper: Any, streamed: list[int]) -> None:
        self.osw = swapper
        self.groups = set(streamed)
        self.n = swapper.piece_numel
        self._lease_numel = self.n  # a piece lease: a piece, or the largest sub-group if less
        self._spans: Optional[dict[Any, _Span]] = None  # ds_id -> where
        self._need: dict[tuple[int, int], frozenset] = {}  # (group, k) -> ds_ids in it
        self._group_key: dict[int, str] = {}  # group -> ds_id of its fp32 flat (key prefix)
        self._open: "OrderedDict[tuple[int, int], _Piece]" = OrderedDict()
        self._written: set[tuple[int, int]] = set()  # pieces written this micro-step
        self._window: Optional[tuple[int, int]] = None  # (steps, micro_step_id)
        # key -> (handle, lease) of piece writes in flight
        self._inflight: "OrderedDict[str, tuple[Any, Any]]" = OrderedDict()
        self._spare: list[Any] = []  # piece-sized leases free for reuse in this backward
        self._temp: Any = None  # the partition temporary's lease
        self._norm_buf: Any = None  # the gradient norm's float64 scratch (a tensor)
        self.steps = 0  # stage 3 steps begun (the _pre_step hook counts)
        self.overflow = False
        self.counts = {"pieces_written": 0, "partial_writes": 0, "base_reads": 0,
                       "partitions": 0, "partitions_in_piece": 0}

    # ---- layout ----
    def _layout(self, stage3: Any) -> None:
        spans: dict[Any, _Span] = {}
        need: dict[tuple[int, int], set] = {}
        for i in sorted(self.groups):
            self._group_key[i] = str(stage3.fp32_partitioned_groups_flat[i].ds_id)
            for param in stage3.fp16_groups[i]:
                real = param.partition_numel() * stage3._get_param_partition_rank(param) < \
                    param.ds_numel
                if not real:  # all padding on this rank: zeros, like stage 3's buffer
                    continue
                _, offset, numel = stage3.grad_position[stage3.get_param_id(param)]
                spans[param.ds_id] = _Span(param.ds_id, i, int(offset), int(numel))
                for k in range(int(offset) // self.n, (int(offset) + int(numel) - 1) // self.n + 1):
                    need.setdefault((i, k), set()).add(param.ds_id)
        self._need = {key: frozenset(v) for key, v in need.items()}
        self._spans = spans
        # small sub-groups: a piece lease no larger than the largest of them (locked memory
        # stays within the gradients it holds)
        self._lease_numel = max((min(self.n, int(stage3.fp16_partitioned_groups_flat_numel[i]))
                                 for i in self.groups), default=self.n)

    def covers(self, ds_id: Any) -> bool:
        """True if this parameter's gradient goes to the pieces (needs the layout built)."""
        return self._spans is not None and ds_id in self._spans

    def key(self, group: int, k: int) -> str:
        """The store key of gradient piece ``k`` of sub-group ``group``."""
        return f"{self._group_key[group]}/g/{k}"

    def _piece_numel(self, group_numel: int, k: int) -> int:
        return min(self.n, group_numel - k * self.n)

    # ---- windows: micro-steps and steps ----
    def _enter(self, stage3: Any) -> None:
        window = (self.steps, int(stage3.micro_step_id))
        if window == self._window:
            return
        self.flush()
        self._written.clear()
        if self._window is None or window[0] != self._window[0]:
            self.overflow = False  # a new accumulation window
        self._window = window

    # ---- pieces ----
    def _open_piece(self, stage3: Any, group: int, k: int, accumulate: bool) -> _Piece:
        pk = (group, k)
        p = self._open.get(pk)
        if p is not None:
            self._open.move_to_end(pk)
            return p
        while len(self._open) >= MAX_OPEN:
            old = next(iter(self._open))
            self._close(old)
        numel = self._piece_numel(int(stage3.fp16_partitioned_groups_flat_numel[group]), k)
        lease = self._spare.pop() if self._spare else self.osw.rt.lease(self._lease_numel * 4)
        t = lease.as_tensor(torch.float32, numel)
        key = self.key(group, k)
        loaded = pk in self._written or (accumulate and key in self.osw.store)
        if loaded:
            self._load(key, t)  # written this micro-step (maybe still in flight), or a sum
        else:  # the spans will overwrite the rest; a span that never comes is zeroed at close
            self._zero_except(pk, t, self._need.get(pk, frozenset()))
        p = self._open[pk] = _Piece(lease, t, loaded=loaded)
        return p

    def _zero_except(self, pk: tuple[int, int], t: Any, ds_ids: Any) -> None:
        """Zero the elements of piece ``pk`` (tensor ``t``) outside the spans of ``ds_ids``."""
        spans = self._spans or {}
        zero_outside(t, pk[1] * self.n, [(spans[d].offset, spans[d].numel) for d in ds_ids])

    def _load(self, key: str, dst: Any) -> None:
        """Read the stored piece ``key`` into ``dst`` (after its own write, if in flight)."""
        self._settle(key)
        self.osw.store.read(key, dst).wait(self.osw.sw.config.wait_timeout)
        self.counts["base_reads"] += 1

    def _settle(self, key: str) -> None:
        """Wait for the write of ``key`` if one is in flight; its lease becomes spare."""
        entry = self._inflight.pop(key, None)
        if entry is not None:
            h, lease = entry
            try:
                h.wait(self.osw.sw.config.wait_timeout)  # a failed write raises here
            finally:
                self._spare.append(lease)

    def _close(self, pk: tuple[int, int]) -> None:
        p = self._open.pop(pk)
        try:
            complete = p.covered >= self._need.get(pk, frozenset())
            key = self.key(*pk)
            if not complete and pk not in self._written and key in self.osw.store:
                self._keep_stored(pk, p)  # elements nobody wrote keep their stored value
            elif not complete and not p.loaded:  # nothing stored: the missing spans are zeros
                self._zero_except(pk, p.t, p.covered)
            if not complete:
                self.counts["partial_writes"] += 1
            self._written.add(pk)
            self._settle(key)  # an earlier write of the same piece finishes first
            self.osw.sw.forget(key)  # a copy the step read is stale from now on
            numel = p.t.numel()
            del p.t
            h = self.osw.store.write(key, p.lease, nbytes=numel * 4, dtype="float32",
                                     shape=(numel,))
        except BaseException:
            self._spare.append(p.lease)
            raise
        self._inflight[key] = (h, p.lease)  # written straight from the piece, no copy
        self.counts["pieces_written"] += 1
        while len(self._inflight) > MAX_INFLIGHT:
            self._settle(next(iter(self._inflight)))

    def _keep_stored(self, pk: tuple[int, int], p: _Piece) -> None:
        group, k = pk
        old_lease = self._spare.pop() if self._spare else self.osw.rt.lease(self._lease_numel * 4)
        try:
            old = old_lease.as_tensor(torch.float32, p.t.numel())
            self._load(self.key(group, k), old)
            start = k * self.n
            for ds_id in self._need[pk] - p.covered:
                s = self._spans[ds_id]
                lo, hi = max(start, s.offset), min(start + p.t.numel(), s.offset + s.numel)
                p.t.narrow(0, lo - start, hi - lo).copy_(old.narrow(0, lo - start, hi - lo))
            del old
        finally:
            self._spare.append(old_lease)

    def _pieces_of(self, s: _Span) -> range:
        return range(s.offset // self.n, (s.offset + s.numel - 1) // self.n + 1)

    def flush(self) -> None:
        """Write every open piece and wait for the writes (the end of a backward pass)."""
        try:
            while self._open:
                self._close(next(iter(self._open)))
            while self._inflight:
                self._settle(next(iter(self._inflight)))
        finally:
            self._free_scratch()

    def _free_scratch(self) -> None:
        """Give the piece leases, the partition temporary and the norm scratch back (end of
        a backward)."""
        self._norm_buf = None
        spare, self._spare = self._spare, []
        if self._temp is not None:
            spare.append(self._temp)
            self._temp = None
        for lease in spare:
            self.osw.rt.free(lease)

    def _temp_lease(self, nbytes: int) -> Any:
        """The partition temporary, grown to ``nbytes`` when needed and kept for the rest
        of the backward pass (one exact-size lease per size reached, not per partition)."""
        if self._temp is not None and self._temp.size < nbytes:
            self.osw.rt.free(self._temp)
            self._temp = None
        if self._temp is None:
            self._temp = self.osw.rt.lease(nbytes)
        return self._temp

    def norm2(self, x: Any, buffer_size: int, dtype: Any) -> Any:
        """Stage 3's ``_constant_buffered_norm2`` (the 2-norm of ``x`` in ``dtype``, summed
        over ``buffer_size`` parts), with each part converted into one scratch tensor kept for
        the backward pass instead of a fresh ``dtype`` copy per partition: with glibc's mmap
        threshold fixed (:mod:`memascend.heap`) every fresh copy is mapped and faulted in.
        The norm kernel runs on the same values in the same dtype, so the result has the same
        bits. Parts over ``self.n`` elements (a piece) take a fresh copy, as in stage 3."""
        norm = None
        for part in x.view(-1).split(buffer_size):
            if part.dtype == dtype or part.numel() > self.n:
                conv = part.data.to(dtype)
            else:
                if self._norm_buf is None or self._norm_buf.dtype != dtype or \
                        self._norm_buf.numel() < part.numel():
                    self._norm_buf = None  # the old scratch goes before the new one comes
                    self._norm_buf = torch.empty(part.numel(), dtype=dtype)
                conv = self._norm_buf.narrow(0, 0, part.numel())
                conv.copy_(part.data)
            sq = conv.norm(2) ** 2.0
            if norm is None:
                norm = sq
            else:
                norm += sq
        return norm ** 0.5

    # ---- stage 3's partition_grads, for streamed parameters ----
    def partition(self, stage3: Any, original: Callable, params: list[Any],
                  grad_partitions: list[Any]) -> list[Any]:
        """Run stage 3's ``partition_grads`` one parameter at a time; a streamed one gets a
        temporary partition that is then copied into its pieces."""
        if self._spans is None:
            self._layout(stage3)
        self._enter(stage3)
        accumulate = int(stage3.micro_step_id) != 0
        fp16 = stage3.dtype == torch.float16  # stage 3 checks overflow only then
        dtype = stage3.gradient_accumulation_dtype
        esize = torch.empty(0, dtype=dtype).element_size()
        buffers = []
        for param, grad in zip(params, grad_partitions):
            s = self._spans.get(param.ds_id)
            if s is None:
                buffers.extend(original(stage3, [param], [grad]) or [])
                continue
            if dtype == torch.float32 and len(self._pieces_of(s)) == 1:
                self._partition_in_piece(stage3, original, param, grad, s, accumulate, fp16)
                continue
            temp = self._temp_lease(s.numel * esize).as_tensor(dtype, s.numel)
            if accumulate:
                self._gather(stage3, s, temp)
            self._run_stage3(stage3, original, param, grad, temp, fp16)
            self._scatter(stage3, s, temp, accumulate)
            del temp
        return buffers

    def _run_stage3(self, stage3: Any, original: Callable, param: Any, grad: Any, dst: Any,
                    fp16: bool) -> None:
        """Stage 3's ``partition_grads`` for one parameter, with ``dst`` as its gradient
        partition; then the fused overflow check on it."""
        views = stage3._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
        views[param.ds_id] = dst
        try:
            original(stage3, [param], [grad])
        finally:
            del views[param.ds_id]
        if fp16 and not self.overflow and has_inf_or_nan(dst):
            self.overflow = True
        self.counts["partitions"] += 1

    def _partition_in_piece(self, stage3: Any, original: Callable, param: Any, grad: Any,
                            s: _Span, accumulate: bool, fp16: bool) -> None:
        """A float32 partition inside one piece: stage 3 writes (or adds) it straight into
        the piece, with no temporary and no second copy."""
        k = s.offset // self.n
        pk = (s.group, k)
        p = self._open_piece(stage3, s.group, k, accumulate)
        self._run_stage3(stage3, original, param, grad,
                         p.t.narrow(0, s.offset - k * self.n, s.numel), fp16)
        p.covered.add(s.ds_id)
        self.counts["partitions_in_piece"] += 1
        if p.covered >= self._need[pk]:
            self._close(pk)

    def _gather(self, stage3: Any, s: _Span, temp: Any) -> None:
        for k in self._pieces_of(s):
            p = self._open_piece(stage3, s.group, k, accumulate=True)
            lo, hi, a = self._overlap(s, k, p)
            temp.narrow(0, lo - s.offset, hi - lo).copy_(p.t.narrow(0, lo - a, hi - lo))

    def _scatter(self, stage3: Any, s: _Span, temp: Any, accumulate: bool) -> None:
        for k in self._pieces_of(s):
            pk = (s.group, k)
            p = self._open_piece(stage3, s.group, k, accumulate)
            lo, hi, a = self._overlap(s, k, p)
            p.t.narrow(0, lo - a, hi - lo).copy_(temp.narrow(0, lo - s.offset, hi - lo))
            p.covered.add(s.ds_id)
            if p.covered >= self._need[pk]:
                self._close(pk)

    def _overlap(self, s: _Span, k: int, p: _Piece) -> tuple[int, int, int]:
        a = k * self.n
        return max(a, s.offset), min(a + p.t.numel(), s.offset + s.numel), a

    def stats(self) -> dict[str, int]:
        """Counters: partitions taken (of them written straight into a piece), pieces
        written (of them incomplete), base reads, and the norm scratch's current bytes."""
        buf = self._norm_buf
        return dict(self.counts,
                    norm_scratch_bytes=0 if buf is None else buf.numel() * buf.element_size())


def zero_outside(dst: Any, start: int, ranges: Any) -> None:
    """Zero the elements of ``dst`` (a sub-group's flat elements from ``start`` on) that lie
    outside every ``(offset, numel)`` range; ranges may overlap or miss ``dst``."""
    end = start + dst.numel()
    pos = start
    for lo, hi in sorted((max(start, o), min(end, o + n)) for o, n in ranges):
        if lo >= hi:
            continue
        if lo > pos:
            dst.narrow(0, pos - start, lo - pos).zero_()
        pos = max(pos, hi)
    if pos < end:
        dst.narrow(0, pos - start, end - pos).zero_()


def setup_buffers(stage3: Any, grads: GradPieces) -> None:
    """The end of stage 3's ``_setup_for_real_optimizer`` (DeepSpeed 0.19.8) with the flat
    gradient buffer holding only the parameters of sub-groups that are not streamed."""
    from deepspeed.accelerator import get_accelerator

    if stage3.contiguous_gradients:
        for dtype, bucket in stage3.ipg_buckets.items():
            bucket.buffer = torch.empty(stage3.reduce_bucket_size, dtype=dtype,
                                        device=get_accelerator().current_device_name())
    kept = [p for i, group in enumerate(stage3.fp16_groups) if i not in grads.groups
            for p in group]
    streamed = [p.ds_id for i in grads.groups for p in stage3.fp16_groups[i]]
    flat = torch.zeros(sum(p.partition_numel() for p in kept),
                       dtype=stage3.gradient_accumulation_dtype, device=stage3.device)
    if stage3.offload_optimizer_pin_memory and flat.numel():
        flat = get_accelerator().pin_memory(flat)
    views = GradViews()
    views.streamed = frozenset(streamed)
    offset = 0
    for param in kept:
        views[param.ds_id] = flat.narrow(0, offset, param.partition_numel())
        offset += param.partition_numel()
    stage3.grad_partitions_flat_buffer = flat
    stage3._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition = views


__all__ = ["GradPieces", "GradViews", "setup_buffers", "zero_outside", "MAX_OPEN"]
