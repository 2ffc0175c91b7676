"""How a swap store reads: :class:`Reading`, mixed into :class:`memascend.store.SwapStore`,
and the two helpers reads and writes share: :func:`crc32c` and :func:`_memory_of` (the
address, size and keep-alive of a lease, a tensor or a buffer).

A read of a whole key goes straight from the area into the destination when it is aligned and
large enough (a lease, a 4 KiB-aligned tensor), else through a bounce buffer; its extent is
pinned against reuse while the read is in flight, and with checksums on the bytes read are
verified against the key's CRC32C before the handle completes (a mismatch is a
:class:`~memascend.errors.ChecksumError` naming the key, file, offset and size).
``read_range`` reads part of a key for streaming through a small buffer (the caller chains the
checksum); ``read_tensor`` allocates the tensor.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from . import _native
from .errors import ChecksumError
from .extents import ALIGN, round_up
from .handle import SwapHandle
from .manifest import Entry
from .pool import Lease


def crc32c(address: int, nbytes: int, crc: int = 0) -> int:
    """CRC32C of ``nbytes`` at ``address`` (native, GIL released)."""
    ffi, lib = _native.require()
    c = ffi.new("uint32_t *", crc)
    lib.ma_crc32c(c, ffi.cast("void *", address), nbytes)
    return int(c[0])


def _memory_of(obj: Any, writable: bool) -> tuple[int, int, Optional[int], Any, Any, Any]:
    """``(address, nbytes, room, keepalive, dtype, shape)`` of a Lease, tensor or buffer.

    ``room`` is how many bytes may be touched from ``address`` (a lease's rounded size), or
    None when only ``nbytes`` may be.
    """
    if isinstance(obj, Lease):
        mv = obj.memoryview()
        return obj.address, obj.nbytes, obj.size, mv, None, None
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu":
            raise ValueError(f"tensor on {obj.device}: the store moves host memory; copy it "
                             "to a pinned lease first")
        if not obj.is_contiguous():
            raise ValueError("tensor is not contiguous; call .contiguous() first")
        return (obj.data_ptr(), obj.numel() * obj.element_size(), None, obj,
                str(obj.dtype).replace("torch.", ""), tuple(obj.shape))
    ffi, _lib = _native.require()
    mv = memoryview(obj)
    if writable and mv.readonly:
        raise ValueError("destination buffer is read-only")
    cbuf = ffi.from_buffer(mv, require_writable=writable)
    return int(ffi.cast("uintptr_t", cbuf)), mv.nbytes, None, (mv, cbuf), None, None


class Reading:
    """Reads of a swap store (see the module docstring); state is the store's."""

    def read(self, key: str, dst: Any) -> SwapHandle:
        """Read ``key`` into ``dst`` (a Lease, a contiguous CPU tensor or a writable buffer).

        ``dst`` must hold at least the stored byte count. The handle's result is the number
        of bytes read; with checksums on, a mismatch fails it with ChecksumError.

        Raises
        ------
        KeyNotFoundError
            The store does not hold ``key``.
        ValueError
            ``dst`` is too small or not writable.
        """
        self._check_open()
        addr, cap, room, keep, _dt, _sh = _memory_of(dst, writable=True)

        def fits(entry: Entry) -> None:
            if cap < entry.nbytes:
                raise ValueError(f"destination holds {cap} bytes, {key!r} has {entry.nbytes}")

        entry = self._pin_entry(key, fits)
        if not isinstance(entry, Entry):  # a piecewise overwrite of it is in flight: wait
            return self._after_pieces(entry, lambda: self.read(key, dst), f"read of {key!r}")
        rounded = round_up(entry.nbytes)
        aligned = addr % ALIGN == 0
        space = room if room is not None else cap
        if aligned and space >= rounded:
            inner = self._transfer("read", addr, entry.spans(), 0, rounded, key)
        else:
            inner = self._bounced(key, "read", addr, entry.nbytes, entry.spans(), keep,
                                  direct_len=entry.nbytes // ALIGN * ALIGN if aligned else 0)
        out = SwapHandle(f"read of {key!r}")
        inner.add_done_callback(lambda h: self._read_done(h, entry, addr, out, keep))
        return out

    def _pin_entry(self, key: str, check: Any) -> Any:
        """``key``'s entry, checked by ``check`` (raises ValueError) and pinned against reuse
        with the read counted as pending, in one step under the lock: an overwrite landing
        in between cannot release the extents being read. When a piecewise overwrite of the
        key is in flight (:mod:`memascend.store_pieces`: its pieces free old ranges without
        looking at pins), nothing is pinned: the read is counted as pending and that write
        returned instead, for the read to wait for."""
        with self._mu:
            entry = self.info(key)  # the lock is reentrant
            check(entry)  # the new version has the same size: valid for it too
            self._pending += 1
            part = self._pieced.get(key)
            if part is not None:
                return part
            self._pin(entry.offset)
        return entry

    def _read_done(self, h: SwapHandle, entry: Entry, addr: int, out: SwapHandle,
                   keep: Any) -> None:
        exc = h.exception(0)
        if exc is None and entry.crc is not None:
            actual = crc32c(addr, entry.nbytes)
            if actual != entry.crc:
                exc = ChecksumError(
                    f"checksum mismatch for {entry.key!r} in {self.path} at "
                    f"{entry.where()} ({entry.nbytes} bytes): stored {entry.crc:#010x}, read "
                    f"{actual:#010x}", key=entry.key, path=self.path, offset=entry.offset,
                    nbytes=entry.nbytes, expected=entry.crc, actual=actual)
        with self._mu:
            self._unpin(entry.offset)
            self._counts["reads"] += 1
            if exc is None:
                self._counts["bytes_read"] += entry.nbytes
            if exc is not None:
                self._counts["read_errors"] += 1
                if isinstance(exc, ChecksumError):
                    self._counts["checksum_failures"] += 1
            self._pending -= 1
            self._mu.notify_all()
        if exc is not None:
            out.set_exception(exc)
        else:
            out.set_result(entry.nbytes)

    def read_range(self, key: str, dst: Lease, start: int, nbytes: int) -> SwapHandle:
        """Read bytes ``[start, start+nbytes)`` of ``key`` into the lease ``dst`` (unverified).

        For streaming a large tensor through a small buffer; ``start`` must be a multiple of
        4096 and ``dst`` must hold ``nbytes`` rounded up to 4096. The caller verifies the
        checksum over all pieces (``crc32c(addr, n, crc)`` chains) against ``info(key).crc``.

        Raises
        ------
        KeyNotFoundError, ValueError
            Unknown key; a range outside the tensor, a misaligned start, a small buffer.
        """
        self._check_open()
        if not isinstance(dst, Lease) or dst.size < round_up(nbytes):
            raise ValueError(f"read_range needs a lease of at least {round_up(nbytes)} bytes")

        def inside(entry: Entry) -> None:
            if start % ALIGN or start < 0 or nbytes <= 0 or start + nbytes > entry.nbytes:
                raise ValueError(f"range {start}+{nbytes} of {key!r} ({entry.nbytes} bytes): "
                                 f"start must be a multiple of {ALIGN} and the range inside "
                                 "the tensor")

        entry = self._pin_entry(key, inside)
        if not isinstance(entry, Entry):  # a piecewise overwrite of it is in flight: wait
            return self._after_pieces(entry, lambda: self.read_range(key, dst, start, nbytes),
                                      f"read of {key!r}[{start}:{start + nbytes}]")
        inner = self._transfer("read", dst.address, entry.spans(), start, round_up(nbytes), key)
        out = SwapHandle(f"read of {key!r}[{start}:{start + nbytes}]")
        unverified = dataclasses.replace(entry, crc=None, nbytes=nbytes)  # result: range size
        inner.add_done_callback(lambda h: self._read_done(h, unverified, dst.address, out, dst))
        return out

    def read_tensor(self, key: str) -> SwapHandle:
        """Read ``key`` into a new torch tensor of its recorded dtype and shape.

        Keys written from bytes have no dtype: they come back as a 1-D uint8 tensor.
        """
        import torch

        e = self.info(key)
        dtype = getattr(torch, e.dtype) if e.dtype else torch.uint8
        shape = e.shape if e.shape is not None else (e.nbytes,)
        t = torch.empty(shape, dtype=dtype)
        out = SwapHandle(f"read of {key!r}")
        self.read(key, t).add_done_callback(
            lambda h: out.set_exception(h.exception(0)) if h.exception(0) else out.set_result(t))
        return out
