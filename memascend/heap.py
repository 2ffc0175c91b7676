"""How much freed memory the C heap keeps, and how to bound it.

Training frees and reallocates large CPU tensors all the time: gathered parameters,
gradients, norm temporaries, Adam pieces. glibc's malloc serves a request from its heap
unless it is at least ``M_MMAP_THRESHOLD`` bytes, and that threshold is *dynamic*: it starts
at 128 KiB and, each time a mapped chunk is freed, rises to that chunk's size (up to 32 MiB).
After a few steps almost every tensor comes from the heap, and the heap rarely shrinks: a
freed chunk below a live one stays resident. In the ZeRO-Infinity benchmark this retention
was 1.0–1.5 GiB of RSS at 523M parameters (``malloc_trim`` handed that much back at each phase
boundary). Fixing the threshold turns the dynamic rule off: chunks of ``threshold`` bytes or
more are mapped on allocation and unmapped on free, so RSS follows the live tensors. The
price is a page fault per 4 KiB the first time a new chunk is touched.

This is process-wide (the allocator is shared by everything in the process) and cannot be
undone: glibc has no call that turns the dynamic threshold back on. On a C library other
than glibc nothing is changed.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import threading
from typing import Optional

from .errors import ConfigError

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MAX_MMAP_THRESHOLD = 32 << 20  # glibc's HEAP_MAX-derived ceiling on 64-bit (4 MiB x sizeof(long))
DEFAULT_MMAP_THRESHOLD = 1 << 20
# The plain path's (offload_model, the demo): its many small tensors (norms, biases, a small
# model's weights) would stay in the heap above 128 KiB (the demo: 726 MiB peak RSS at 1 MiB,
# 629 MiB at 128 KiB); the price is page faults on fresh tensors (at 134M parameters, 0 = the
# dynamic threshold saved 0.35 CPU-s per step for 0.22 GiB more peak RSS).
PLAIN_MMAP_THRESHOLD = 128 << 10

_lock = threading.Lock()
_applied: Optional[int] = None


def _glibc() -> Optional[ctypes.CDLL]:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def check_threshold(name: str, value: object) -> int:
    """``value`` as a threshold in bytes: 0 (leave the heap alone) or 4 KiB..32 MiB.

    Raises
    ------
    ConfigError
        Not an integer, or out of that range (``name`` is the option named in the error).
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be a number of bytes (0 = leave glibc's heap alone), "
                                f"got {value!r}")
    if value != 0 and not 4096 <= value <= MAX_MMAP_THRESHOLD:
        raise ConfigError(name, f"must be 0 or between 4096 and {MAX_MMAP_THRESHOLD} bytes, "
                                f"got {value}")
    return value


def set_mmap_threshold(nbytes: int = DEFAULT_MMAP_THRESHOLD) -> bool:
    """Map every heap request of ``nbytes`` or more on its own, so freeing it returns the
    memory to the system (see the module docstring for the trade-off).

    Parameters
    ----------
    nbytes:
        The fixed threshold, 4 KiB to 32 MiB (default 1 MiB). 0 does nothing.

    Returns
    -------
    bool
        True if glibc took the setting (now or in an earlier call); False on a C library
        without ``mallopt`` or when ``nbytes`` is 0.

    Raises
    ------
    ConfigError
        ``nbytes`` out of range.
    OSError
        glibc refused the setting.
    """
    global _applied
    nbytes = check_threshold("mmap_threshold", nbytes)
    if nbytes == 0:
        return False
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        if _applied == nbytes:
            return True
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        if libc.mallopt(M_MMAP_THRESHOLD, nbytes) != 1:
            raise OSError(f"mallopt(M_MMAP_THRESHOLD, {nbytes}) failed")
        # Keep the heap top from growing a retained tail either: trim it past 2x the threshold.
        libc.mallopt(M_TRIM_THRESHOLD, 2 * nbytes)
        _applied = nbytes
    # What the dynamic threshold placed in the heap before (e.g. a model built on the CPU and
    # moved to the meta device, one parameter at a time) is freed but would stay resident.
    release_free()
    return True


def release_free() -> bool:
    """Hand the heap's free pages back to the system (glibc ``malloc_trim(0)``: it also
    releases free pages in the middle of the heap). Freed tensors that an earlier, dynamic
    threshold placed in the heap are not retained after the threshold is fixed. False on a
    C library without it."""
    libc = _glibc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim(0)
    return True


def mmap_threshold() -> Optional[int]:
    """The threshold this process set through :func:`set_mmap_threshold`, or None."""
    return _applied


__all__ = ["set_mmap_threshold", "mmap_threshold", "release_free", "check_threshold",
           "DEFAULT_MMAP_THRESHOLD", "PLAIN_MMAP_THRESHOLD", "MAX_MMAP_THRESHOLD"]
