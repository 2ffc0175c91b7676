"""The activation tier: tensors autograd saves for backward, kept off RAM until backward.

With activation checkpointing, what a forward leaves for backward is each checkpointed
layer's inputs (and, outside checkpointed regions, what the remaining ops save, such as the
loss's log-probabilities); without it, every op's saved tensors. :class:`ActivationTier`
takes them through saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``), which
both kinds of ``torch.utils.checkpoint`` use for their inputs, so no model code changes:

- ``mode="ssd"``: a saved tensor is copied into a pinned buffer and written to a scratch swap
  store (``acts.swp``) behind the forward; the buffer stays as a clean cache until the budget
  needs it. When backward unpacks a tensor, the tensors saved before it (backward's next
  ones: its order is the reverse of forward's) are read ahead into the budget, and its own
  pieces are read and copied out to a tensor of the same size and strides. A tensor larger
  than a quarter of the budget goes in pieces, so any size fits any budget.
- ``mode="pinned"``: the saved tensor is copied into an exact-size pinned lease and copied
  back in backward (on a machine with a GPU: activations leave GPU memory for host memory,
  what DeepSpeed's ``cpu_checkpointing`` does); ``budget`` caps the pinned bytes.

Values are copied bit for bit and strides kept, so results are bitwise those of the same run
without the tier. Not moved: tensors under ``min_bytes``, parameters and views of them (the
parameter tier re-derives those), tensor subclasses and quantized tensors, tensors that are
not dense (a slice with gaps), and tensors saved inside backward (a checkpoint's
recomputation, used at once). A tensor saved twice (same memory, same version) is stored
once. A stored tensor is deleted when autograd drops
it (after its node ran in backward, or when the graph is freed); the deletion is done by the
tier's next call (:meth:`ActivationTier.collect`), never on the thread that dropped it.
The store is scratch (``durable=False``, ``journal=False``, ``reset=True``): nothing of it is
in a checkpoint,
and a write that fails (a full disk) raises :class:`~memascend.errors.SwapIOError` naming the
tier, the tensor and its size at the next save or at the unpack that needs it.
"""
from __future__ import annotations

import bisect
import errno as errno_mod
import math
import os
import threading
import weakref
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from .config import parse_size
from .errors import ConfigError, MemAscendError, PoolExhaustedError, SwapIOError
from .extents import round_up
from .module_hooks import in_backward
from .pool import PinnedPool
from .sizing import ACTIVATION_DEFAULT_BUDGET
from .store import SwapStore
from .swapper import TensorSwapper

MODES = ("ssd", "pinned")
DEFAULT_BUDGET = ACTIVATION_DEFAULT_BUDGET
MIN_BYTES = 256 << 10  # smaller saved tensors stay where they are: not worth a request


@dataclass(frozen=True)
class ActivationStats:
    """Counters of an :class:`ActivationTier` (bytes are tensor bytes).

    ``saved`` / ``saved_bytes``: tensors moved to the tier; ``kept``: saved tensors left
    where they were (small, parameters, not dense, saved inside backward); ``shared``: saves
    that reused a tensor already in the tier; ``restored`` / ``restored_bytes``: tensors
    copied back from the tier; ``reused``: unpacks that returned a tensor restored before and
    still alive (a shared save); ``written_bytes`` / ``read_bytes``: bytes written to and
    read back from the store (``ssd`` mode; a tensor still in pinned memory when backward
    wants it is not read, one evicted before use is read twice); ``live_bytes`` /
    ``peak_live_bytes``: bytes the tier holds for graphs now and at most; ``pinned_bytes``:
    pinned bytes the tier holds now.
    """

    mode: str
    saved: int
    saved_bytes: int
    written_bytes: int
    kept: int
    shared: int
    restored: int
    reused: int
    restored_bytes: int
    read_bytes: int
    live_bytes: int
    peak_live_bytes: int
    pinned_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict."""
        return asdict(self)


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t``'s elements fill ``[storage_offset, storage_offset + numel)`` exactly
    (any order of dimensions), so its memory can be copied as one flat run."""
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expect = 1
    for st, sz in dims:
        if st != expect:
            return False
        expect *= sz
    return True


