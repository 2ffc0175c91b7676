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
backward, the update after :meth:`step`, as a two-phase step) when the window length is still
unknown, when clipping is predicted (the previous step clipped), or with ``fused=False``.
The updates that :meth:`step` starts from stored gradients (deferred and redone windows) run
on the worker while the next forward goes on (``overlap=True``): each module's forward waits
only for its own parameters' updates (:meth:`await_updates`), in the order forward uses them.
They are speculative too (old versions renamed aside) and are settled together, before the
next backward or anything else that reads the state (:meth:`settle`): committed, or, when one
failed, the whole step is undone and the error raised. :attr:`FusedAdam.counts` says how often
each path ran. What the worker thread does for one
parameter is in :mod:`memascend.update_jobs`; this module holds the window: when it ends,
which path it takes, and its commit or undo.
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

from .adam import AdamW
from .errors import MemAscendError
from .update_jobs import UpdateJobs, Job


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
    updates_in_step: int = 0     # parameter updates from stored gradients (deferred, redone)
    steps_undone: int = 0        # steps whose updates failed after step() returned: undone
    update_seconds: float = 0.0  # in the AdamW kernels (worker thread)
    read_wait_seconds: float = 0.0  # the worker waited for the state's reads
    queue_wait_seconds: float = 0.0  # backward waited for the worker (queue full)
    forward_wait_seconds: float = 0.0  # forward waited for the step's updates
    def to_dict(self) -> dict[str, Any]:
        """The counts as a plain dict."""
        return dict(self.__dict__)


