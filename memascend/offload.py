"""Train a plain PyTorch model with its parameters and optimizer state on SSD.

``offload_model(model, swap_dir=..., budget=..., optimizer=AdamW(...))`` moves every parameter
to two swap tiers and returns an :class:`OffloadedModel` that drives training:

- **parameter tier** (compute dtype, e.g. bf16): a module's parameters are swapped in by a
  forward pre-hook and released by a forward hook; its outputs are wrapped so that, when
  gradients flow back into the module, its parameters are swapped in again before its
  backward runs. Between uses a parameter's ``.data`` is an empty placeholder. Views of a
  parameter that autograd saves for backward are re-derived from the re-fetched parameter
  (:mod:`memascend.saved_views`), never read from a buffer that may have been recycled.
- **gradients** leave through post-accumulate-grad hooks into the optimizer tier in fp32
  (accumulated there across micro-batches) and the parameter's ``.grad`` is freed at once.
  In fp16 mode every gradient is checked for inf/nan chunk by chunk as it arrives (the *fused
  overflow check*: no full-size temporaries); an overflow skips the step and lowers the loss
  scale.
- **optimizer tier** (fp32 master weights, AdamW moments, gradients): :meth:`OffloadedModel.step`
  streams parameter by parameter — read-ahead of the next parameters, the update, and
  write-behind of the results overlap — and writes the new compute-dtype copy to the
  parameter tier. The update is ``torch.optim.adamw.adamw`` itself (single-tensor form), so
  fp32 training is bitwise identical to ``torch.optim.AdamW(foreach=False)`` in memory.

The two swap tiers are scratch space (``durable=False``: safe against a killed process, not
power loss, and no fsync per step; opened with ``reset=True``: whatever an earlier process left
in ``swap_dir`` is discarded); durability comes from checkpoints. Pinned memory is
bounded by the two swappers' budgets. Checkpoints (:meth:`save` / :meth:`load`, see
:mod:`memascend.checkpoint`) survive a crash at any point of a save.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.optim.adamw as _torch_adamw

from . import checkpoint
from .config import parse_size
from .engine import SwapEngine
from .errors import ConfigError, MemAscendError, MetadataError
from .files import private_dirs
from .extents import round_up
from .overflow import has_inf_or_nan as _has_inf_or_nan
from .pool import PinnedPool
from .saved_views import SavedParamViews
from .sizing import OFFLOAD_DEFAULT_BUDGET
from .store import SwapStore
from .swapper import TensorSwapper

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class AdamW:
    """AdamW hyper-parameters (the same meaning and defaults as ``torch.optim.AdamW``)."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2

    def __post_init__(self) -> None:
        if not self.lr >= 0:
            raise ConfigError("lr", f"must be >= 0, got {self.lr}")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ConfigError("betas", f"must be in [0, 1), got {self.betas}")
        if not self.eps >= 0 or not self.weight_decay >= 0:
            raise ConfigError("eps" if not self.eps >= 0 else "weight_decay", "must be >= 0")


@dataclass(frozen=True)
class LossScaler:
    """Dynamic loss scaling for fp16 (halve on overflow, double after ``growth_interval``
    good steps)."""

    init_scale: float = 2.0 ** 16
    growth_interval: int = 1000
    min_scale: float = 1.0


class _PreBackward(torch.autograd.Function):
    """Identity on a module's outputs whose backward first swaps the module's params in."""

    @staticmethod
    def forward(ctx, hook, *outputs):  # noqa: D102
        ctx.hook = hook
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: D102
        ctx.hook.fetch_for_backward()
        return (None, *grads)


class _ModuleHook:
    """The swap-in/release logic of one module that owns parameters directly."""

    def __init__(self, owner: "OffloadedModel", module: torch.nn.Module, names: list[str]):
        self.owner = owner
        self.module = module
        self.names = names  # keys of the module's direct parameters
        self.pushed = 0  # saved-tensor hooks pushed by pre_forward, not yet popped

    def params(self) -> Iterable[tuple[str, torch.nn.Parameter]]:
        for _local, p in self.module._parameters.items():
            if p is not None:
                yield self.owner._name_of[id(p)], p

    def pre_forward(self, module, args):
        self.owner._fetch([name for name, _ in self.params()], hold="fwd")
        if torch.is_grad_enabled():
            self.owner._saved.push()
            self.pushed += 1

    def post_forward(self, module, args, output):
        # Registered with always_call=True: also runs when forward raised, so the saved-tensor
        # hooks pushed above are always popped.
        if self.pushed:
            self.pushed -= 1
            self.owner._saved.pop()
        self.owner._release_fwd([name for name, _ in self.params()])
        if not torch.is_grad_enabled():
            return output
        return _wrap_outputs(self, output)

    def fetch_for_backward(self):
        self.owner._fetch([name for name, _ in self.params()], hold="bwd")


