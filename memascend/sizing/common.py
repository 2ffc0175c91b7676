"""Units, alignment, dtype sizes, the measured runtime constants and glibc's heap model
(see :mod:`memascend.sizing`).
"""
from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError
from ..extents import round_up as _round_up


KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

#: Alignment of a memascend pool lease and of a swap-store extent (O_DIRECT).
PAGE = 4096
#: DeepSpeed swaps a tensor only from this many bytes on (``swap_tensor/utils.MIN_AIO_BYTES``).
DS_MIN_AIO_BYTES = 1 << 20
#: DeepSpeed's per-thread I/O alignment in bytes (``swap_tensor/utils.AIO_ALIGNED_BYTES``).
DS_AIO_ALIGNED_BYTES = 1024
#: Elements the fused overflow check (plain path and drop-in) scans at a time.
OVERFLOW_CHUNK_NUMEL = 1 << 20
#: glibc serves allocations at least this large with their own mmap whatever its dynamic
#: threshold (``DEFAULT_MMAP_THRESHOLD_MAX`` on 64-bit): freed, they leave the process.
GLIBC_MMAP_THRESHOLD_MAX = 32 * MiB

TORCH_RUNTIME_BYTES = 218 * MiB
MEMASCEND_IMPORT_BYTES = 3 * MiB + 512 * KiB
TRANSFORMERS_LLAMA_IMPORT_BYTES = 111 * MiB
DEEPSPEED_IMPORT_BYTES = 25 * MiB
TRAINING_RUNTIME_BYTES = 22 * MiB
DEEPSPEED_ENGINE_BYTES = 48 * MiB

#: Bytes per element of the dtype names DeepSpeed configs and torch use.
DTYPE_BYTES: dict[str, int] = {"float32": 4, "fp32": 4, "float": 4, "bfloat16": 2, "bf16": 2,
                               "float16": 2, "fp16": 2, "half": 2}

#: ``offload_model``'s default pinned budget of the parameter tier (the optimizer tier
#: defaults to the same).
OFFLOAD_DEFAULT_BUDGET = 1 * GiB
ACTIVATION_DEFAULT_BUDGET = 64 << 20  # offload_model's activation_budget


def round_up(n: int, alignment: int = PAGE) -> int:
    """``n`` rounded up to a multiple of ``alignment``.

    Parameters
    ----------
    n:
        A non-negative integer.
    alignment:
        A positive integer.

    Returns
    -------
    int
    """
    return _round_up(int(n), alignment)


def dtype_bytes(name: str) -> int:
    """Element size of a dtype name (``"bfloat16"``, ``"bf16"``, ``"torch.float32"``, ...).

    Raises
    ------
    ConfigError
        Unknown dtype name.
    """
    key = str(name).replace("torch.", "").lower()
    if key not in DTYPE_BYTES:
        raise ConfigError("dtype", f"unknown dtype {name!r}; known: {', '.join(sorted(DTYPE_BYTES))}")
    return DTYPE_BYTES[key]


def runtime_bytes(*, transformers: bool = True, deepspeed: bool = False) -> int:
    """Resident bytes of a training process before it builds its model (measured constants).

    Parameters
    ----------
    transformers:
        The process imports ``transformers``' LLaMA modelling code.
    deepspeed:
        The process imports DeepSpeed and initializes its process group.

    Returns
    -------
    int
        :data:`TORCH_RUNTIME_BYTES` + :data:`MEMASCEND_IMPORT_BYTES` and the optional parts.
    """
    return (TORCH_RUNTIME_BYTES + MEMASCEND_IMPORT_BYTES
            + (TRANSFORMERS_LLAMA_IMPORT_BYTES if transformers else 0)
            + (DEEPSPEED_IMPORT_BYTES if deepspeed else 0))


def heap_bytes(allocations: Sequence[int], mmap_threshold: int) -> int:
    """Of a phase's allocations, the bytes glibc serves from its heap (each below
    ``mmap_threshold``; the rest are mmapped and go back to the system on free). Heap memory a
    phase frees stays resident and later phases, allocating other sizes, do not fit in it, so
    these bytes count as held from that phase on (measured on stock ZeRO-3: the heap grew by
    the first step's Adam moments although backward had freed more than that)."""
    return sum(int(a) for a in allocations if int(a) < int(mmap_threshold))
