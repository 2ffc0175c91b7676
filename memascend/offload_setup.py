"""How an offloaded model is set up: budgets that can run, pinned pools sized once, and
parameters built on the meta device.

:func:`check_budgets` refuses budgets that could never run before anything is written;
:func:`tier_pools` gives each swap tier one pinned arena, reserved and locked once, so that a
steady-state step maps nothing new; :func:`meta_parameters` builds a model without memory for
its weights, which :func:`memascend.offload_model` then materializes one module at a time
(:func:`reset_parameters` is the default initializer); :func:`write_parameters` puts every
parameter in its tiers; :func:`check_options` checks the scalar options.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch

from .errors import ConfigError
from .heap import PLAIN_MMAP_THRESHOLD, check_threshold, set_mmap_threshold
from .extents import round_up
from .pool import PinnedPool
from .sizing import offload_arena_bytes



COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_options(compute_dtype: Any, accumulation_steps: Any, max_grad_norm: Any,
                  heap_mmap_threshold: Any, host_threads: Any) -> torch.dtype:
    """Check :func:`memascend.offload_model`'s scalar options; returns the compute dtype
    (a name or a ``torch.dtype``) as a ``torch.dtype``.

    Raises
    ------
    ConfigError
        An option is out of range or of the wrong type (the error names it).
    """
    if isinstance(compute_dtype, str):
        if compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError("compute_dtype", f"must be one of {sorted(COMPUTE_DTYPES)}")
        compute_dtype = COMPUTE_DTYPES[compute_dtype]
    if compute_dtype not in COMPUTE_DTYPES.values():
        raise ConfigError("compute_dtype", f"must be float32, bfloat16 or float16, got "
                                           f"{compute_dtype}")
    if accumulation_steps is not None and (isinstance(accumulation_steps, bool) or
                                           not isinstance(accumulation_steps, int) or
                                           accumulation_steps < 1):
        raise ConfigError("accumulation_steps", f"must be an integer >= 1 or None, got "
                                                f"{accumulation_steps!r}")
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and
                                          not isinstance(max_grad_norm, bool) and
                                          max_grad_norm > 0):
        raise ConfigError("max_grad_norm", f"must be a number > 0 or None, got "
                                           f"{max_grad_norm!r}")
    check_threshold("heap_mmap_threshold", heap_mmap_threshold)
    if host_threads is not None and (isinstance(host_threads, bool) or
                                     not isinstance(host_threads, int) or host_threads < 1):
        raise ConfigError("host_threads", f"must be an integer >= 1 or None, got "
                                          f"{host_threads!r}")
    return compute_dtype


def tier_pools(model: torch.nn.Module, budget_b: int, opt_b: int,
               compute_dtype: torch.dtype) -> tuple[PinnedPool, PinnedPool]:
    """One pool per tier, each one arena (:func:`memascend.sizing.offload_arena_bytes`: the
    tier's budget, or what the model can use of it, plus its largest tensor as slack against
    fragmentation). Leases are carved from it, and it stays mapped when empty: a
    steady-state step maps and locks nothing new. Reserved bytes are capped at the arena: a
    fragmented arena makes the swapper evict or wait (or take an overflow lease, counted),
    never grow the arena."""
    itemsize = torch.empty(0, dtype=compute_dtype).element_size()
    numels = [p.numel() for p in model.parameters()]
    arenas = offload_arena_bytes(numels, itemsize, budget_b, opt_b)
    p, o = (PinnedPool(lock="auto", arena_bytes=size, large_threshold=size, retain_bytes=size,
                       limit_bytes=size) for size in arenas)
    return p, o


def state_bytes(numel: int) -> int:
    """Optimizer-tier buffer bytes of one parameter in an update: gradient, m, v (and the
    fp32 master in bf16/fp16), at most four fp32 tensors."""
    return 4 * round_up(numel * 4)


def check_budgets(model: torch.nn.Module, budget_b: int, opt_b: int,
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
    need = state_bytes(numel)
    if opt_b < need:
        raise ConfigError("optimizer_budget", f"{opt_b} bytes cannot hold one parameter's "
                                              f"optimizer state: {name} ({numel} elements) "
                                              f"needs {need} bytes for four fp32 tensors "
                                              "at once (the update's gradient, m, v, and the "
                                              "master or a read-ahead)")


def reset_parameters(module: torch.nn.Module) -> None:
    reset = getattr(module, "reset_parameters", None)
    if reset is None:
        raise ConfigError("init", f"{type(module).__name__} has parameters on the meta device "
                                  "and no reset_parameters(); pass init= to fill them")
    reset()


@contextlib.contextmanager
def meta_parameters(heap_mmap_threshold: int = PLAIN_MMAP_THRESHOLD) -> Iterator[None]:
    """Build modules with parameters on the ``meta`` device (no memory) and buffers on the
    CPU, for :func:`offload_model` to materialize one module at a time::

        with memascend.meta_parameters():
            model = LlamaForCausalLM(config)
        om = memascend.offload_model(model, "/nvme/swap", init=model._init_weights)

    Module constructors still allocate each parameter on the CPU before it is moved to the
    meta device, so glibc's mmap threshold is fixed first (``heap_mmap_threshold``, the same
    option and default as :func:`offload_model`'s; 0 leaves it alone): with the dynamic one
    those transient allocations leave free chunks in the heap that later tensors fill and
    keep resident (the quick fit run peaked at 1.1 GiB in 5 of 8 runs that way, 0.66 GiB in
    the others). Not thread-safe: it patches ``nn.Module.register_parameter`` while active.

    Raises
    ------
    ConfigError
        ``heap_mmap_threshold`` out of range.
    """
    set_mmap_threshold(check_threshold("heap_mmap_threshold", heap_mmap_threshold))
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


def write_parameters(model: torch.nn.Module, params_sw: Any, optim_sw: Any,
                     compute_dtype: torch.dtype,
                     init: Optional[Callable[[torch.nn.Module], None]] = None
                     ) -> tuple[dict[str, torch.nn.Parameter], dict[int, str],
                                dict[str, tuple[int, ...]]]:
    """Write every parameter of ``model`` to SSD and register its keys: ``p/<name>`` in the
    compute dtype with ``params_sw``; ``m``, ``v``, ``g`` (and ``master`` unless fp32) in
    fp32 with ``optim_sw``. Only when all writes succeeded are the parameters replaced by
    placeholders, so a full disk leaves the model intact. Parameters on the meta device are
    materialized, initialized (``init(module)``, default :func:`reset_parameters`) and
    written one module at a time instead. Tied parameters are written once.

    Returns
    -------
    (params by name, name by ``id(param)``, shapes by name)

    Raises
    ------
    ConfigError
        The model has no parameters, or a meta module cannot be initialized.
    SwapIOError
        A write failed (e.g. ENOSPC).
    """
    fp32 = compute_dtype == torch.float32
    params: dict[str, torch.nn.Parameter] = {}
    name_of: dict[int, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}

    def write(name: str, p: torch.nn.Parameter) -> list[Any]:
        params[name], name_of[id(p)], shapes[name] = p, name, tuple(p.shape)
        params_sw.register(f"p/{name}", p.shape, compute_dtype)
        for kind in ("m", "v", "g") if fp32 else ("master", "m", "v", "g"):
            optim_sw.register(f"{kind}/{name}", p.shape, torch.float32)
        with torch.no_grad():
            out = [params_sw.swap_out(f"p/{name}", p.detach())]
            if not fp32:
                out.append(optim_sw.swap_out(f"master/{name}", p.detach()))
        return out

    memo: dict[int, torch.nn.Parameter] = {}
    pending: list[Any] = []  # in-RAM parameters' writes, dropped once all are written
    for mname, module in model.named_modules(remove_duplicate=False):
        fresh: list[tuple[str, torch.nn.Parameter]] = []
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            if p.is_meta:  # materialize (once, also when tied to several modules)
                if id(p) not in memo:
                    memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"),
                                                     requires_grad=p.requires_grad)
                    fresh.append((f"{mname}.{pname}" if mname else pname, memo[id(p)]))
                module._parameters[pname] = memo[id(p)]
                continue
            if id(p) not in name_of:
                pending.extend(write(f"{mname}.{pname}" if mname else pname, p))
        if fresh:
            with torch.no_grad():
                (init or reset_parameters)(module)
            handles = [h for name, p in fresh for h in write(name, p)]
            for h in handles:
                h.wait()
            for _, p in fresh:
                p.data = torch.empty(0, dtype=compute_dtype)
    if not params:
        raise ConfigError("model", "has no parameters to offload")
    for h in pending:
        h.wait()  # raises the first SwapIOError (e.g. ENOSPC) before anything is dropped
    for p in params.values():
        p.data = torch.empty(0, dtype=compute_dtype)
    return params, name_of, shapes
