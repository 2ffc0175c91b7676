"""The AdamW update, once, for every path that steps an optimizer out of core.

Both the plain path (:mod:`memascend.fused`) and the DeepSpeed drop-in's streamed step
(:mod:`memascend.integrations.deepspeed.stream`) update a tensor (or a piece of one) whose
master weight, gradient and moments they have just read into pinned buffers. They call
:func:`adamw_update`, which is ``torch.optim.adamw.adamw`` in its single-tensor form: the
function ``torch.optim.AdamW(foreach=False)`` runs per parameter, so an out-of-core step is
bitwise the in-memory one. :class:`AdamW` holds the hyper-parameters with torch's meanings and
defaults.

Torch's single-tensor form allocates two full-size temporaries per update (the square root of
the second moment and its quotient). With the heap's mmap threshold fixed, as
``offload_model`` fixes it, each is mapped, faulted in and unmapped every time: on a 2-core
CPU that doubled the update's CPU time. For fp32 tensors on the CPU, :func:`adamw_update`
therefore runs the same operations in the same order, a slice of ``CHUNK`` elements at a
time, through one 4 MiB scratch tensor kept per thread: every operation is elementwise, so
each element gets the bits torch's form gives it. (Measured on the LLaMA 134M step: 0.3
CPU-s less per step and 1.58 s instead of 1.77 s; slices of 64 Ki elements were slower than
torch's form there, from the per-operation overhead while forward and backward share the
interpreter.)
The first use in a process checks that equality against torch's own function (which would
change if torch changed its formula) and falls back to torch's function, with a warning, if
it does not hold.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Any, Optional

from .errors import ConfigError

CHUNK = 1 << 20  # elements per slice of the in-place update (4 MiB of each operand)


@dataclass(frozen=True)
class AdamW:
    """AdamW hyper-parameters (the same meaning and defaults as ``torch.optim.AdamW``).

    ``fused``: use torch's fused kernel (one pass over the four tensors; on this 2-core CPU
    5.6x faster than the single-tensor form). Results are then bitwise those of
    ``torch.optim.AdamW(fused=True)``; with the default ``False`` they are those of
    ``torch.optim.AdamW(foreach=False)``, torch's default on the CPU. The two differ in the
    last bits (a different order of operations).
    """

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    fused: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.fused, bool):
            raise ConfigError("fused", f"must be True or False, got {self.fused!r}")
        if not self.lr >= 0:
            raise ConfigError("lr", f"must be >= 0, got {self.lr}")
        if not (0 <= self.betas[0] < 1 and 0 <= self.betas[1] < 1):
            raise ConfigError("betas", f"must be in [0, 1), got {self.betas}")
        if not self.eps >= 0 or not self.weight_decay >= 0:
            raise ConfigError("eps" if not self.eps >= 0 else "weight_decay", "must be >= 0")


def adamw_update(param: Any, grad: Any, m: Any, v: Any, step: Any, *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float,
                 fused: bool = False, foreach: bool = False) -> None:
    """One AdamW update of ``param`` in place (``m``, ``v`` and ``step`` too).

    ``step`` is the parameter's step count as a 0-dim float tensor (torch's state
    ``"step"``), incremented here. All tensors on one device, fp32 for bitwise equality with
    ``torch.optim.AdamW(foreach=False)`` (or ``fused=True`` with ``fused``, ``foreach=True``
    with ``foreach``: torch's own kernels of that form, elementwise, so a piece of a tensor
    gets the bits the whole tensor would). The single-tensor form of contiguous fp32 CPU
    tensors runs in slices without full-size temporaries (module docstring).
    """
    if not fused and not foreach and _sliceable(param, grad, m, v) and _slices_agree():
        _sliced_adamw(param, grad, m, v, step, lr=lr, betas=betas, eps=eps,
                      weight_decay=weight_decay)
        return
    _torch_adamw(param, grad, m, v, step, lr=lr, betas=betas, eps=eps,
                 weight_decay=weight_decay, fused=fused, foreach=foreach)


def _torch_adamw(param: Any, grad: Any, m: Any, v: Any, step: Any, *, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float,
                 fused: bool = False, foreach: bool = False) -> None:
    """``torch.optim.adamw.adamw`` on one tensor, in the form asked for."""
    import torch.optim.adamw as torch_adamw

    extra = {"grad_scale": None, "found_inf": None} if fused else {}
    torch_adamw.adamw([param], [grad], [m], [v], [], [step], foreach=bool(foreach and not fused),
                      capturable=False,
                      differentiable=False, fused=True if fused else None, amsgrad=False,
                      beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay,
                      eps=eps, maximize=False, **extra)


def _sliceable(*tensors: Any) -> bool:
    """Whether the sliced form applies: contiguous fp32 CPU tensors of one size, no grad."""
    import torch

    n = tensors[0].numel()
    return all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
               and t.numel() == n and not t.requires_grad for t in tensors)


def _sliced_adamw(param: Any, grad: Any, m: Any, v: Any, step: Any, *, lr: float,
                  betas: tuple[float, float], eps: float, weight_decay: float,
                  chunk: int = CHUNK) -> None:
    """Torch's single-tensor AdamW step (``torch.optim.adam._single_tensor_adam`` with
    decoupled weight decay, no amsgrad, not capturable), the same operations in the same
    order, a slice of ``chunk`` elements at a time, with one scratch tensor for the
    denominator instead of two full-size temporaries."""
    import torch

    beta1, beta2 = betas
    step += 1
    k = step.item()
    step_size = lr / (1 - beta1 ** k)
    bias_correction2_sqrt = (1 - beta2 ** k) ** 0.5
    p, g, m1, m2 = (t.view(-1) for t in (param, grad, m, v))
    n = p.numel()
    scratch = getattr(_SCRATCH, "t", None)
    if scratch is None:  # one per thread, kept: a fresh one would be mapped every time
        scratch = _SCRATCH.t = torch.empty(CHUNK, dtype=torch.float32)
    chunk = min(chunk, CHUNK)
    for a in range(0, n, chunk):
        w = min(chunk, n - a)
        ps, gs, ms, vs = (t.narrow(0, a, w) for t in (p, g, m1, m2))
        denom = scratch[:w]
        if weight_decay != 0:
            ps.mul_(1 - lr * weight_decay)
        ms.lerp_(gs, 1 - beta1)
        vs.mul_(beta2).addcmul_(gs, gs, value=1 - beta2)
        torch.sqrt(vs, out=denom)
        denom.div_(bias_correction2_sqrt).add_(eps)
        ps.addcdiv_(ms, denom, value=-step_size)


_SCRATCH = threading.local()
_AGREE: Optional[bool] = None
_AGREE_MU = threading.Lock()


def _slices_agree() -> bool:
    """Whether the sliced form gives torch's bits in this process (checked once: three
    steps on tensors that span several slices and end in a partial one, with and without
    weight decay; about 100 K elements, a few milliseconds: the operations are elementwise,
    so the slice size does not change an element's bits unless a kernel's scalar and vector
    code differ, which the odd slice size would show)."""
    global _AGREE
    if _AGREE is not None:
        return _AGREE
    with _AGREE_MU:
        if _AGREE is None:
            _AGREE = _check_slices()
            if not _AGREE:
                warnings.warn("memascend: the sliced AdamW update does not match this torch "
                              "version's single-tensor AdamW bit for bit; using torch's "
                              "function (full-size temporaries)", RuntimeWarning, stacklevel=3)
    return _AGREE


def _check_slices() -> bool:
    import torch

    gen = torch.Generator().manual_seed(20261206)
    # Slices that are not a multiple of any vector width, each above torch's parallel grain
    # (32768 elements), so that thread splits and scalar tails fall at other elements than in
    # torch's whole-tensor pass: where a kernel's scalar and vector code differed, this
    # would see it.
    chunk = 40961
    n = 2 * chunk + 17431
    for wd in (0.0, 0.01):
        ours = [torch.randn(n, generator=gen) for _ in range(2)]
        ours += [torch.zeros(n), torch.zeros(n), torch.tensor(0.0)]
        ref = [t.clone() for t in ours]
        for _ in range(3):
            grad = torch.randn(n, generator=gen)
            ours[1].copy_(grad)
            ref[1].copy_(grad)
            hp = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
            _sliced_adamw(ours[0], ours[1], ours[2], ours[3], ours[4], chunk=chunk, **hp)
            _torch_adamw(ref[0], ref[1], ref[2], ref[3], ref[4], **hp)
        if not all(torch.equal(a, b) for a, b in zip(ours, ref)):
            return False
    return True
