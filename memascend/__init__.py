"""memascend: fine-tune models whose training state is larger than RAM, on one workstation.

Parameters and optimizer state live on NVMe/SSD and stream through a small, exactly sized pool
of pinned host memory. This package is the public API; see README.md for the overview.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

from .errors import (BackendUnavailableError, ChecksumError, ConfigError, KeyNotFoundError,
                     LeaseReleasedError, MemAscendError, MemoryLockError, MetadataError,
                     NativeUnavailableError, PoolBusyError, PoolExhaustedError, ShortIOError,
                     StoreLockedError, SwapIOError)
from .engine import EngineConfig, EngineStats, IORequest, SwapEngine
from .handle import SwapHandle, gather
from .pool import Lease, PinnedPool, PoolConfig, PoolStats
from .store import StoreConfig, StoreStats, SwapStore
from .swapper import SwapperConfig, SwapperStats, TensorSwapper

__all__ = [
    "__version__", "PinnedPool", "PoolConfig", "PoolStats", "Lease", "MemAscendError",
    "ConfigError", "NativeUnavailableError", "PoolExhaustedError", "MemoryLockError",
    "LeaseReleasedError", "PoolBusyError", "SwapIOError", "MetadataError", "ShortIOError", "ChecksumError",
    "KeyNotFoundError", "StoreLockedError", "BackendUnavailableError", "SwapEngine",
    "EngineConfig", "EngineStats", "IORequest", "SwapHandle", "gather", "SwapStore",
    "StoreConfig", "StoreStats", "TensorSwapper", "SwapperConfig", "SwapperStats",
    "offload_model", "OffloadedModel", "AdamW", "LossScaler", "meta_parameters",
    "ActivationTier",
]

_LAZY = {"offload_model", "OffloadedModel", "AdamW", "LossScaler", "meta_parameters"}


def __getattr__(name: str) -> Any:
    # The training wrapper imports torch; load it on first use so that `memascend info` and
    # the pool stay light.
    if name in _LAZY:
        from . import offload

        return getattr(offload, name)
    if name == "ActivationTier":
        from .activations import ActivationTier

        return ActivationTier
    raise AttributeError(f"module 'memascend' has no attribute {name!r}")