def _wrap_outputs(hook: _ModuleHook, output: Any) -> Any:
    if isinstance(output, torch.Tensor):
        if output.requires_grad:
            return _PreBackward.apply(hook, output)[0]
        return output
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        tensors = [o for o in output if isinstance(o, torch.Tensor) and o.requires_grad]
        if not tensors:
            return output
        wrapped = iter(_PreBackward.apply(hook, *tensors))
        return tuple(next(wrapped) if isinstance(o, torch.Tensor) and o.requires_grad else o
                     for o in output)
    return output  # other structures: parameters are fetched on demand by their own modules


class OffloadedModel:
    """Drives training of a model whose parameters and optimizer state live on SSD.

    Build it with :func:`offload_model`. Use ``model(...)`` as usual, then
    ``om.backward(loss)`` (or ``loss.backward()`` outside fp16), ``om.step()``,
    ``om.zero_grad()``.
    """

    def __init__(self, model: torch.nn.Module, swap_dir: str, *,
                 budget: Any = OFFLOAD_DEFAULT_BUDGET,
                 optimizer_budget: Any = None, optimizer: Optional[AdamW] = None,
                 compute_dtype: Any = torch.float32, loss_scaler: Optional[LossScaler] = None,
                 engine: Optional[SwapEngine] = None, pool: Optional[PinnedPool] = None,
                 init: Optional[Callable[[torch.nn.Module], None]] = None):
        if isinstance(compute_dtype, str):
            if compute_dtype not in COMPUTE_DTYPES:
                raise ConfigError("compute_dtype", f"must be one of {sorted(COMPUTE_DTYPES)}")
            compute_dtype = COMPUTE_DTYPES[compute_dtype]
        if compute_dtype not in COMPUTE_DTYPES.values():
            raise ConfigError("compute_dtype", f"must be float32, bfloat16 or float16, got "
                                               f"{compute_dtype}")
        previous = getattr(model, "_memascend_offloaded_to", None)
        if previous is not None:
            raise ConfigError("model", f"is already offloaded to {previous} (its parameters are "
                                       "placeholders there); offload a fresh model instance")
        self.model = model
        self.swap_dir = os.path.abspath(swap_dir)
        self.compute_dtype = compute_dtype
        self.opt = optimizer or AdamW()
        self.fp16 = compute_dtype == torch.float16
        self.scaler = loss_scaler or LossScaler()
        self.loss_scale = self.scaler.init_scale if self.fp16 else 1.0
        self._good_steps = 0
        self.overflow = False
        self.skipped_steps = 0
        self.step_count = 0
        budget_b = parse_size("budget", budget)
        opt_b = parse_size("optimizer_budget", optimizer_budget) if optimizer_budget else budget_b
        _check_budgets(model, budget_b, opt_b, compute_dtype)
        private_dirs(self.swap_dir)
        self._own_engine = engine is None
        self.engine = engine or SwapEngine()
        self._own_pool = pool is None
        self.pool = pool or PinnedPool(lock="auto")
        self._saved = SavedParamViews(lambda n: self._params[n].data, self._ensure_resident)
        self._opened: list[Any] = []
        try:
            self.param_store = self._open(SwapStore(os.path.join(self.swap_dir, "params.swp"),
                                                    engine=self.engine, pool=self.pool,
                                                    durable=False, reset=True))
            self.optim_store = self._open(SwapStore(os.path.join(self.swap_dir, "optim.swp"),
                                                    engine=self.engine, pool=self.pool,
                                                    durable=False, reset=True))
            self.params_sw = self._open(TensorSwapper(self.param_store, budget_bytes=budget_b))
            # The step reads ahead itself (it knows its order); the learned plan would wrap
            # into the next pass and read gradients that backward rewrites first.
            self.optim_sw = self._open(TensorSwapper(self.optim_store, budget_bytes=opt_b,
                                                     plan_prefetch=False))
            self._setup_params(init)
        except BaseException:
            self._close_all()
            raise
        self._install_hooks()
        model._memascend_offloaded_to = self.swap_dir

    def _open(self, obj: Any) -> Any:
        self._opened.append(obj)
        return obj

    # ---- set-up ----
    def _setup_params(self, init: Optional[Callable[[torch.nn.Module], None]]) -> None:
        """Write every parameter to SSD; only when all writes succeeded are they replaced by
        placeholders, so a full disk leaves the model intact. Parameters on the meta device
        are materialized, initialized and written one module at a time instead."""
        self._params: dict[str, torch.nn.Parameter] = {}
        self._name_of: dict[int, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        memo: dict[int, tuple[torch.nn.Parameter, torch.nn.Parameter]] = {}
        pending: list[tuple[str, Any]] = []  # in-RAM parameters, dropped once all are written
        for mname, module in self.model.named_modules(remove_duplicate=False):
            fresh: list[tuple[str, torch.nn.Parameter]] = []
            for pname, p in list(module._parameters.items()):
                if p is None:
                    continue
                if p.is_meta:  # materialize (once, also when tied to several modules)
                    if id(p) not in memo:
                        new = torch.nn.Parameter(torch.empty_like(p, device="cpu"),
                                                 requires_grad=p.requires_grad)
                        memo[id(p)] = (p, new)
                        fresh.append((f"{mname}.{pname}" if mname else pname, new))
                    module._parameters[pname] = memo[id(p)][1]
                    continue
                if id(p) in self._name_of:
                    continue
                name = f"{mname}.{pname}" if mname else pname
                self._add_param(name, p)
                pending.extend(self._write_initial(name, p))
            if fresh:
                with torch.no_grad():
                    (init or _reset_parameters)(module)
                handles = []
                for name, p in fresh:
                    self._add_param(name, p)
                    handles.extend(self._write_initial(name, p))
                for h in handles:
                    h.wait()
                for _, p in fresh:
                    p.data = torch.empty(0, dtype=self.compute_dtype)
        if not self._params:
            raise ConfigError("model", "has no parameters to offload")
        for h in pending:
            h.wait()  # raises the first SwapIOError (e.g. ENOSPC) before anything is dropped
        self._steps = {name: torch.tensor(0.0) for name in self._params}
        self._has_state: set[str] = set()
        self._has_grad: set[str] = set()
        self._holds: dict[str, dict[str, int]] = {"fwd": {}, "bwd": {}}
        self._grad_handles: list[Any] = []
        self._bwd_callback_queued = False
        for p in self._params.values():
            p.data = torch.empty(0, dtype=self.compute_dtype)

    def _add_param(self, name: str, p: torch.nn.Parameter) -> None:
        self._params[name] = p
        self._name_of[id(p)] = name
        self._shapes[name] = tuple(p.shape)

    def _write_initial(self, name: str, p: torch.nn.Parameter) -> list[Any]:
        shape = self._shapes[name]
        self.params_sw.register(f"p/{name}", shape, self.compute_dtype)
        for kind in ("master", "m", "v", "g"):
            self.optim_sw.register(f"{kind}/{name}", shape, torch.float32)
        with torch.no_grad():
            return [self.optim_sw.swap_out(f"master/{name}", p.detach()),
                    self.params_sw.swap_out(f"p/{name}", p.detach())]

    def _install_hooks(self) -> None:
        self._hooks = []
        for module in self.model.modules():
            names = [self._name_of[id(p)] for p in module._parameters.values() if p is not None]
            if not names:
                continue
            h = _ModuleHook(self, module, names)
            self._hooks.append(module.register_forward_pre_hook(h.pre_forward))
            self._hooks.append(module.register_forward_hook(h.post_forward, always_call=True))
        for name, p in self._params.items():
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(
                    lambda param, name=name: self._grad_ready(name, param)))

    # ---- parameter tier ----
    def _fetch(self, names: list[str], hold: str) -> None:
        if not names:
            return
        handles = [(n, self.params_sw.swap_in(f"p/{n}")) for n in names]
        for n, h in handles:
            view = h.wait()
            self._params[n].data = view
            self._saved.track(n, view)
            self._holds[hold][n] = self._holds[hold].get(n, 0) + 1
        if hold == "bwd" and not self._bwd_callback_queued:
            self._bwd_callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)

    def _evict_view(self, name: str) -> None:
        p = self._params[name]
        self._saved.untrack(name, p.data)
        p.data = torch.empty(0, dtype=self.compute_dtype)

    def _ensure_resident(self, name: str) -> torch.Tensor:
        """The parameter's buffer view, fetched for backward if it is not resident (a saved
        view unpacked after the parameter was released)."""
        if not self._holds["fwd"].get(name) and not self._holds["bwd"].get(name):
            self._fetch([name], hold="bwd")
        return self._params[name].data

    def _drop_holds(self, name: str, hold: str) -> None:
        count = self._holds[hold].pop(name, 0)
        if not self._holds["fwd"].get(name) and not self._holds["bwd"].get(name):
            # Drop the view before releasing: a live view keeps a recycled buffer mapped.
            self._evict_view(name)
        for _ in range(count):
            self.params_sw.release(f"p/{name}")

    def _release_fwd(self, names: list[str]) -> None:
        for n in names:
            count = self._holds["fwd"].get(n, 0)
            if count == 1:
                del self._holds["fwd"][n]
            elif count:
                self._holds["fwd"][n] = count - 1
            if not self._holds["fwd"].get(n) and not self._holds["bwd"].get(n):
                self._evict_view(n)
            if count:
                self.params_sw.release(f"p/{n}")

    def _end_of_backward(self) -> None:
        # Also forward holds: activation checkpointing recomputes forwards during backward and
        # stops a recompute early once it has the tensors it needs, so the interrupted
        # module's forward hook never releases. No forward is running when backward ends.
        self._bwd_callback_queued = False
        for hold in ("bwd", "fwd"):
            for name in list(self._holds[hold]):
                self._drop_holds(name, hold)

    # ---- gradients ----
    def _grad_ready(self, name: str, p: torch.nn.Parameter) -> None:
        g = p.grad
        if g is None:
            return
        if self.fp16 and not self.overflow and _has_inf_or_nan(g):
            self.overflow = True
        key = f"g/{name}"
        if name not in self._has_grad:
            self._grad_handles.append(self.optim_sw.swap_out(key, g))  # converted to fp32
            self._has_grad.add(name)
        else:
            acc = self.optim_sw.swap_in(key).wait()
            acc.add_(g)
            self._grad_handles.append(self.optim_sw.swap_out(key, acc))
            del acc
            self.optim_sw.release(key)
        p.grad = None
        self._drop_holds(name, "bwd")

    # ---- the training-loop API ----
    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, scaled by the loss scale in fp16 mode."""
        (loss * self.loss_scale if self.fp16 else loss).backward()

    def zero_grad(self) -> None:
        """Start a new gradient accumulation window (gradients live on SSD, not in ``.grad``)."""
        self._has_grad.clear()
        self.overflow = False

    def step(self) -> bool:
        """One AdamW step over all parameters, streamed from SSD. Returns False if skipped
        (fp16 overflow); the loss scale is then halved."""
        for h in self._grad_handles:
            h.wait()
        self._grad_handles.clear()
        if self.fp16 and self.overflow:
            self.loss_scale = max(self.scaler.min_scale, self.loss_scale / 2)
            self._good_steps = 0
            self.skipped_steps += 1
            self.zero_grad()
            return False
        names = [n for n in self._params if n in self._has_grad]
        keys_of = lambda n: [f"master/{n}", f"g/{n}"] + ([f"m/{n}", f"v/{n}"] if n in self._has_state else [])  # noqa: E731
        # Read-ahead of the next parameters, at most two, and only while the current and the
        # read-ahead ones take at most half the tier's budget (the other half is for the
        # write-behind): a read-ahead that does not fit would be evicted before its use and
        # read twice.
        window = self.optim_sw.config.budget_bytes // 2
        cost = {n: _state_bytes(math.prod(self._shapes[n])) for n in names}
        ahead = 0  # names[:ahead] have been prefetched

        def read_ahead(i: int) -> None:
            nonlocal ahead
            ahead = max(ahead, i)
            while ahead < min(len(names), i + 3) and \
                    sum(cost[m] for m in names[i:ahead + 1]) <= window:
                self.optim_sw.prefetch(keys_of(names[ahead]))
                ahead += 1

        opt = self.opt
        writes = []
        for i, n in enumerate(names):
            read_ahead(i)
            master = self.optim_sw.swap_in(f"master/{n}").wait()
            grad = self.optim_sw.swap_in(f"g/{n}").wait()
            if n not in self._has_state:
                zeros = torch.zeros(self._shapes[n], dtype=torch.float32)
                self.optim_sw.swap_out(f"m/{n}", zeros, release=False)
                self.optim_sw.swap_out(f"v/{n}", zeros, release=False)
                del zeros
            m = self.optim_sw.swap_in(f"m/{n}").wait()
            v = self.optim_sw.swap_in(f"v/{n}").wait()
            if self.fp16:
                grad.mul_(1.0 / self.loss_scale)
            _torch_adamw.adamw([master], [grad], [m], [v], [], [self._steps[n]],
                                    foreach=False, capturable=False, differentiable=False,
                                    fused=None, amsgrad=False, beta1=opt.betas[0],
                                    beta2=opt.betas[1], lr=opt.lr,
                                    weight_decay=opt.weight_decay, eps=opt.eps, maximize=False)
            for key, t in ((f"master/{n}", master), (f"m/{n}", m), (f"v/{n}", v)):
                writes.append(self.optim_sw.swap_out(key, t))
            writes.append(self.params_sw.swap_out(f"p/{n}", master))  # converted to compute
            del master, grad, m, v  # no view may outlive its release (keeps buffers mapped)
            for key in (f"master/{n}", f"g/{n}", f"m/{n}", f"v/{n}"):
                self.optim_sw.release(key)
            self._has_state.add(n)
        for h in writes:
            h.wait()
        self.optim_sw.mark_pass()
        self.params_sw.mark_pass()
        self.step_count += 1
        if self.fp16:
            self._good_steps += 1
            if self._good_steps >= self.scaler.growth_interval:
                self.loss_scale *= 2
                self._good_steps = 0
        self.zero_grad()
        return True

    # ---- checkpoints ----
    def _state(self) -> dict[str, Any]:
        return {"format": 1, "step_count": self.step_count, "loss_scale": self.loss_scale,
                "good_steps": self._good_steps, "skipped_steps": self.skipped_steps,
                "steps": {n: float(t) for n, t in self._steps.items()},
                "has_state": sorted(self._has_state), "optimizer": asdict(self.opt),
                "compute_dtype": str(self.compute_dtype).replace("torch.", ""),
                "params": {n: list(s) for n, s in self._shapes.items()}}

    def save(self, path: str) -> None:
        """Write a checkpoint folder at ``path`` (see :mod:`memascend.checkpoint`: a crash at
        any point leaves the previous or the new checkpoint loadable from ``path``).

        Raises
        ------
        MemAscendError
            Called between ``backward()`` and ``step()``.
        SwapIOError
            Writing failed (e.g. ENOSPC); the previous checkpoint is unchanged.
        """
        if self._has_grad:
            raise MemAscendError("save() between backward() and step(): accumulated gradients "
                                 "are not part of a checkpoint; call step() or zero_grad()")
        self.params_sw.wait_idle()
        self.optim_sw.wait_idle()
        checkpoint.save(path, {"params.swp": self.param_store, "optim.swp": self.optim_store},
                        self._state())

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
        folder, state, entries = checkpoint.read(path, ("params.swp", "optim.swp"))

        def field(name: str, kind: Any) -> Any:
            return checkpoint.field(state, name, kind, folder)

        want = {n: list(s) for n, s in self._shapes.items()}
        if field("params", dict) != want:
            raise MemAscendError(f"checkpoint {folder} is for a different model (parameters "
                                 "or shapes differ)")
        if field("compute_dtype", str) != str(self.compute_dtype).replace("torch.", ""):
            raise MemAscendError(f"checkpoint {folder} was trained in {state['compute_dtype']}")
        steps, has_state = field("steps", dict), field("has_state", list)
        counters = {k: field(k, (int, float)) for k in ("step_count", "loss_scale",
                                                        "good_steps", "skipped_steps")}
        need = {"params.swp": [f"p/{n}" for n in self._params],
                "optim.swp": [f"master/{n}" for n in self._params] +
                [f"{k}/{n}" for n in has_state for k in ("m", "v")]}
        for tier, keys in need.items():
            missing = [k for k in keys if k not in entries[tier]]
            if missing or any(not isinstance(steps.get(n), (int, float)) for n in self._params):
                raise MetadataError(f"checkpoint {folder} is incomplete: tier {tier} lacks "
                                    f"{missing[:4]} or the state lacks step counts",
                                    path=os.path.join(folder, tier))
        self.params_sw.wait_idle()
        self.optim_sw.wait_idle()
        for store, sw, fname in ((self.param_store, self.params_sw, "params.swp"),
                                 (self.optim_store, self.optim_sw, "optim.swp")):
            sw.drop_resident()
            store.import_from(os.path.join(folder, fname))
        self.step_count = int(counters["step_count"])
        self.loss_scale = float(counters["loss_scale"])
        self._good_steps = int(counters["good_steps"])
        self.skipped_steps = int(counters["skipped_steps"])
        self._steps = {n: torch.tensor(float(steps[n])) for n in self._params}
        self._has_state = set(has_state)
        self._has_grad.clear()

    # ---- lifecycle ----
    def training_state_bytes(self) -> dict[str, int]:
        """Bytes of the training state on SSD, per tier, and what in-memory training needs."""
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
            try:
                self.pool.close()
            except Exception:
                pass

    def close(self) -> None:
        """Remove the hooks and close the swap tiers (their files stay in ``swap_dir``)."""
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []
        self._close_all()

    def __enter__(self) -> "OffloadedModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _state_bytes(numel: int) -> int:
    """Optimizer-tier buffer bytes of one parameter in a step: fp32 master, gradient, m, v."""
    return 4 * round_up(numel * 4)


def _check_budgets(model: torch.nn.Module, budget_b: int, opt_b: int,
                   compute_dtype: torch.dtype) -> None:
    """Refuse budgets that could never run, before anything is written. Forward holds a
    module's own parameters at once (compute dtype, 4 KiB-rounded buffers); the step holds a
    parameter's fp32 master, gradient, m and v at once."""
    itemsize = torch.empty(0, dtype=compute_dtype).element_size()
    need_p, module_name = 0, ""
    for mname, module in model.named_modules():
        own = sum(round_up(p.numel() * itemsize) for p in module._parameters.values()
                  if p is not None)
        if own > need_p:
            need_p, module_name = own, mname or type(module).__name__
    if budget_b < need_p:
        raise ConfigError("budget", f"{budget_b} bytes cannot hold the parameters of module "
                                    f"{module_name}: forward needs {need_p} bytes of them "
                                    "resident at once")
    named = [(n, p.numel()) for n, p in model.named_parameters()]
    if not named:
        return
    name, numel = max(named, key=lambda t: t[1])
    need = _state_bytes(numel)
    if opt_b < need:
        raise ConfigError("optimizer_budget", f"{opt_b} bytes cannot hold one parameter's "
                                              f"optimizer state: {name} ({numel} elements) "
                                              f"needs {need} bytes for its fp32 master, "
                                              "gradient, m and v at once")


