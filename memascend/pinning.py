"""Host-memory registration with the GPU runtime (the "pinned" in pinned pool).

The native pool locks its arenas with mlock; for asynchronous host-to-device copies CUDA also
needs them registered (``cudaHostRegister``). The pool calls a *registrar* for every arena it
maps and before every arena it unmaps. On a CUDA machine that is :class:`CudaRegistrar`; on a
machine without CUDA it is :class:`HostOnlyRegistrar`, which only records the ranges — so the
very same hook path runs, and is tested, on CPU; only the runtime call differs.
"""
from __future__ import annotations

import errno
import threading
from typing import Protocol


class Registrar(Protocol):
    """What the pool needs from a registrar."""

    #: Short name shown in stats and ``memascend info``.
    name: str

    def register(self, base: int, size: int) -> None:
        """Register ``[base, base+size)``; raise ``OSError`` on failure."""

    def unregister(self, base: int, size: int) -> None:
        """Undo :meth:`register` for the range starting at ``base``."""


class HostOnlyRegistrar:
    """Registrar for machines without CUDA: records ranges, registers nothing.

    ``ranges`` maps base address to size for every arena currently mapped, which lets tests
    check that the pool reports every map and unmap exactly once.
    """

    name = "none (no CUDA device)"

    def __init__(self) -> None:
        self.ranges: dict[int, int] = {}
        self.registered_total = 0
        self._mu = threading.Lock()

    def register(self, base: int, size: int) -> None:
        with self._mu:
            if base in self.ranges:
                raise OSError(errno.EEXIST, f"range at {base:#x} registered twice")
            self.ranges[base] = size
            self.registered_total += 1

    def unregister(self, base: int, size: int) -> None:
        with self._mu:
            if self.ranges.pop(base, None) != size:
                raise OSError(errno.ENOENT, f"range at {base:#x}+{size} was not registered")


class CudaRegistrar(HostOnlyRegistrar):
    """Registers arenas as page-locked with the CUDA runtime through ``torch.cuda.cudart()``."""

    name = "cudaHostRegister"

    def __init__(self) -> None:
        super().__init__()
        import torch

        self._cudart = torch.cuda.cudart()

    def register(self, base: int, size: int) -> None:
        rc = self._cudart.cudaHostRegister(base, size, 0)
        code = int(getattr(rc, "value", rc))
        if code != 0:
            raise OSError(errno.EIO, f"cudaHostRegister({base:#x}, {size}) failed: {rc}")
        super().register(base, size)

    def unregister(self, base: int, size: int) -> None:
        super().unregister(base, size)
        self._cudart.cudaHostUnregister(base)


def default_registrar() -> Registrar:
    """The registrar for this machine: CUDA when a device is present, else host-only."""
    try:
        import torch

        if torch.cuda.is_available():
            return CudaRegistrar()
    except Exception:  # torch missing or CUDA init failing: host memory still works
        pass
    return HostOnlyRegistrar()
