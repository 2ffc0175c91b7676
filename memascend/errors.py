"""Typed errors of memascend.

Every error derives from :class:`MemAscendError`, and also from the built-in exception a
caller would naturally catch (``ValueError`` for bad configuration, ``MemoryError`` when the
pool cannot supply memory, ``OSError`` for I/O). Messages name what failed: the size, the
limit, the tensor key, the file, the offset.
"""
from __future__ import annotations

import errno as _errno


class MemAscendError(Exception):
    """Base class of all memascend errors."""


class ConfigError(MemAscendError, ValueError):
    """A configuration value is invalid or unknown; ``key`` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key


class NativeUnavailableError(MemAscendError, ImportError):
    """The native extension is not built or cannot be loaded."""


class PoolExhaustedError(MemAscendError, MemoryError):
    """The pinned pool cannot supply ``nbytes`` (too large, over the pool limit, mmap refused)."""

    def __init__(self, message: str, *, nbytes: int, reason: str, errno: int | None = None):
        super().__init__(message)
        self.nbytes = nbytes
        self.reason = reason
        self.errno = errno


class MemoryLockError(PoolExhaustedError):
    """``lock="required"`` and the kernel refused to lock the memory (RLIMIT_MEMLOCK)."""

    def __init__(self, message: str, *, nbytes: int, errno: int | None, limit: int | None):
        super().__init__(message, nbytes=nbytes, reason="mlock", errno=errno)
        self.limit = limit


class LeaseReleasedError(MemAscendError, RuntimeError):
    """A lease was used, or released, after it had been released."""


class PoolBusyError(MemAscendError, RuntimeError):
    """The pool was closed while leases were still live."""


class BackendUnavailableError(MemAscendError, RuntimeError):
    """An I/O backend was asked for by name but cannot run here; the message says why."""


class SwapIOError(MemAscendError, OSError):
    """An I/O request failed; carries errno, path, offset, nbytes and the tensor key."""

    def __init__(self, errno: int, message: str, *, path: str | None = None,
                 offset: int | None = None, nbytes: int | None = None, key: str | None = None):
        super().__init__(errno, message)
        self.path = path
        self.offset = offset
        self.nbytes = nbytes
        self.key = key

    def __str__(self) -> str:
        where = ", ".join(
            f"{k}={v}" for k, v in (("key", self.key), ("path", self.path),
                                    ("offset", self.offset), ("nbytes", self.nbytes))
            if v is not None
        )
        return f"[Errno {self.errno}] {self.strerror}" + (f" ({where})" if where else "")


class MetadataError(SwapIOError):
    """Metadata on disk (a store's manifest or journal, a checkpoint's state file) is damaged,
    of the wrong shape, or cannot be kept consistent; names the file and the byte offset.

    Its errno is EIO unless the failure that caused it had its own (e.g. ENOSPC).
    """

    def __init__(self, message: str, *, path: str, offset: int | None = None,
                 nbytes: int | None = None, key: str | None = None, code: int = _errno.EIO):
        super().__init__(code, message, path=path, offset=offset, nbytes=nbytes, key=key)


class ShortIOError(SwapIOError):
    """A transfer moved fewer bytes than asked and could not be completed."""


class ChecksumError(MemAscendError):
    """Bytes read back do not match the checksum recorded when they were written."""

    def __init__(self, message: str, *, key: str, path: str, offset: int, nbytes: int,
                 expected: int, actual: int):
        super().__init__(message)
        self.key = key
        self.path = path
        self.offset = offset
        self.nbytes = nbytes
        self.expected = expected
        self.actual = actual


class KeyNotFoundError(MemAscendError, KeyError):
    """A key was asked of a swap store that does not hold it."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "key not found"


class StoreLockedError(MemAscendError, RuntimeError):
    """Another process (or object) has the swap store open."""
