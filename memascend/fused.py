"""The plain path's optimizer: an exact AdamW step fused into backward, committed at step().

:class:`FusedAdam` receives each parameter's gradient as backward finishes it and does all
host work for it on one worker thread, in the order backward produces them, while backward
goes on: it adds the gradient to what earlier micro-batches accumulated (fp32, in the
optimizer tier as ``g/<name>``) or, in a window's last micro-batch, reads the parameter's Adam
moments (read ahead while the parameter's module ran backward), runs the AdamW update in
place on the pinned buffers the state was read into (:func:`memascend.adam.adamw_update`) and
writes the results behind from the same buffers. In fp32 the parameter is its own master: one
copy, in the parameter tier, read for forward and backward and updated in place. The compute
thread only hands over gradients (and waits when more than ``queue_bytes`` of them are
queued), so on a GPU machine the whole host step overlaps backward.

A fused update is a speculation until :meth:`step`, the commit point: before a parameter's
state is overwritten its old versions are renamed aside in the store (``<key>~``, a journal
record, no I/O), so the window can be undone exactly: when fp16 overflowed (the step is
skipped), when gradient clipping turns out to scale the gradients (the update is redone from
the stored gradients with the clipping coefficient, bitwise as ``clip_grad_norm_`` then
``AdamW``), when ``zero_grad()`` discards the window, or when more micro-batches arrive than
the window was predicted to have. A window runs *deferred* instead (gradients stored in
backward, the update in :meth:`step`, as a two-phase step) when the window length is still
unknown, when clipping is predicted (the previous step clipped), or with ``fused=False``.
:attr:`FusedAdam.counts` says how often each path ran.
"""
from __future__ import annotations

import atexit
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .adam import AdamW, adamw_update
from .errors import MemAscendError
from .overflow import has_inf_or_nan


# Workers still running at interpreter exit finish their jobs and stop before the interpreter
# finalizes (a daemon thread in torch code then aborts the process).
_LIVE: "weakref.WeakSet[FusedAdam]" = weakref.WeakSet()


@atexit.register
def _stop_live_workers() -> None:
    for f in list(_LIVE):
        try:
            f.close(timeout=30.0)
        except Exception:  # best effort at exit
            pass


@dataclass
class _Job:
    """One unit of host work for one parameter, run on the worker thread."""

    kind: str  # "accumulate" | "final" | "update"
    name: str
    grad: Optional[torch.Tensor] = None  # autograd's gradient (compute dtype)
    view: Optional[torch.Tensor] = None  # the resident parameter buffer (fused finals)
    releases: int = 0  # parameter-tier holds this job gives back
    coef: Optional[torch.Tensor] = None  # clipping coefficient (updates from the store)
    nbytes: int = 0
    last: bool = False  # an accumulation that completes the window's gradient (norm it)


@dataclass
class Counts:
    """How often each path of the step ran (windows unless named otherwise)."""

    fused_commits: int = 0       # fused in backward and kept
    rollbacks_clip: int = 0      # fused, undone and redone: clipping scaled the gradients
    rollbacks_overflow: int = 0  # fused, undone: fp16 overflow (step skipped)
    rollbacks_extended: int = 0  # fused, undone: more micro-batches than predicted
    rollbacks_discarded: int = 0  # fused, undone by zero_grad() before step()
    deferred_steps: int = 0      # two-phase: gradients stored in backward, update in step()
    skipped_steps: int = 0       # fp16 overflow
    updates_fused: int = 0       # parameter updates done in backward
    updates_in_step: int = 0     # parameter updates done in step()
    update_seconds: float = 0.0  # in the AdamW kernels (worker thread)
    read_wait_seconds: float = 0.0  # the worker waited for the state's reads
    queue_wait_seconds: float = 0.0  # backward waited for the worker (queue full)
    def to_dict(self) -> dict[str, Any]:
        """The counts as a plain dict."""
        return dict(self.__dict__)


