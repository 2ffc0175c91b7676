"""memascend: fine-tune models whose training state is larger than RAM, on one workstation.

Parameters and optimizer state live on NVMe/SSD and stream through a small, exactly sized pool
of pinned host memory. This package is the public API; see README.md for the overview.
"""
from __future__ import annotations

__version__ = "0.1.0"

from .errors import (ChecksumError, ConfigError, LeaseReleasedError, MemAscendError,
                     MemoryLockError, NativeUnavailableError, PoolBusyError, PoolExhaustedError,
                     ShortIOError, SwapIOError)
from .pool import Lease, PinnedPool, PoolConfig, PoolStats

__all__ = [
    "__version__", "PinnedPool", "PoolConfig", "PoolStats", "Lease", "MemAscendError",
    "ConfigError", "NativeUnavailableError", "PoolExhaustedError", "MemoryLockError",
    "LeaseReleasedError", "PoolBusyError", "SwapIOError", "ShortIOError", "ChecksumError",
]