def _flat(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's memory as a 1-D view, in memory order."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


class _Saved:
    """What autograd holds instead of a tensor the tier took (its pack result)."""

    __slots__ = ("tier", "seq", "keys", "size", "stride", "dtype", "device", "nbytes",
                 "lease", "out", "keep", "uses", "unpacks", "dead", "__weakref__")

    def __init__(self, tier: "ActivationTier", seq: int, t: torch.Tensor):
        self.tier = tier
        self.seq = seq
        self.keys: list[tuple[str, int, int]] = []  # (key, first element, elements)
        self.size = tuple(t.shape)
        self.stride = tuple(t.stride())
        self.dtype = t.dtype
        self.device = t.device
        self.nbytes = t.numel() * t.element_size()
        self.lease: Any = None
        self.out: Any = None  # weak ref to the last unpacked tensor (a shared save reuses it)
        self.keep: Any = None  # the unpacked tensor, while saves sharing it have yet to unpack
        self.uses = 1  # saves that returned this object
        self.unpacks = 0
        self.dead = False  # autograd dropped it: to be deleted, never to be shared again

    def describe(self) -> str:
        return (f"saved tensor #{self.seq} ({tuple(self.size)}, "
                f"{str(self.dtype).replace('torch.', '')}, {self.nbytes} bytes)")

    def __del__(self) -> None:
        # Appending resurrects the object, and CPython clears weak references only after a
        # finalizer that did not resurrect: the tier's weak references to it stay valid, so
        # ``dead`` is what keeps a later save from sharing it (its bytes are being deleted).
        self.dead = True
        tier = self.tier
        if tier is not None:
            tier._dead.append(self)


class ActivationTier:
    """Saved tensors of forward in pinned memory or on SSD until backward (see the module
    docstring).

    Use :meth:`saving` around a forward (``offload_model(..., activations=...)`` does it
    around the model's forward); backward needs nothing. Works with any training loop,
    DeepSpeed's too, as long as the forward runs inside :meth:`saving`.

    Parameters
    ----------
    mode:
        ``"ssd"`` or ``"pinned"``.
    swap_dir:
        Folder of the scratch store ``acts.swp`` (``ssd`` mode).
    budget:
        Pinned bytes the tier holds at once (default 64 MiB): in ``ssd`` mode the buffers
        of writes, the clean cache and the read-ahead; in ``pinned`` mode every saved tensor.
    engine:
        The :class:`~memascend.engine.SwapEngine` of the store (default: its own).
    overflow_pool:
        Where a buffer comes from when the tier's arena is too fragmented (counted).
    min_bytes:
        Saved tensors smaller than this stay where they are (default 256 KiB).

    Raises
    ------
    ConfigError
        Unknown mode, a budget under 64 KiB, or ``swap_dir`` missing in ``ssd`` mode.
    """

    def __init__(self, mode: str, swap_dir: Optional[str] = None, *,
                 budget: Any = DEFAULT_BUDGET, engine: Any = None,
                 overflow_pool: Optional[PinnedPool] = None, min_bytes: int = MIN_BYTES):
        if mode not in MODES:
            raise ConfigError("activations", f"must be one of {list(MODES)} or None, "
                                             f"got {mode!r}")
        self.mode = mode
        self.budget = parse_size("activation_budget", budget)
        if self.budget < (64 << 10):
            raise ConfigError("activation_budget", f"must be at least 64 KiB, got "
                                                   f"{self.budget}")
        if mode == "ssd" and not swap_dir:
            raise ConfigError("swap_dir", "the ssd activation tier needs a folder")
        self.min_bytes = int(min_bytes)
        self.piece_bytes = max(4096, (self.budget // 4) // 4096 * 4096)
        self._lock = threading.RLock()
        self._dead: deque[_Saved] = deque()  # appended by any thread (deque is atomic)
        self._live: dict[int, Any] = {}  # seq -> weak ref to the saved, until collected
        self._order: list[int] = []  # live seqs, ascending (forward order)
        self._same: dict[tuple, tuple[Any, int, Any]] = {}  # memory -> (base ref, version,
        self._seq = 0                                      #   saved ref)
        self._queued: set[str] = set()  # keys queued for read-ahead (each once)
        # writes in flight, oldest first: (seq, description, key, handle); no reference to
        # the saved object, which must die with the graph
        self._writes: deque[tuple[int, str, str, Any]] = deque()
        self._c = dict(saved=0, saved_bytes=0, kept=0, shared=0, restored=0, reused=0,
                       restored_bytes=0, live_bytes=0, peak_live_bytes=0)
        self._hooks: list[Any] = []
        self.store: Optional[SwapStore] = None
        self.swapper: Optional[TensorSwapper] = None
        self._closed = False
        # ssd: the budget plus a piece as slack against fragmentation (as the other tiers'
        # arenas); pinned: the budget is the cap
        arena = round_up(self.budget + (self.piece_bytes if mode == "ssd" else 0))
        self.pool = PinnedPool(lock="auto", arena_bytes=arena, large_threshold=arena,
                               retain_bytes=arena, limit_bytes=arena)
        # the store's bounce buffers (for unaligned memory; the tier writes leases) and the
        # buffers a fragmented arena cannot place (counted): mapped only if used
        self._bounce, self._own_bounce = overflow_pool, None
        if mode == "ssd":
            try:
                if self._bounce is None:
                    self._own_bounce = self._bounce = PinnedPool(lock="auto")
                self.store = SwapStore(os.path.join(swap_dir, "acts.swp"), engine=engine,
                                       pool=self._bounce, durable=False, journal=False,
                                       reset=True)
                self.swapper = TensorSwapper(self.store, pool=self.pool,
                                             budget_bytes=self.budget, plan_prefetch=False,
                                             overflow_pool=self._bounce)
            except BaseException:
                self.close()
                raise
        self.path = self.store.path if self.store is not None else "pinned memory"

    # ---- the hooks ----
    def saving(self) -> torch.autograd.graph.saved_tensors_hooks:
        """A context manager: tensors saved for backward inside it go to the tier."""
        return torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def push(self) -> None:
        """Enter :meth:`saving` (pair with :meth:`pop`; e.g. from module hooks)."""
        ctx = self.saving()
        ctx.__enter__()
        self._hooks.append(ctx)

    def pop(self) -> None:
        """Leave the latest :meth:`push`."""
        self._hooks.pop().__exit__(None, None, None)

    def _keep(self, t: torch.Tensor) -> bool:
        # tensor subclasses (parameters among them) and quantized tensors carry more than
        # their bytes; views of parameters are the parameter tier's
        if (type(t) is not torch.Tensor or t.layout != torch.strided or t.is_quantized
                or t.numel() * t.element_size() < self.min_bytes
                or isinstance(t._base, torch.nn.Parameter) or t.is_meta or in_backward()):
            return True
        try:
            t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage (e.g. a functional tensor)
            return True
        return not _dense(t)

    def _pack(self, t: torch.Tensor) -> Any:
        if self._closed or self._keep(t):
            with self._lock:
                self._c["kept"] += 1
            return t.detach()
        self.collect()
        base = t._base if t._base is not None else t
        ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), self._flatsig(t),
                 t.dtype)
        with self._lock:
            hit = self._same.get(ident)
            if hit is not None:
                ref, version, saved_ref = hit
                saved = saved_ref()
                if (ref() is base and version == t._version and saved is not None
                        and not saved.dead):
                    self._c["shared"] += 1
                    saved.uses += 1
                    return saved
            self._seq += 1
            saved = _Saved(self, self._seq, t)
        try:
            self._store(saved, t.detach())
        except BaseException:
            saved.tier = None  # nothing to delete
            self._forget_keys(saved)
            raise
        with self._lock:
            self._same[ident] = (weakref.ref(base), t._version, weakref.ref(saved))
            self._live[saved.seq] = weakref.ref(saved)
            self._order.append(saved.seq)
            c = self._c
            c["saved"] += 1
            c["saved_bytes"] += saved.nbytes
            c["live_bytes"] += saved.nbytes
            c["peak_live_bytes"] = max(c["peak_live_bytes"], c["live_bytes"])
        return saved

    @staticmethod
    def _flatsig(t: torch.Tensor) -> tuple:
        return (tuple(t.shape), tuple(t.stride()))

    def _store(self, saved: _Saved, t: torch.Tensor) -> None:
        if t.device.type != "cpu":
            t = t.to("cpu")  # host copy of a device tensor (GPU path: a side-stream copy)
        flat = _flat(t)
        if self.mode == "pinned":
            try:
                saved.lease = self.pool.lease(saved.nbytes)
            except PoolExhaustedError as e:
                raise PoolExhaustedError(
                    f"activation tier (pinned memory): {saved.describe()} does not fit in "
                    f"the budget of {self.budget} bytes ({self._c['live_bytes']} bytes held "
                    f"for {len(self._live)} saved tensors); raise activation_budget or use "
                    f"activations='ssd'", nbytes=saved.nbytes, reason="budget") from e
            saved.lease.as_tensor(t.dtype, (t.numel(),)).copy_(flat)
            return
        per = max(1, self.piece_bytes // t.element_size())
        sw, what = self.swapper, saved.describe()
        for i in range(math.ceil(t.numel() / per)):
            key, start = f"a/{saved.seq}/{i}", i * per
            n = min(per, t.numel() - start)
            saved.keys.append((key, start, n))
            try:
                sw.register(key, (n,), t.dtype)
                h = sw.swap_out(key, flat[start:start + n], release=False)
            except SwapIOError as e:
                raise self._error(what, key, e) from e
            with self._lock:
                self._writes.append((saved.seq, what, key, h))
        self._check_writes()

    def _error(self, what: str, key: str, e: SwapIOError) -> SwapIOError:
        return SwapIOError(e.errno or errno_mod.EIO,
                           f"activation tier ({self.path}): storing {what} "
                           f"failed: {e.strerror or e}", path=e.path or self.path,
                           offset=e.offset, nbytes=e.nbytes, key=key)

    def _check_writes(self, upto: Optional[_Saved] = None) -> None:
        """Raise the first failed write among the finished ones (all of ``upto``'s: waits
        for them)."""
        while True:
            with self._lock:
                if not self._writes:
                    return
                seq, what, key, h = self._writes[0]
                if not h.done() and (upto is None or seq > upto.seq):
                    return
                self._writes.popleft()
            exc = h.exception()
            if exc is not None and seq in self._live:
                raise self._error(what, key, exc if isinstance(exc, SwapIOError)
                                  else SwapIOError(errno_mod.EIO, str(exc)))

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, _Saved):
            return saved
        if saved.tier is not self or self._closed:
            raise MemAscendError(f"activation tier ({self.path}) is closed: cannot restore "
                                 f"{saved.describe()}")
        if saved.dead or (self.mode == "ssd" and not saved.keys) or \
                (self.mode == "pinned" and saved.lease is None):
            raise MemAscendError(f"activation tier ({self.path}): {saved.describe()} was "
                                 "deleted before backward needed it")
        self.collect()
        saved.unpacks += 1
        if saved.out is not None:
            out = saved.out()
            if out is not None:  # unpacked before and still alive (a save shared by two ops)
                if saved.unpacks >= saved.uses:
                    saved.keep = None
                with self._lock:
                    self._c["reused"] += 1
                return out
        out = torch.empty_strided(saved.size, saved.stride, dtype=saved.dtype, device="cpu")
        dst = _flat(out)
        if self.mode == "pinned":
            dst.copy_(saved.lease.as_tensor(saved.dtype, (dst.numel(),)))
        else:
            self._read(saved, dst)
        if saved.device.type != "cpu":
            out = out.to(saved.device)
        saved.out = weakref.ref(out)
        # a save shared by several ops is unpacked by each, usually one right after the
        # other in backward: keep the tensor until the last of them has it (one read)
        saved.keep = out if saved.unpacks < saved.uses else None
        with self._lock:
            self._c["restored"] += 1
            self._c["restored_bytes"] += saved.nbytes
        return out

    def _read(self, saved: _Saved, dst: torch.Tensor) -> None:
        sw = self.swapper
        self._check_writes(upto=saved)
        for j, (key, start, n) in enumerate(saved.keys):
            self._read_ahead(saved, j + 1)
            view = sw.swap_in(key, observe=False).result()
            try:
                dst[start:start + n].copy_(view)
            finally:
                sw.release(key)
            del view
            sw.forget(key)  # copied out: its buffer serves the next read-ahead at once

    def _read_ahead(self, saved: _Saved, piece: int) -> None:
        """Queue reads of what backward wants next, up to half the budget: ``saved``'s
        pieces from ``piece`` on, then the live tensors saved before it, nearest first (the
        other half serves the piece being read and the pieces being copied). Each key is
        queued once; one evicted before its use is read on demand."""
        keys, room = [], self.budget // 2
        with self._lock:
            def take(s: _Saved, pieces: list[tuple[str, int, int]]) -> bool:
                nonlocal room
                for key, _, n in pieces:
                    if room <= 0:
                        return False
                    room -= n * s.dtype.itemsize
                    if key not in self._queued:
                        self._queued.add(key)
                        keys.append(key)
                return True

            if take(saved, saved.keys[piece:]):
                i = bisect.bisect_left(self._order, saved.seq)
                while i > 0:
                    i -= 1
                    ref = self._live.get(self._order[i])
                    s = ref() if ref is not None else None
                    if s is None or s.unpacks or s.dead:  # restored already (backward's
                        continue                # order is only roughly forward's reversed)
                    if not take(s, list(reversed(s.keys))):
                        break
        if keys:
            self.swapper.prefetch(keys)

    # ---- lifetime ----
    def collect(self) -> None:
        """Delete the tensors autograd has dropped (their pinned buffers and stored bytes)."""
        while self._dead:
            try:
                saved = self._dead.popleft()
            except IndexError:
                break
            with self._lock:
                if self._live.pop(saved.seq, None) is not None:
                    i = bisect.bisect_left(self._order, saved.seq)
                    if i < len(self._order) and self._order[i] == saved.seq:
                        del self._order[i]
                    self._c["live_bytes"] -= saved.nbytes
                if not self._live:
                    self._same.clear()
            self._forget_keys(saved)

    def _forget_keys(self, saved: _Saved) -> None:
        if saved.lease is not None:
            saved.lease.release()
            saved.lease = None
        if self.swapper is not None and not self._closed:
            for key, _, _ in saved.keys:
                self.swapper.discard(key)
                self._queued.discard(key)
        saved.keys = []

    def stats(self) -> ActivationStats:
        """A snapshot of the counters (see :class:`ActivationStats`)."""
        with self._lock:
            c = dict(self._c)
        if self.swapper is not None:
            s = self.swapper.stats()
            moved, pinned = (s.bytes_written, s.bytes_read), s.pinned_bytes
        else:
            moved, pinned = (0, 0), self.pool.stats().in_use
        return ActivationStats(mode=self.mode, written_bytes=moved[0], read_bytes=moved[1],
                               pinned_bytes=pinned, **c)

    def close(self) -> None:
        """Give back every buffer and close the store (its file stays). Saved tensors still
        held by a graph can no longer be restored. Idempotent."""
        if self._closed:
            return
        self.collect()
        self._closed = True
        for obj in (self.swapper, self.store):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        with self._lock:
            for ref in self._live.values():
                saved = ref()
                if saved is not None and saved.lease is not None:
                    saved.lease.release()
                    saved.lease = None
            self._live.clear()
            self._order.clear()
            self._same.clear()
        for pool in (self.pool, self._own_bounce):
            if pool is not None:
                try:
                    pool.close()
                except Exception:  # a view still alive (e.g. in a traceback): unmapped later
                    pass


class _RootHooks:
    """Pushes a tier's hooks around a module's forward (not inside backward, not without
    grad), however deeply its forward calls nest."""

    def __init__(self, tier: ActivationTier):
        self.tier = tier
        self.pushed: list[bool] = []

    def pre(self, module: Any, args: Any) -> None:
        push = torch.is_grad_enabled() and not in_backward() and not self.tier._closed
        if push:
            self.tier.push()
        self.pushed.append(push)

    def post(self, module: Any, args: Any, output: Any) -> None:
        if self.pushed and self.pushed.pop():
            self.tier.pop()


def attach(tier: ActivationTier, module: torch.nn.Module) -> list[Any]:
    """Make ``module``'s forward save into ``tier``; the hook handles (to remove them). The
    pre-hook goes first and the forward hook last, so that hooks other code pushes inside
    the forward (the parameter tier's) sit above the tier's and see saved tensors first."""
    hooks = _RootHooks(tier)
    return [module.register_forward_pre_hook(hooks.pre, prepend=True),
            module.register_forward_hook(hooks.post, always_call=True)]
