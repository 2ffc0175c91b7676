"""The AdamW update, once, for every path that steps an optimizer out of core.

Both the plain path (:mod:`memascend.fused`) and the DeepSpeed drop-in's streamed step
(:mod:`memascend.integrations.deepspeed.stream`) update a tensor (or a piece of one) whose
master weight, gradient and moments they have just read into pinned buffers. They call
:func:`adamw_update`, which is ``torch.optim.adamw.adamw`` in its single-tensor form: the
function ``torch.optim.AdamW(foreach=False)`` runs per parameter, so an out-of-core step is
bitwise the in-memory one. :class:`AdamW` holds the hyper-parameters with torch's meanings and
defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


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
    gets the bits the whole tensor would).
    """
    import torch.optim.adamw as torch_adamw

    extra = {"grad_scale": None, "found_inf": None} if fused else {}
    torch_adamw.adamw([param], [grad], [m], [v], [], [step], foreach=bool(foreach and not fused),
                      capturable=False,
                      differentiable=False, fused=True if fused else None, amsgrad=False,
                      beta1=betas[0], beta2=betas[1], lr=lr, weight_decay=weight_decay,
                      eps=eps, maximize=False, **extra)
