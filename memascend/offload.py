"""Train a plain PyTorch model with its parameters and optimizer state on SSD.

``offload_model(model, swap_dir=..., budget=..., optimizer=AdamW(...))`` moves every parameter
to two swap tiers and returns an :class:`OffloadedModel` that drives training:

- **parameter tier** (``p/<name>`` in the compute dtype; in fp32 this *is* the master
  weight, the only copy): a module's parameters are swapped in by a forward pre-hook and
  released by a forward hook; its outputs are wrapped so that, when gradients flow back into
  the module, its parameters are swapped in again before its backward runs
  (:mod:`memascend.module_hooks`). Between uses a parameter's ``.data`` is an empty
  placeholder. Views of a parameter that autograd saves for backward are re-derived from the
  re-fetched parameter (:mod:`memascend.saved_views`), never read from a recycled buffer.
- **optimizer tier** (fp32: Adam moments ``m``/``v``, accumulated gradients ``g``, and in
  bf16/fp16 the fp32 master): the AdamW step is fused into backward
  (:mod:`memascend.fused`): as soon as a parameter's gradient is final, a worker thread updates
  it in place in the pinned buffers its state was read into and writes it behind, while
  backward goes on; :meth:`OffloadedModel.step` is the commit point (gradient clipping and the
  fp16 overflow skip are exact: a speculated update is undone and redone when needed). The
  update is ``torch.optim.adamw.adamw`` itself (single-tensor form), so fp32 training is
  bitwise identical to ``torch.optim.AdamW(foreach=False)`` in memory.

The two swap tiers are scratch space (``durable=False``: no fsync per step; ``journal=False``:
no metadata written per tensor; opened with ``reset=True``: whatever an earlier process left
in ``swap_dir`` is discarded; with ``exact_undo=False`` a large overwrite is written in
pieces, ``piece_bytes`` of :class:`memascend.store.StoreConfig`, so an area needs no room for
a whole embedding's old and new version at once); durability comes from checkpoints (:meth:`save` /
:meth:`load`, see :mod:`memascend.checkpoint`), which survive a crash at any point of a save.
Pinned memory is one pool arena per tier, sized to its budget (or what the model needs, if
less), mapped and locked once: a steady-state step maps and locks nothing new.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional

import torch

from . import activations as act_tier
from . import module_hooks, offload_checkpoint
from .adam import AdamW
from .config import from_env, parse_size
from .engine import SwapEngine
from .errors import ConfigError, MemAscendError
from .files import private_dirs
from .fused import FusedAdam
from .heap import release_free, set_mmap_threshold
from .offload_types import LossScaler, OffloadOptions, OffloadStats
from .offload_setup import (check_budgets, check_options, meta_parameters,
                            tier_pools, write_parameters)
from .overflow import has_inf_or_nan as _has_inf_or_nan  # noqa: F401 - kept importable here
from .pool import PinnedPool
from .readahead import ForwardReadAhead
from .param_tier import ParamTier
from .saved_views import SavedParamViews
from .sizing import offload_queue_bytes
from .store import SwapStore
from .store_config import SCRATCH_PIECE_BYTES
from .swapper import TensorSwapper

__all__ = ["AdamW", "LossScaler", "OffloadedModel", "OffloadStats", "offload_model",
           "meta_parameters"]



class OffloadedModel:
    """Drives training of a model whose parameters and optimizer state live on SSD.

    Build it with :func:`offload_model`. Use ``model(...)`` as usual, then
    ``om.backward(loss)`` (or ``loss.backward()`` outside fp16), ``om.step()``,
    ``om.zero_grad()``.
    """

    def __init__(self, model: torch.nn.Module, swap_dir: str, *,
                 optimizer: Optional[AdamW] = None, loss_scaler: Optional[LossScaler] = None,
                 engine: Optional[SwapEngine] = None, pool: Optional[PinnedPool] = None,
                 init: Optional[Callable[[torch.nn.Module], None]] = None, **options: Any):
        o = from_env(OffloadOptions, "OFFLOAD", options, given=True)
        compute_dtype = check_options(o.compute_dtype, o.accumulation_steps, o.max_grad_norm,
                                      o.heap_mmap_threshold, o.host_threads)
        budget, optimizer_budget, heap_mmap_threshold = \
            o.budget, o.optimizer_budget, o.heap_mmap_threshold
        previous = getattr(model, "_memascend_offloaded_to", None)
        if previous is not None:
            raise ConfigError("model", f"is already offloaded to {previous} (its parameters are "
                                       "placeholders there); offload a fresh model instance")
        self.model = model
        self.swap_dir = os.path.abspath(swap_dir)
        self.compute_dtype = compute_dtype
        self.opt = optimizer or AdamW()
        self.fp16 = compute_dtype == torch.float16
        self.fp32 = compute_dtype == torch.float32
        self.scaler = loss_scaler or LossScaler()
        self.loss_scale = self.scaler.init_scale if self.fp16 else 1.0
        self._good_steps = 0
        self.skipped_steps = 0
        self.step_count = 0
        budget_b = parse_size("budget", budget)
        opt_b = parse_size("optimizer_budget", optimizer_budget) if optimizer_budget else budget_b
        check_budgets(model, budget_b, opt_b, compute_dtype)
        private_dirs(self.swap_dir)
        # Gradients, Adam temporaries and activations are freed and reallocated every step;
        # glibc's dynamic threshold would keep up to 32 MiB chunks in its heap (measured: the
        # quick fit run peaked at 1.18 GB with it, 0.65 GB with 1 MiB).
        set_mmap_threshold(heap_mmap_threshold)
        self._own_engine = engine is None
        self.engine = engine or SwapEngine()
        self._own_pool = pool is None
        if pool is None:
            self.pool, self.optim_pool = tier_pools(model, budget_b, opt_b, compute_dtype)
            # the stores' bounce buffers (unaligned memory: reads into plain tensors) come
            # from a pool of their own, mapped only if used, not from the capped arenas
            self.bounce_pool = PinnedPool(lock="auto")
        else:
            self.pool = self.optim_pool = self.bounce_pool = pool
        self._opened: list[Any] = []
        self.activations: Optional[act_tier.ActivationTier] = None
        try:
            if o.activations is not None:
                self.activations = self._open(act_tier.ActivationTier(
                    o.activations, self.swap_dir, budget=o.activation_budget, engine=self.engine,
                    overflow_pool=self.bounce_pool))
            # exact_undo=False gives up whole-tensor atomicity anyway: overwrites in pieces
            pieces = 0 if o.exact_undo else SCRATCH_PIECE_BYTES
            self.param_store = self._open(SwapStore(os.path.join(self.swap_dir, "params.swp"),
                                                    engine=self.engine, pool=self.bounce_pool,
                                                    durable=False, journal=False, reset=True,
                                                    piece_bytes=pieces))
            self.optim_store = self._open(SwapStore(os.path.join(self.swap_dir, "optim.swp"),
                                                    engine=self.engine, pool=self.bounce_pool,
                                                    durable=False, journal=False, reset=True,
                                                    piece_bytes=pieces))
            self.params_sw = self._open(TensorSwapper(self.param_store, pool=self.pool,
                                                      budget_bytes=budget_b,
                                                      overflow_pool=self.bounce_pool))
            # Reads ahead as told (a module's state when its backward starts; the step's
            # next parameters), not by a learned plan: the plan would wrap into the next
            # window and read gradients that backward rewrites first.
            self.optim_sw = self._open(TensorSwapper(self.optim_store, pool=self.optim_pool,
                                                     budget_bytes=opt_b, plan_prefetch=False,
                                                     overflow_pool=self.bounce_pool))
            self._setup_params(init)
            self._fused = FusedAdam(self, list(self._params), self.opt, o.accumulation_steps,
                                    o.max_grad_norm, o.fused_step,
                                    queue_bytes=offload_queue_bytes(
                                        [math.prod(v) for v in self._shapes.values()], opt_b),
                                    host_threads=o.host_threads, overlap=bool(o.overlap_step),
                                    exact_undo=bool(o.exact_undo))
            self._opened.append(self._fused)
            self._readahead = ForwardReadAhead(self._shapes, self._fused.state_keys,
                                               self._fused.expects_fused_backward,
                                               self.optim_sw.prefetch, opt_b // 2)
            self._tier = ParamTier(self._params, self.params_sw, compute_dtype,
                                   self._backward_event, lambda: self._fused.busy,
                                   self._fused.drain)
        except BaseException:
            self._close_all()
            raise
        self._install_hooks()
        model._memascend_offloaded_to = self.swap_dir

    def _pools(self) -> list[PinnedPool]:
        """The pinned pools this model uses (each once)."""
        pools = [self.pool, self.optim_pool, self.bounce_pool]
        if self.activations is not None:
            pools.append(self.activations.pool)
        return list({id(p): p for p in pools}.values())

    def _open(self, obj: Any) -> Any:
        self._opened.append(obj)
        return obj

    @property
    def saved(self) -> SavedParamViews:
        """The saved-tensor hooks that keep autograd off recycled parameter buffers."""
        return self._tier.saved

    _saved = saved

    @property
    def _holds(self) -> dict[str, dict[str, int]]:
        return self._tier.holds

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter name -> shape."""
        return self._shapes

    # ---- set-up ----
    def _setup_params(self, init: Optional[Callable[[torch.nn.Module], None]]) -> None:
        """Write every parameter to its tiers (see :func:`offload_setup.write_parameters`)."""
        self._params, self.name_of, self._shapes = write_parameters(
            self.model, self.params_sw, self.optim_sw, self.compute_dtype, init)
        release_free()  # the model's in-RAM weights are on SSD now: their pages go back
        self.uses: dict[str, int] = {}  # grad-enabled forward calls per parameter
        self.fetched: dict[str, int] = {}  # module backwards started per parameter
        self._pending: list[str] = []  # gradients accumulated, more may come this backward
        self._in_bwd = False  # a backward pass is open (first event seen, not yet ended)
        self._bwd_callback_queued = False

    def _install_hooks(self) -> None:
        self._hooks = module_hooks.install(self, self.model)
        if self.activations is not None:
            self._hooks.extend(act_tier.attach(self.activations, self.model))
        for name, p in self._params.items():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda param, name=name: self._grad_ready(name, param)))

    # ---- parameter tier (called by the module hooks) ----
    def fetch(self, names: list[str], hold: str) -> None:
        """Bring ``names`` in for a module's forward (``hold="fwd"``; after the running
        step's updates of them) or backward."""
        if hold == "fwd":
            self._fused.await_updates(names)
        self._tier.fetch(names, hold)
        if hold == "fwd" and not self._in_bwd and torch.is_grad_enabled():
            # a training forward (not a recomputation inside backward, not an evaluation)
            self._readahead.fetched(names)  # may read the next backward's state ahead

    def release_forward(self, names: list[str]) -> None:
        """A module's forward is done with ``names``."""
        self._tier.release_forward(names)

    def fetch_for_backward(self, names: list[str]) -> None:
        """A module's backward starts: read its optimizer state ahead, bring its params in."""
        self._backward_event()
        keys = [k for n in names for k in self._fused.wants_state(n)]
        if keys:
            self.optim_sw.prefetch(keys)
        self._tier.fetch(names, hold="bwd")

    def before_forward(self) -> None:
        """A forward call outside backward: the window must allow it (see FusedAdam)."""
        if self._in_bwd:
            self._end_pass()  # a backward whose outermost end was not seen (nested ends only)
        self._fused.before_forward()

    def _backward_event(self) -> None:
        if not self._in_bwd:
            self._in_bwd = True
            self._fused.begin_backward()
            self._readahead.backward_starts()
        if not self._bwd_callback_queued:
            self._bwd_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _end_of_backward(self) -> None:
        self._bwd_callback_queued = False
        if torch._C._current_autograd_node() is not None:
            return  # the end of a nested (reentrant checkpoint) backward: the pass goes on
        self._end_pass()

    def _end_pass(self, finish: bool = True) -> None:
        """The backward pass is over: finish gradients that waited for uses that never
        backpropagated (``finish``; else drop them), then drop every hold. Also forward
        holds: activation checkpointing recomputes forwards during backward and stops a
        recompute early once it has the tensors it needs, so the interrupted module's forward
        hook never releases."""
        self._in_bwd = False
        try:
            pending, self._pending = self._pending, []
            for name in pending:
                p = self._params[name]
                if p.grad is not None and finish:
                    self._finish_grad(name, p)
                p.grad = None
        finally:
            self._tier.drop_all()
            self.uses.clear()
            self.fetched.clear()
            fused_pass = self._fused.fusing
            self._fused.end_backward()
            if not fused_pass:
                # accumulated gradients are stored (or being written) when backward returns;
                # a fused pass's updates finish in step()
                self._fused.drain()

    # ---- gradients ----
    def _grad_ready(self, name: str, p: torch.nn.Parameter) -> None:
        if p.grad is None:
            return
        self._backward_event()
        if self.fetched.get(name, 0) < self.uses.get(name, 0):
            if name not in self._pending:  # another call of its module has yet to backprop
                self._pending.append(name)
            return
        if name in self._pending:
            self._pending.remove(name)
        self._finish_grad(name, p)

    def _finish_grad(self, name: str, p: torch.nn.Parameter) -> None:
        g, p.grad = p.grad, None
        view, releases = None, 0
        if self._fused.fusing:
            # the update job holds the parameter's buffer until it has written it
            view = self.params_sw.swap_in(f"p/{name}", observe=False).wait()
            releases = 1
        try:
            self._fused.grad_ready(name, g, view, releases)
        except BaseException:
            if releases:
                self.params_sw.release(f"p/{name}")
            raise
        finally:
            self._tier.drop_holds(name, "bwd")

    # ---- the training-loop API ----
    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled by the loss scale in fp16 mode."""
        (loss * self.loss_scale if self.fp16 else loss).backward()

    def zero_grad(self) -> None:
        """Discard the current window's gradients (and undo its fused updates, if any).
        A no-op right after :meth:`step`."""
        if module_hooks.in_backward():
            raise MemAscendError("zero_grad() during backward")
        if self._in_bwd:  # a backward that raised: its end was never seen
            self._end_pass(finish=False)
        self._fused.discard()

    def step_undone(self) -> None:
        """The running step failed after step() returned and is being undone: give back the
        model's holds on the parameters (a forward that was waiting for the step is
        interrupted by the error) and uncount the step."""
        self._tier.drop_all()
        self.step_count -= 1

    @property
    def overflow(self) -> bool:
        """fp16: whether the current window's gradients hold inf or nan (so far; waits for
        the gradients handed over to be checked)."""
        self._fused.drain()
        return self._fused.overflow

    @property
    def last_grad_norm(self) -> Optional[float]:
        """The global gradient norm of the last step (with ``max_grad_norm``), else None."""
        return self._fused.last_grad_norm

    def step(self) -> bool:
        """Commit the optimizer step of the current window (see :mod:`memascend.fused`).
        Returns False if it was skipped (fp16 overflow); the loss scale is then halved.
        Updates that were not fused into backward (deferred or clipped windows) may still
        be running when it returns, and the writes of fused ones still landing
        (``overlap_step``): the next forward waits for each parameter's own update (not for
        writes: it uses the updated copies in memory), and anything else that reads the
        state (backward, save, master, close) for all of them.

        Raises
        ------
        MemAscendError
            The step failed (e.g. an I/O error); the window's fused updates were undone. Also
            raised here, by the next forward or by any call that waits for the running step,
            when that step's updates failed: it is undone whole (state and ``step_count`` as
            before it).
        """
        if self._in_bwd:
            self._end_pass()
        if self.activations is not None:
            self.activations.collect()
        applied = self._fused.step(self._prefetch_for_step)
        self.optim_sw.mark_pass()
        self.params_sw.mark_pass()
        if not applied:
            self.loss_scale = max(self.scaler.min_scale, self.loss_scale / 2)
            self._good_steps = 0
            self.skipped_steps += 1
            return False
        self.step_count += 1
        if not self._fused.overlap:
            self._fused.settle()
        if self.fp16:
            self._good_steps += 1
            if self._good_steps >= self.scaler.growth_interval:
                self.loss_scale *= 2
                self._good_steps = 0
        return True

    def _prefetch_for_step(self, names: list[str]) -> None:
        """Read ahead what step()'s deferred updates of ``names`` will read (each holds its
        parameter's buffer, in every compute dtype)."""
        self.params_sw.prefetch([f"p/{n}" for n in names])
        self.optim_sw.prefetch([k for n in names
                                for k in (f"g/{n}", f"master/{n}", f"m/{n}", f"v/{n}")
                                if k in self.optim_store])

    def synchronize(self) -> None:
        """Wait until the last step is done: the updates ``step()`` left running and the
        writes still landing, then commit it. Training does not need it (the next backward,
        ``save()``, ``master()`` and ``close()`` do the same); it is for timing a step with
        everything it moves, or reading counters (:meth:`stats`) that include its writes.

        Raises
        ------
        MemAscendError
            The step failed after ``step()`` returned and was undone (see :meth:`step`).
        """
        self._fused.settle()

    def stats(self) -> OffloadStats:
        """A snapshot of the counters (see :class:`OffloadStats`)."""
        stores = (self.param_store.stats(), self.optim_store.stats())
        pools = [p.stats() for p in self._pools()]
        return OffloadStats(steps=self.step_count, skipped_steps=self.skipped_steps,
                            paths=self._fused.counts.to_dict(),
                            ssd_read=sum(s.bytes_read for s in stores),
                            ssd_written=sum(s.bytes_written for s in stores),
                            arenas_mapped=sum(p.arenas_mapped_total for p in pools),
                            locked_bytes=sum(p.locked for p in pools),
                            pinned_reserved=sum(p.reserved for p in pools),
                            last_grad_norm=self.last_grad_norm,
                            activations=(self.activations.stats().to_dict()
                                         if self.activations is not None else None))

    def master(self, name: str) -> torch.Tensor:
        """A copy of parameter ``name``'s fp32 master weight, read from SSD (between steps).

        Raises
        ------
        KeyError
            No such parameter.
        MemAscendError
            Called in the middle of a window (the master may be a speculation then).
        """
        if name not in self._params:
            raise KeyError(f"no parameter {name!r}")
        if self._fused.micro or self._in_bwd:
            raise MemAscendError("master() between backward() and step(): call step() first")
        self._fused.settle()
        self.params_sw.wait_idle()
        self.optim_sw.wait_idle()
        if self.fp32:
            return self.param_store.read_tensor(f"p/{name}").wait()
        return self.optim_store.read_tensor(f"master/{name}").wait()

    def master_state_dict(self) -> dict[str, torch.Tensor]:
        """Every parameter's fp32 master weight, by name (the whole model in RAM: for small
        models and tests; stream :meth:`master` per name for large ones)."""
        return {n: self.master(n) for n in self._params}

    # ---- checkpoints ----
    def save(self, path: str) -> None:
        """Write a checkpoint folder at ``path`` (see :mod:`memascend.offload_checkpoint`: a
        crash at any point leaves the previous or the new checkpoint loadable from ``path``).

        Raises
        ------
        MemAscendError
            Called in the middle of a window (between ``backward()`` and ``step()``).
        SwapIOError
            Writing failed (e.g. ENOSPC); the previous checkpoint is unchanged.
        """
        offload_checkpoint.save(self, path)

    def load(self, path: str) -> None:
        """Restore a checkpoint written by :meth:`save` (same model structure). Everything is
        checked before the live tiers change.

        Raises
        ------
        MetadataError
            No checkpoint at ``path``, or its state or a tier is damaged or incomplete (the
            error names the file).
        MemAscendError
            The checkpoint does not match this model.
        """
        offload_checkpoint.load(self, path)

    # ---- lifecycle ----
    def training_state_bytes(self) -> dict[str, int]:
        """Bytes of the training state on SSD, per tier, and what in-memory training needs
        (the last step committed first: :meth:`synchronize`)."""
        self._fused.settle()
        n = sum(math.prod(s) for s in self._shapes.values())
        esize = torch.empty((), dtype=self.compute_dtype).element_size()
        return {"parameters": n, "param_tier_bytes": self.param_store.stats().stored_bytes,
                "optimizer_tier_bytes": self.optim_store.stats().stored_bytes,
                "in_memory_bytes": n * esize * 2 + n * 4 * (3 if esize != 4 else 2)}

    def _close_all(self) -> None:
        for obj in reversed(self._opened):
            try:
                obj.close()
            except Exception:
                pass
        self._opened.clear()
        if self._own_engine:
            self.engine.close()
        if self._own_pool:
            for pool in self._pools():
                try:
                    pool.close()
                except Exception:
                    pass

    def close(self) -> None:
        """Remove the hooks and close the swap tiers (their files stay in ``swap_dir``) after
        the running step's updates (see :meth:`step`).

        Raises
        ------
        MemAscendError
            The running step failed (it was undone); the tiers are closed all the same.
        """
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        try:
            if getattr(self, "_fused", None) is not None and self._opened:
                self._fused.settle()
        finally:
            self._close_all()

    def __enter__(self) -> "OffloadedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def offload_model(model: torch.nn.Module, swap_dir: str, **options: Any) -> OffloadedModel:
    """Offload ``model``'s parameters and optimizer state to SSD under ``swap_dir``.

    Parameters
    ----------
    model:
        Any ``nn.Module`` (e.g. a transformers ``LlamaForCausalLM``), on the CPU.
    swap_dir:
        Folder for the two swap tiers (``params.swp``, ``optim.swp`` and their metadata).
    **options:
        ``optimizer`` (:class:`AdamW`), ``loss_scaler`` (:class:`LossScaler`, fp16),
        ``engine``, ``pool`` (default: one arena sized to the budgets, see
        :class:`OffloadedModel`), ``init`` (below); and the fields of
        :class:`~memascend.offload_types.OffloadOptions`, each described there: ``budget``
        (pinned bytes of the parameter tier, default 1 GiB), ``optimizer_budget``,
        ``compute_dtype``, ``accumulation_steps``, ``max_grad_norm``, ``fused_step``,
        ``heap_mmap_threshold``, ``host_threads``, ``overlap_step``, ``exact_undo``,
        ``activations``, ``activation_budget``. A field not given comes from
        ``MEMASCEND_OFFLOAD_<FIELD>`` when set; an unknown option or variable is a
        ``ConfigError`` (:mod:`memascend.config`).

    Parameters on the ``meta`` device (see :func:`meta_parameters`) are materialized one
    module at a time: allocated on the CPU, filled by ``init(module)`` (default
    ``module.reset_parameters()``; for transformers models pass ``model._init_weights``),
    written to SSD and freed, so the whole model never exists in RAM.

    Raises
    ------
    SwapIOError
        Writing the initial state failed (e.g. ENOSPC); the model is left unchanged.
    ConfigError
        Bad options.
    """
    return OffloadedModel(model, swap_dir, **options)