class FusedAdam(UpdateJobs):
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
    overlap:
        Updates from stored gradients run behind :meth:`step`, overlapping the next forward
        (False: the owner settles them right after :meth:`step`).
    exact_undo:
        True: old versions are kept aside until the commit (see the module docstring).
        False: each update is committed as it is made, so the swap areas hold the state once
        (about 1.1x) instead of twice during a step. Nothing can be undone then: windows with
        clipping or fp16 run deferred (the clipping coefficient and an overflow are known
        before any update), a forward or backward after a window's fused last micro-batch
        and ``zero_grad()`` before ``step()`` are errors, and an update that fails leaves the
        step partly applied (the error names how many parameters it updated).
    """

    def __init__(self, tiers: Any, order: list[str], optimizer: AdamW,
                 accumulation_steps: Optional[int], max_grad_norm: Optional[float],
                 fused: bool, queue_bytes: int, host_threads: Optional[int] = None,
                 overlap: bool = True, exact_undo: bool = True):
        self.t = tiers
        self.order = order
        self.hp = optimizer
        self.window_len = accumulation_steps
        self.declared = accumulation_steps is not None
        self.max_grad_norm = max_grad_norm
        self.fused = fused
        self.queue_bytes = queue_bytes
        self.host_threads = host_threads
        self.overlap = overlap
        self.undo = exact_undo
        self.fp32 = tiers.compute_dtype == torch.float32
        self.fp16 = tiers.compute_dtype == torch.float16
        self.steps: dict[str, torch.Tensor] = {n: torch.tensor(0.0) for n in order}
        self.has_state: set[str] = set()
        self.counts = Counts()
        self.last_grad_norm: Optional[float] = None
        self._clipped_last = True  # the first window with clipping runs deferred
        self._q: "queue.Queue[Optional[Job]]" = queue.Queue()
        self._mu = threading.Condition()
        self._queued = 0  # gradient bytes handed over, not yet processed
        self._pending = 0  # jobs not yet processed
        self._error: Optional[BaseException] = None
        self._writes: list[Any] = []
        self._g_writes: dict[str, Any] = {}  # the last write of each g/<name> (worker only)
        self._running: Optional[dict[str, tuple[float, bool]]] = None  # a step's updates
        self._lazy: set[str] = set()  # parameters whose update from step() has not run yet
        self._awaiting: Optional[set[str]] = None  # what the compute thread waits for
        self._await_seq = 0  # waits begun by the compute thread
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
        return [(t.params_sw, t.param_store, f"p/{name}")] + \
            [(t.optim_sw, t.optim_store, key) for key in self.optim_keys(name)]

    def optim_keys(self, name: str) -> list[str]:
        """``name``'s keys in the optimizer tier that an update reads and rewrites: its fp32
        master when the compute dtype is not fp32, then m and v."""
        return ([] if self.fp32 else [f"master/{name}"]) + [f"m/{name}", f"v/{name}"]

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
        if not self.undo:
            n = len(names)
            self._commit(self.updated)
            self._new_window()
            raise MemAscendError(
                "forward or backward after the last micro-batch of the window, before step(): "
                f"with exact_undo=False its {n} fused updates were committed as they were "
                "made and cannot be undone; call step() after the last micro-batch (declare "
                "accumulation_steps to match your loop)")
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
        self.settle()
        self.check()
        if self.final_done:
            self._reopen()
        self.micro += 1
        last = self.window_len is not None and self.micro >= self.window_len
        if last and self.mode is None:
            self.mode = "fused" if self._would_fuse() else "deferred"
        self.in_final = last and self.mode == "fused"
        self.deferred_last = last and self.mode == "deferred"

    def _would_fuse(self) -> bool:
        """Whether a window's last backward starting now would fuse its updates."""
        clip_predicted = self.max_grad_norm is not None and self._clipped_last
        # without undo, fuse only where nothing could need undoing: no clipping, no fp16
        undoable = self.undo or (self.max_grad_norm is None and not self.fp16)
        return self.fused and not clip_predicted and not self.overflow and undoable

    def expects_fused_backward(self) -> bool:
        """Whether the next backward is expected to end a fused window, with no update of
        the last step still to run (a forward's read-ahead of moments can then only help).
        A guess: begin_backward() decides."""
        with self._mu:
            if self._lazy:
                return False
        if self.final_done or self.window_len is None or self.micro + 1 < self.window_len:
            return False
        return self.mode == "fused" or (self.mode is None and self._would_fuse())

    def end_backward(self) -> None:
        """The backward pass is over."""
        if self.in_final:
            self.final_done = True
        self.in_final = self.deferred_last = False

    def wants_state(self, name: str) -> list[str]:
        """Optimizer-tier keys worth reading ahead when ``name``'s module starts backward."""
        if not self.in_final:
            return []
        keys = self.state_keys(name)
        if keys and name in self.accumulated:
            keys.insert(0, f"g/{name}")
        return keys

    def state_keys(self, name: str) -> list[str]:
        """``name``'s stored optimizer state (master when not fp32, m, v); none before its
        first update."""
        return self.optim_keys(name) if name in self.has_state else []

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
            self._submit(Job("final", name, grad, view, releases, nbytes=nbytes))
        else:
            self._submit(Job("accumulate", name, grad, nbytes=nbytes,
                              last=self.deferred_last))

    def _submit(self, job: Job) -> None:
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
            self.settle()  # a step's update failed: undo the step, raise
            raise MemAscendError(f"the optimizer's worker failed: {self._error}") \
                from self._error

    def _raise_failure(self) -> None:
        """After :meth:`wait`: undo the window and raise the worker's error, if any."""
        if self._error is None:
            return
        err = self._error
        applied = len(self.updated)
        try:
            if self.undo:
                self._rollback()
            else:
                self._commit(self.updated)
        finally:
            self._error = None
            self._new_window()
        if not self.undo:
            raise MemAscendError(f"the optimizer step failed after {applied} of "
                                 f"{len(self.order)} parameters were updated and committed "
                                 "(exact_undo=False): the model is part way through the step; "
                                 f"load the last checkpoint: {err}") from err
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

    # ---- step() side ----
    def _rollback(self, updated: Optional[dict[str, tuple[float, bool]]] = None) -> None:
        """Undo updates (this window's fused ones by default): drop the new resident copies
        and put the old versions back (renames); step counts and moment existence as
        before."""
        updated = self.updated if updated is None else updated
        for n, (old_step, had_state) in updated.items():
            for sw, store, key in self._keys(n):
                sw.forget(key)
                if key + "~" in store:
                    store.rename(key + "~", key)
                elif key in store:
                    store.delete(key)  # created by the update (the first moments)
            self.steps[n] = torch.tensor(old_step)
            if not had_state:
                self.has_state.discard(n)
        updated.clear()

    def _commit(self, updated: dict[str, tuple[float, bool]]) -> None:
        for n in updated:
            for _sw, store, key in self._keys(n):
                if key + "~" in store:
                    store.delete(key + "~")
        updated.clear()

    def _start_updates(self, names: list[str], coef: Optional[torch.Tensor],
                       record: dict[str, tuple[float, bool]],
                       prefetch: Callable[[list[str]], None]) -> None:
        """Hand the updates from stored gradients to the worker, in forward order, with
        their reads queued ahead in that order (the swappers read as far ahead as their
        budgets allow); ``record`` collects them (with the window's fused updates) until
        :meth:`settle`."""
        with self._mu:
            self._lazy = set(names)
        self._running = record
        prefetch(names)
        for n in names:
            self._submit(Job("update", n, coef=coef, record=record))

    def await_updates(self, names: list[str]) -> None:
        """A forward is about to use ``names``: wait until step()'s updates of them ran.

        Raises
        ------
        MemAscendError
            An update of the running step failed: the whole step was undone.
        """
        if self._running is None:
            return
        t0 = time.perf_counter()
        with self._mu:
            # while these are pending the forward's holds stay as they are (see _hold_param)
            self._awaiting = set(names)
            self._await_seq += 1
            self._mu.notify_all()
            try:
                self._mu.wait_for(lambda: self._error is not None or
                                  self._lazy.isdisjoint(names))
            finally:
                self._awaiting = None
        self.counts.forward_wait_seconds += time.perf_counter() - t0
        if self._error is not None:
            self.settle()

    def settle(self) -> None:
        """Finish the updates step() left running and commit the step; when one of them
        failed, undo the whole step (every update of it, fused ones too) and raise.

        Raises
        ------
        MemAscendError
            The step was undone (parameters, optimizer state and step counts are as before
            it; its gradients are gone). The error chains the cause.
        """
        record = self._running
        if record is None:
            return
        self.wait()
        self._running = None
        with self._mu:
            self._lazy = set()
        if self._error is None:
            self._commit(record)
            return
        err, self._error = self._error, None
        if not self.undo:
            applied = len(record)
            self._commit(record)
            raise MemAscendError(f"the optimizer step failed after step() returned, after "
                                 f"{applied} parameters were updated and committed "
                                 "(exact_undo=False): the model is part way through the step; "
                                 f"load the last checkpoint: {err}") from err
        self.counts.steps_undone += 1
        self.t.step_undone()  # gives back the model's holds on the parameters first
        self._rollback(record)
        raise MemAscendError(f"the optimizer step failed after step() returned and was undone "
                             f"(parameters and optimizer state are as before it; redo its "
                             f"micro-batches): {err}") from err

    def step(self, prefetch: Callable[[list[str]], None]) -> bool:
        """Commit the window: finish fused updates or undo them, start the updates from
        stored gradients (deferred windows, clipping), settled later (see :meth:`settle`).
        Returns False when fp16 overflowed (the step is skipped). Without clipping and fp16
        (nothing to undo at step()), a fused window's writes may still be landing when it
        returns: the window is then committed by :meth:`settle` as a running step, and a
        write that fails undoes it there.

        Raises
        ------
        MemAscendError
            The worker failed (the window's fused updates are undone first), or the previous
            step's updates failed (that step is undone).
        """
        self.settle()
        self.drain()
        if self._error is not None or self.fp16 or self.max_grad_norm is not None:
            self.wait()  # a rollback may follow: the window's writes must have landed
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
        record = self.updated
        self._new_window()
        if not todo:
            if self._writes:  # landing behind step(): committed by settle(), as running
                self._running = record  # updates are (nothing lazy: forward need not wait)
            else:
                self._commit(record)
            return True
        self._start_updates(todo, coef, record, prefetch)
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
        """zero_grad() in the middle of a window: undo fused updates, forget gradients.
        Right after step() (an empty window) it leaves the step's updates running."""
        if self._running is not None and not (self.micro or self.updated or self.accumulated):
            return
        self.settle()
        self.wait()
        self._error = None
        if self.updated and not self.undo:
            n = len(self.updated)
            self._commit(self.updated)
            self._new_window()
            raise MemAscendError(f"zero_grad() before step(): with exact_undo=False the "
                                 f"window's {n} fused updates were committed as they were made "
                                 "and cannot be discarded; the step counts as taken")
        if self.updated:
            self._rollback()
            self.counts.rollbacks_discarded += 1
        self._new_window()

    def close(self, timeout: Optional[float] = None) -> None:
        """Stop the worker (after the jobs handed over). Idempotent."""
        if self._worker.is_alive():
            self._q.put(None)
            self._worker.join(timeout)