def _reset_parameters(module: torch.nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if reset is None:
        raise ConfigError("init", f"{type(module).__name__} has parameters on the meta device "
                                  "and no reset_parameters(); pass init= to fill them")
    reset()


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Build modules with parameters on the ``meta`` device (no memory) and buffers on the
    CPU, for :func:`offload_model` to materialize one module at a time::

        with memascend.meta_parameters():
            model = LlamaForCausalLM(config)
        om = memascend.offload_model(model, "/nvme/swap", init=model._init_weights)

    Not thread-safe: it patches ``nn.Module.register_parameter`` while active.
    """
    original = torch.nn.Module.register_parameter

    def register(module: torch.nn.Module, name: str, param: Any) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = torch.nn.Parameter(param.to("meta"),
                                                          requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original  # type: ignore[method-assign]


def offload_model(model: torch.nn.Module, swap_dir: str, **options: Any) -> OffloadedModel:
    """Offload ``model``'s parameters and optimizer state to SSD under ``swap_dir``.

    Parameters
    ----------
    model:
        Any ``nn.Module`` (e.g. a transformers ``LlamaForCausalLM``), on the CPU.
    swap_dir:
        Folder for the two swap tiers (``params.swp``, ``optim.swp`` and their metadata).
    **options:
        ``budget`` (pinned bytes of the parameter tier, default 1 GiB),
        ``optimizer_budget`` (default: ``budget``), ``optimizer`` (:class:`AdamW`),
        ``compute_dtype`` (``torch.float32``/``bfloat16``/``float16``), ``loss_scaler``,
        ``engine``, ``pool``, ``init``.

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
