"""The fused overflow check: does a gradient hold inf or nan, without full-size temporaries.

fp16 training skips a step whose gradients overflowed. The usual check,
``torch.isinf(g).any() or torch.isnan(g).any()``, allocates two boolean tensors as large as
``g`` — for DeepSpeed's flat gradient buffer, gigabytes at the moment memory peaks. Here the
tensor is scanned in chunks of ``chunk`` elements (default 1 Mi): the largest temporary is
one chunk's mask, and the scan stops at the first bad chunk. Used as gradients arrive by
:mod:`memascend.offload` and in place of stage 3's ``has_overflow`` by the DeepSpeed drop-in.
"""
from __future__ import annotations

from typing import Any

CHUNK = 1 << 20


def has_inf_or_nan(t: Any, chunk: int = CHUNK) -> bool:
    """True if ``t`` (any shape, a floating tensor) holds inf or nan; scanned in chunks."""
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), chunk):
        if not bool(flat[i:i + chunk].isfinite().all()):
            return True
    return False
