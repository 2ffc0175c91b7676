"""The optimizer's host work for one parameter, run on the worker thread of
:class:`memascend.fused.FusedAdam`.

A :class:`Job` is one parameter's gradient handed over by backward, or an update that
``step()`` runs from stored gradients. :class:`UpdateJobs` (a mix-in of ``FusedAdam``, whose
window state it reads and writes) runs them in order on one thread: it adds a micro-batch's
gradient to ``g/<name>``; in a window's last micro-batch it reads the parameter's state (or
zero-fills new moments), renames the old versions aside (``<key>~``: the update is a
speculation until ``step()``), runs :func:`memascend.adam.adamw_update` in place on the pinned
buffers and writes the parameter and state behind from them; or it updates from the stored
gradient with the clipping coefficient (deferred and redone windows, while the next forward
runs), also renaming the old versions aside first. Every buffer a job holds is given back
whatever happens; the first error stops the work and is raised by the owner.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .adam import adamw_update
from .errors import PoolExhaustedError
from .overflow import has_inf_or_nan
from .state_io import acquire_state, release_held


@dataclass
class Job:
    """One unit of host work for one parameter, run on the worker thread."""

    kind: str  # "accumulate" | "final" | "update"
    name: str
    grad: Optional[torch.Tensor] = None  # autograd's gradient (compute dtype)
    view: Optional[torch.Tensor] = None  # the resident parameter buffer (fused finals)
    releases: int = 0  # parameter-tier holds this job gives back
    coef: Optional[torch.Tensor] = None  # clipping coefficient (updates from the store)
    nbytes: int = 0
    last: bool = False  # an accumulation that completes the window's gradient (norm it)
    record: Optional[dict] = None  # updates: where the step's speculative updates are listed


class UpdateJobs:
    """The worker's side of :class:`memascend.fused.FusedAdam` (see the module docstring)."""

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
                    if job.kind == "update":
                        self._lazy.discard(job.name)
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

    def _do_accumulate(self, job: Job) -> None:
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

    def _do_final(self, job: Job) -> None:
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
            self._set_aside(n, self.updated)
            master = job.view if self.fp32 else state[f"master/{n}"]
            if self.fp16:  # out of place when g is a buffer being written or cached
                g = g.mul(1.0 / t.loss_scale) if held or self.keep_grads \
                    else g.mul_(1.0 / t.loss_scale)
            self._update(n, master, g, state, job.view)
            self.counts.updates_fused += 1
            del master, state, g
        finally:
            release_held(osw, held)
            if gkey in held and not self.keep_grads:
                osw.forget(gkey)  # summed in place, not written: not the stored g/<name>

    def _set_aside(self, n: str, record: dict[str, tuple[float, bool]]) -> None:
        """Keep the old versions of ``n``'s state aside (their reads are done or in flight,
        which hold the extents) and list the update in ``record``: it is a speculation until
        it is committed. Without ``exact_undo`` only the listing: the update's writes replace
        the old versions, whose extents the store reuses."""
        if self.undo:  # else overwritten in place of the key: the store frees the old one
            for _sw, store, key in self._keys(n):
                if key in store:
                    store.rename(key, key + "~")
        record[n] = (float(self.steps[n]), n in self.has_state)

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
        """The optimizer-tier state of ``n`` resident (:func:`memascend.state_io.acquire_state`:
        read, or zero-filled moments on the first update). Each key is appended to ``held``
        as soon as it is held; the caller releases them."""
        keys = self.optim_keys(n)
        fresh = keys[-2:] if n not in self.has_state else ()  # m and v start at zero
        return acquire_state(self.t.optim_sw, keys, held, fresh, on_wait=self._read_waited)

    def _read_waited(self, seconds: float) -> None:
        self.counts.read_wait_seconds += seconds

    def _blocked(self) -> tuple[bool, int]:
        """Whether the compute thread waits for an update not yet done (so its holds cannot
        change until this worker goes on), and which wait that is."""
        with self._mu:
            names = self._awaiting
            return names is not None and not names.isdisjoint(self._lazy), self._await_seq

    def _hold_param(self, n: str) -> torch.Tensor:
        """Swap ``p/<n>`` in and hold it for an update from step(). The next forward may hold
        the parameter budget for a moment (a module's parameters while it runs): wait for it
        to give them back; but when the budget was held all through one attempt while the
        forward was blocked on these updates, it never will be given back: raise."""
        key = f"p/{n}"
        while True:
            before = self._blocked()
            try:
                return self.t.params_sw.swap_in(key, observe=False).wait()
            except PoolExhaustedError as exc:
                if before[0] and self._blocked() == before:
                    raise PoolExhaustedError(
                        f"the parameter budget cannot hold {key!r} for its update while the "
                        f"next forward holds the rest: {exc}; raise the budget or offload "
                        "with overlap_step=False", nbytes=exc.nbytes, reason="budget") from exc
            with self._mu:
                self._mu.wait_for(lambda: self._await_seq != before[1], timeout=0.002)

    def _do_update(self, job: Job) -> None:
        """A two-phase update from the stored gradient (deferred windows, redone windows).
        The parameter's buffer is held and written as its own view: a forward may hold the
        same buffer as soon as the update is done."""
        n, t = job.name, self.t
        osw, gkey = t.optim_sw, f"g/{n}"
        held: list[str] = []
        p_held = False
        try:
            held.append(gkey)
            g = osw.swap_in(gkey).wait()
            p_held = True
            p_view = self._hold_param(n)
            state = self._acquire_state(n, held)
            master = p_view if self.fp32 else state[f"master/{n}"]
            self._set_aside(n, job.record)
            if self.fp16:
                g.mul_(1.0 / t.loss_scale)
            if job.coef is not None:
                g.mul_(job.coef)
            self._update(n, master, g, state, p_view)
            self.counts.updates_in_step += 1
            del master, state, g, p_view
        finally:
            release_held(osw, held)
            if p_held:
                release_held(t.params_sw, [f"p/{n}"])
            osw.forget(gkey)  # scaled in place: not the stored g/<name> any more