class FusedAdam:
    """See the module docstring. Built and driven by :class:`memascend.offload.OffloadedModel`.

    Parameters
    ----------
    tiers:
        The owner; gives ``params_sw``/``optim_sw`` (swappers), ``param_store``/
        ``optim_store`` (their stores), ``shapes`` and ``compute_dtype``.
    order:
        Parameter names in ``model.parameters()`` order (clipping sums norms in it).
    optimizer:
        AdamW hyper-parameters.
    accumulation_steps:
        Micro-batches per window, or None to learn it from the first window.
    max_grad_norm:
        Clip the global gradient norm to this (``clip_grad_norm_`` semantics), or None.
    fused:
        False: every window is deferred (two-phase).
    queue_bytes:
        Most gradient bytes handed over and not yet processed before backward waits.
    host_threads:
        Threads of the worker's AdamW kernels (its own OpenMP team), or None for torch's
        default.
    """

    def __init__(self, tiers: Any, order: list[str], optimizer: AdamW,
                 accumulation_steps: Optional[int], max_grad_norm: Optional[float],
                 fused: bool, queue_bytes: int, host_threads: Optional[int] = None):
        self.t = tiers
        self.order = order
        self.hp = optimizer
        self.window_len = accumulation_steps
        self.declared = accumulation_steps is not None
        self.max_grad_norm = max_grad_norm
        self.fused = fused
        self.queue_bytes = queue_bytes
        self.host_threads = host_threads
        self.fp32 = tiers.compute_dtype == torch.float32
        self.fp16 = tiers.compute_dtype == torch.float16
        self.steps: dict[str, torch.Tensor] = {n: torch.tensor(0.0) for n in order}
        self.has_state: set[str] = set()
        self.counts = Counts()
        self.last_grad_norm: Optional[float] = None
        self._clipped_last = True  # the first window with clipping runs deferred
        self._q: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._mu = threading.Condition()
        self._queued = 0  # gradient bytes handed over, not yet processed
        self._pending = 0  # jobs not yet processed
        self._error: Optional[BaseException] = None
        self._writes: list[Any] = []
        self._g_writes: dict[str, Any] = {}  # the last write of each g/<name> (worker only)
        self._new_window()
        self._worker = threading.Thread(target=self._run, name="memascend-step", daemon=True)
        self._worker.start()
        _LIVE.add(self)

    # ---- the window ----
    def _new_window(self) -> None:
        self.micro = 0  # backward passes begun in this window
        self.accumulated: set[str] = set()  # gradients stored in g/<name>
        self.updated: dict[str, tuple[float, bool]] = {}  # name -> (old step, had state)
        self.norms: dict[str, torch.Tensor] = {}
        self.overflow = False
        self.mode: Optional[str] = None  # "fused" | "deferred", fixed at the last micro-batch
        self.in_final = False  # the running backward ends the window, fused
        self.deferred_last = False  # the running backward ends the window, deferred
        self.final_done = False  # the fused last backward has run; step() is next
        self.final_sent: set[str] = set()  # parameters with a fused update in this window

    def _keys(self, name: str) -> list[tuple[Any, Any, str]]:
        """(swapper, store, key) of the state an update rewrites."""
        t = self.t
        out = [(t.params_sw, t.param_store, f"p/{name}")]
        if not self.fp32:
            out.append((t.optim_sw, t.optim_store, f"master/{name}"))
        out += [(t.optim_sw, t.optim_store, f"{k}/{name}") for k in ("m", "v")]
        return out

    @property
    def keep_grads(self) -> bool:
        """Whether fused updates also store the final gradients (for a redo or an extension)."""
        return self.max_grad_norm is not None or not self.declared

    @property
    def fusing(self) -> bool:
        """Whether the running backward hands final gradients to fused updates."""
        return self.in_final

    def _reopen(self) -> None:
        """The window goes on past the backward predicted to end it (a forward or backward
        came before step()): undo its fused updates. With a learned window length the stored
        gradients make it a deferred window; with a declared one it is an error."""
        self.wait()
        self._raise_failure()
        names = list(self.updated)
        self._rollback()
        self.counts.rollbacks_extended += 1
        self.final_done = False
        self.final_sent = set()
        if not self.declared:
            self.accumulated |= set(names)
            self.mode = "deferred"
            return
        self._new_window()
        raise MemAscendError(
            f"forward or backward after the last of accumulation_steps={self.window_len} "
            "micro-batches, before step(): the window's fused updates were undone (parameters "
            "and optimizer state are as before the window) and its gradients are gone; call "
            "zero_grad() and redo the micro-batches, or declare the window you use")

    def before_forward(self) -> None:
        """A forward call starts outside backward."""
        self.check()
        if self.final_done:
            self._reopen()

    def begin_backward(self) -> None:
        """A backward pass starts: count the micro-batch and decide whether it ends the window
        (fused, or deferred when the length is unknown, clipping is predicted, fp16 already
        overflowed, or fusing is off)."""
        self.check()
        if self.final_done:
            self._reopen()
        self.micro += 1
        last = self.window_len is not None and self.micro >= self.window_len
        if last and self.mode is None:
            clip_predicted = self.max_grad_norm is not None and self._clipped_last
            fuse = self.fused and not clip_predicted and not self.overflow
            self.mode = "fused" if fuse else "deferred"
        self.in_final = last and self.mode == "fused"
        self.deferred_last = last and self.mode == "deferred"

    def end_backward(self) -> None:
        """The backward pass is over."""
        if self.in_final:
            self.final_done = True
        self.in_final = self.deferred_last = False

    def wants_state(self, name: str) -> list[str]:
        """Optimizer-tier keys worth reading ahead when ``name``'s module starts backward."""
        if not self.in_final or name not in self.has_state:
            return []
        keys = [f"m/{name}", f"v/{name}"]
        if not self.fp32:
            keys.insert(0, f"master/{name}")
        if name in self.accumulated:
            keys.insert(0, f"g/{name}")
        return keys

    # ---- hand-over from backward (compute thread) ----
    def grad_ready(self, name: str, grad: torch.Tensor, view: Optional[torch.Tensor],
                   releases: int) -> None:
        """Take ``name``'s gradient from this backward. In a fused last micro-batch ``view``
        is the parameter's resident buffer, held ``releases`` times for the job to give back.

        Raises
        ------
        MemAscendError
            ``name`` already had its fused update in this window (a gradient arrived after
            it); step() will undo the window.
        """
        self.check()
        if name in self.final_sent:
            err = MemAscendError(
                f"parameter {name!r} received gradient after its fused optimizer update (is "
                "it used outside its own module, or in several reentrant checkpoint "
                "segments?); offload with fused_step=False. The window is undone at step() "
                "or zero_grad()")
            self._error = self._error or err
            raise err
        nbytes = grad.numel() * grad.element_size()
        if self.in_final:
            self.final_sent.add(name)
            self._submit(_Job("final", name, grad, view, releases, nbytes=nbytes))
        else:
            self._submit(_Job("accumulate", name, grad, nbytes=nbytes,
                              last=self.deferred_last))

    def _submit(self, job: _Job) -> None:
        t0 = time.perf_counter()
        with self._mu:
            self._mu.wait_for(lambda: self._queued + job.nbytes <= self.queue_bytes
                              or self._queued == 0 or self._error is not None)
            self.counts.queue_wait_seconds += time.perf_counter() - t0
            self._queued += job.nbytes
            self._pending += 1
        self._q.put(job)

    def check(self) -> None:
        """Raise the worker's first error, if any (the window is then undone at step())."""
        if self._error is not None:
            raise MemAscendError(f"the optimizer's worker failed: {self._error}") \
                from self._error

    def _raise_failure(self) -> None:
        """After :meth:`wait`: undo the window and raise the worker's error, if any."""
        if self._error is None:
            return
        err = self._error
        try:
            self._rollback()
        finally:
            self._error = None
            self._new_window()
        raise MemAscendError(f"the optimizer step failed: {err}") from err

    @property
    def busy(self) -> bool:
        """Whether jobs handed over have not run yet (they hold parameter buffers)."""
        return self._pending > 0

    def drain(self) -> None:
        """Wait until every handed-over job ran (their writes may still be in flight)."""
        with self._mu:
            self._mu.wait_for(lambda: self._pending == 0)

    def wait(self) -> None:
        """Wait until every handed-over job ran and every write it issued completed."""
        with self._mu:
            self._mu.wait_for(lambda: self._pending == 0)
            writes, self._writes = self._writes, []
            self._g_writes = {}
        first = None
        for h in writes:
            try:
                h.wait()
            except BaseException as exc:  # noqa: PERF203 - every write must be waited for
                first = first or exc
        if first is not None and self._error is None:
            self._error = first

    # ---- the worker ----
    def _run(self) -> None:
        if self.host_threads:
            # this thread's own OpenMP team size: the compute thread's is unchanged
            torch.set_num_threads(self.host_threads)
        while True:
            job = self._q.get()
            if job is None:
                return
            try:
                if self._error is None:
                    getattr(self, f"_do_{job.kind}")(job)
            except BaseException as exc:
                exc.__traceback__ = None  # frames would keep pinned views alive
                with self._mu:
                    if self._error is None:
                        self._error = exc
            finally:
                try:
                    for _ in range(job.releases):
                        self.t.params_sw.release(f"p/{job.name}")
                except BaseException as exc:
                    with self._mu:
                        self._error = self._error or exc
                job.grad = job.view = None
                with self._mu:
                    self._queued -= job.nbytes
                    self._pending -= 1
                    self._mu.notify_all()

    def _write(self, sw: Any, key: str, tensor: torch.Tensor, release: bool = True) -> Any:
        h = sw.swap_out(key, tensor, release=release)
        with self._mu:
            self._writes.append(h)
        return h

    def _check_overflow(self, grad: torch.Tensor) -> None:
        if self.fp16 and not self.overflow and has_inf_or_nan(grad):
            self.overflow = True

    def _norm(self, name: str, g32: torch.Tensor) -> None:
        """The gradient's norm for clipping (after fp16 unscaling, as clip_grad_norm_ sees
        it)."""
        if self.max_grad_norm is None:
            return
        g = g32 * (1.0 / self.t.loss_scale) if self.fp16 else g32
        self.norms[name] = torch.linalg.vector_norm(g, 2.0)

    def _g_sum(self, name: str) -> torch.Tensor:
        """The stored gradient sum of ``name``, resident and held, safe to add to in place
        (its previous write, which reads the same buffer, has completed)."""
        h = self._g_writes.pop(name, None)
        if h is not None:
            h.wait()
        return self.t.optim_sw.swap_in(f"g/{name}").wait()

    def _write_g(self, name: str, g: torch.Tensor) -> None:
        self._g_writes[name] = self._write(self.t.optim_sw, f"g/{name}", g)

    def _do_accumulate(self, job: _Job) -> None:
        """Add a micro-batch's gradient to ``g/<name>`` (fp32)."""
        self._check_overflow(job.grad)
        sw, key = self.t.optim_sw, f"g/{job.name}"
        if job.name in self.accumulated:
            acc = self._g_sum(job.name)
            try:
                acc.add_(job.grad)
                if job.last:
                    self._norm(job.name, acc)
                self._write_g(job.name, acc)
            finally:
                del acc
                sw.release(key)
        else:
            if job.last:
                self._norm(job.name, job.grad.float())
            self._write_g(job.name, job.grad)  # converted to fp32 in the buffer
            self.accumulated.add(job.name)

    def _do_final(self, job: _Job) -> None:
        """A fused update in the window's last micro-batch (speculative until step())."""
        n, t = job.name, self.t
        self._check_overflow(job.grad)
        if self.overflow:
            return  # the step will be skipped: nothing to speculate on
        osw, gkey = t.optim_sw, f"g/{n}"
        held: list[str] = []
        try:
            if n in self.accumulated:
                held.append(gkey)
                g = self._g_sum(n)
                g.add_(job.grad)
            else:
                g = job.grad if job.grad.dtype == torch.float32 else job.grad.float()
            self._norm(n, g)
            if self.keep_grads:  # g/n is read again only to redo the window
                self._write_g(n, g)  # held: a write of its own buffer, no copy
                self.accumulated.add(n)
            state = self._acquire_state(n, held)
            # keep the old versions aside (their reads are done or in flight, which hold the
            # extents): the update is a speculation until step()
            for _sw, store, key in self._keys(n):
                if key in store:
                    store.rename(key, key + "~")
            self.updated[n] = (float(self.steps[n]), n in self.has_state)
            master = job.view if self.fp32 else state[f"master/{n}"]
            if self.fp16:  # out of place when g is a buffer being written or cached
                g = g.mul(1.0 / t.loss_scale) if held or self.keep_grads \
                    else g.mul_(1.0 / t.loss_scale)
            self._update(n, master, g, state, job.view)
            self.counts.updates_fused += 1
            del master, state, g
        finally:
            _release(osw, held)
            if gkey in held and not self.keep_grads:
                osw.forget(gkey)  # summed in place, not written: not the stored g/<name>

    def _update(self, n: str, master: torch.Tensor, g: torch.Tensor,
                state: dict[str, torch.Tensor], p_view: torch.Tensor) -> None:
        """AdamW on ``master`` (in place), then write the parameter and the optimizer state
        behind from their own buffers. ``p_view``: the parameter tier's buffer to write (the
        master itself in fp32; a compute-dtype buffer filled from the master; or the master,
        converted by the swapper into a new buffer)."""
        t0 = time.perf_counter()
        adamw_update(master, g, state[f"m/{n}"], state[f"v/{n}"], self.steps[n],
                     lr=self.hp.lr, betas=self.hp.betas, eps=self.hp.eps,
                     weight_decay=self.hp.weight_decay, fused=self.hp.fused)
        self.counts.update_seconds += time.perf_counter() - t0
        if p_view is not master and p_view.dtype != master.dtype:
            p_view.copy_(master)  # the compute-dtype copy, in its own buffer
        self._write(self.t.params_sw, f"p/{n}", p_view, release=False)
        for key, view in state.items():
            self._write(self.t.optim_sw, key, view)
        self.has_state.add(n)

    def _acquire_state(self, n: str, held: list[str]) -> dict[str, torch.Tensor]:
        """The optimizer-tier state of ``n`` resident: read (reads issued together), or
        zero-filled moments on the first update. Each key is appended to ``held`` as soon as
        it is held; the caller releases them."""
        osw = self.t.optim_sw
        keys = ([] if self.fp32 else [f"master/{n}"]) + [f"m/{n}", f"v/{n}"]
        fresh = n not in self.has_state
        handles = []
        for k in keys:
            if fresh and not k.startswith("master/"):
                handles.append((k, None))
            else:
                held.append(k)
                handles.append((k, osw.swap_in(k)))
        out = {}
        for k, h in handles:
            if h is None:
                out[k] = osw.create(k)
                held.append(k)
            else:
                t0 = time.perf_counter()
                out[k] = h.wait()
                self.counts.read_wait_seconds += time.perf_counter() - t0
        return out

    # ---- step() side ----
    def _do_update(self, job: _Job) -> None:
        """A two-phase update from the stored gradient (deferred windows, redone windows)."""
        n, t = job.name, self.t
        osw, gkey = t.optim_sw, f"g/{n}"
        held: list[str] = []
        p_held = False
        try:
            held.append(gkey)
            g = osw.swap_in(gkey).wait()
            if self.fp32:
                p_held = True
                master = t.params_sw.swap_in(f"p/{n}", observe=False).wait()
            state = self._acquire_state(n, held)
            if not self.fp32:
                master = state[f"master/{n}"]
            if self.fp16:
                g.mul_(1.0 / t.loss_scale)
            if job.coef is not None:
                g.mul_(job.coef)
            self._update(n, master, g, state, master)
            self.counts.updates_in_step += 1
            del master, state, g
        finally:
            _release(osw, held)
            if p_held:
                t.params_sw.release(f"p/{n}")
            osw.forget(gkey)  # scaled in place: not the stored g/<name> any more

    def _rollback(self) -> None:
        """Undo this window's fused updates: drop the new resident copies and put the old
        versions back (renames); step counts and moment existence as before."""
        for n, (old_step, had_state) in self.updated.items():
            for sw, store, key in self._keys(n):
                sw.forget(key)
                if key + "~" in store:
                    store.rename(key + "~", key)
                elif key in store:
                    store.delete(key)  # created by the update (the first moments)
            self.steps[n] = torch.tensor(old_step)
            if not had_state:
                self.has_state.discard(n)
        self.updated = {}

    def _commit(self) -> None:
        for n in self.updated:
            for _sw, store, key in self._keys(n):
                if key + "~" in store:
                    store.delete(key + "~")
        self.updated = {}

    def _run_updates(self, names: list[str], coef: Optional[torch.Tensor],
                     prefetch: Callable[[list[str]], None]) -> None:
        prefetch(names[:2])
        for i, n in enumerate(names):
            prefetch(names[i + 2:i + 3])
            self._submit(_Job("update", n, coef=coef))
        self.wait()
        self._raise_failure()

    def step(self, prefetch: Callable[[list[str]], None]) -> bool:
        """Commit the window: finish fused updates or undo them, run deferred updates, clip.
        Returns False when fp16 overflowed (the step is skipped).

        Raises
        ------
        MemAscendError
            The worker failed (the window's fused updates are undone first).
        """
        self.wait()
        self._raise_failure()
        if not self.declared and self.micro:
            self.window_len = self.micro  # learned: the next windows fuse at this length
        if self.fp16 and self.overflow:
            if self.updated:
                self._rollback()
                self.counts.rollbacks_overflow += 1
            self.counts.skipped_steps += 1
            self._new_window()
            return False
        coef, redone = None, False
        if self.max_grad_norm is not None and (self.updated or self.accumulated):
            coef = self._clip_coef()
            clipped = not bool(coef >= 1.0)  # below 1, or nan
            self._clipped_last = clipped
            if not clipped:
                coef = None  # clip_grad_norm_ multiplies by 1.0: the same bits
            elif self.updated:
                redo = list(self.updated)
                self._rollback()
                self.counts.rollbacks_clip += 1
                self.accumulated |= set(redo)
                redone = True
        todo = [n for n in self.order if n in self.accumulated and n not in self.updated]
        if self.updated:
            self.counts.fused_commits += 1
        elif todo and not redone:
            self.counts.deferred_steps += 1
        if todo:
            self._run_updates(todo, coef, prefetch)
        self._commit()
        self._new_window()
        return True

    def _clip_coef(self) -> torch.Tensor:
        """``clip_grad_norm_``'s coefficient for this window's gradients (bitwise its math)."""
        names = [n for n in self.order if n in self.norms or n in self.accumulated]
        for n in names:
            if n not in self.norms:  # a deferred window whose last micro-batch was early
                g = self.t.optim_sw.swap_in(f"g/{n}", observe=False).wait()
                try:
                    self._norm(n, g)
                finally:
                    del g
                    self.t.optim_sw.release(f"g/{n}")
        if not names:
            return torch.tensor(1.0)
        total = torch.linalg.vector_norm(torch.stack([self.norms[n] for n in names]), 2.0)
        self.last_grad_norm = float(total)
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def discard(self) -> None:
        """zero_grad() in the middle of a window: undo fused updates, forget gradients."""
        self.wait()
        self._error = None
        if self.updated:
            self._rollback()
            self.counts.rollbacks_discarded += 1
        self._new_window()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the worker (after the jobs handed over). Idempotent."""
        if self._worker.is_alive():
            self._q.put(None)
            self._worker.join(timeout)


def _release(sw: Any, keys: list[str]) -> None:
    """Give back held keys; a key whose read failed is no longer held (nothing to give)."""
    for key in keys:
        try:
            sw.release(key)
        except ValueError:
            pass
