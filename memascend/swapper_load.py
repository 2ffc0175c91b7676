"""How the swapper reads a tensor into a buffer: :class:`Loading`, mixed into
:class:`memascend.swapper.TensorSwapper`.

A read takes a buffer under the budget (:meth:`TensorSwapper._acquire`), is issued to the
store, and completes on the engine's threads (:meth:`Loading._loaded`), which wakes the
consumers waiting for the key. A key stored in another dtype than it is served in streams
through a small staging buffer on the swapper's conversion thread, chunk by chunk, with its
checksum taken over the stored bytes (:meth:`Loading._convert_chunks`). All of it runs under
the swapper's lock except the I/O and the conversion.
"""
from __future__ import annotations

import time
from typing import Optional

from .buffers import BufferPool
from .errors import ChecksumError
from .handle import SwapHandle
from .store import crc32c
from .swapper_types import _Res


class Loading:
    """Reading keys into buffers (see the module docstring); state is the swapper's."""

    def _start_load(self, key: str, blocking: bool, prefetched: bool,
                    before: float = -1.0, claim: bool = False) -> Optional[_Res]:
        """Start reading ``key`` into a new buffer (or return the resident that appeared
        while waiting for budget). ``claim`` counts the caller as a user *before* any I/O is
        issued: a read can complete, and prefetches run, before this returns, and an
        unclaimed resident could be evicted under the caller."""
        meta = self._meta_of(key)
        lease = self._acquire(key, meta.served_bytes, blocking, before, loading=True,
                              spare=prefetched)
        if lease is None:
            r = self._res.get(key)  # prefetched meanwhile, or (not blocking) no budget
            if r is not None and claim:
                r.users += 1
            return r
        r = _Res(key, meta, lease, prefetched, self._pass)
        if meta.stored != meta.dtype:
            stage_bytes = min(self.config.chunk_bytes, BufferPool.size_class(meta.stored_bytes))
            try:
                r.stage = self._acquire(key, stage_bytes, blocking, before, spare=prefetched)
            except BaseException:
                self.buffers.put(lease)
                raise
            if r.stage is None:
                self.buffers.put(lease)
                return None
        existing = self._res.get(key)
        if existing is not None:
            # While this call waited for budget (lock released), a prefetch brought the key
            # in: use that one and give the buffers back.
            self.buffers.put(lease)
            if r.stage is not None:
                self.buffers.put(r.stage)
            if claim:
                existing.users += 1
            return existing
        if claim:
            r.users = 1
        self._res[key] = r
        self._inflight += 1
        try:
            if r.stage is None:
                h = self.store.read(key, lease)
            else:
                h = SwapHandle(f"converted read of {key!r}")
                self._bg.submit(self._read_converted, r, h)
        except BaseException:
            self._inflight -= 1
            del self._res[key]
            self.buffers.put(lease)
            if r.stage is not None:
                self.buffers.put(r.stage)
            raise
        h.add_done_callback(lambda hh: self._loaded(r, hh))
        return r

    def _read_converted(self, r: _Res, out: SwapHandle) -> None:
        """Stream the stored tensor through the staging buffer, converting each chunk."""
        try:
            self._convert_chunks(r)
            out.set_result(r.meta.stored_bytes)
        except BaseException as exc:
            exc.__traceback__ = None  # frames would keep views of the buffers alive
            out.set_exception(exc)

    def _convert_chunks(self, r: _Res) -> None:
        meta, stage = r.meta, r.stage
        entry = self.store.info(r.key)
        item = meta.stored.itemsize
        chunk = stage.size  # a multiple of 4096, hence of every element size
        dst = r.lease.as_tensor(meta.dtype, (meta.numel,))
        crc, done = 0, 0
        while done < meta.stored_bytes:
            n = min(chunk, meta.stored_bytes - done)
            self.store.read_range(r.key, stage, done, n).wait()
            if entry.crc is not None:
                crc = crc32c(stage.address, n, crc)
            dst[done // item:(done + n) // item].copy_(stage.as_tensor(meta.stored, (n // item,)))
            done += n
        del dst
        if entry.crc is not None and crc != entry.crc:
            raise ChecksumError(
                f"checksum mismatch for {r.key!r} in {self.store.path} at {entry.where()} "
                f"({entry.nbytes} bytes): stored {entry.crc:#010x}, read {crc:#010x}",
                key=r.key, path=self.store.path, offset=entry.offset, nbytes=entry.nbytes,
                expected=entry.crc, actual=crc)

    def _loaded(self, r: _Res, h: SwapHandle) -> None:
        now = time.monotonic()
        with self._cv:
            self._inflight -= 1
            if r.stage is not None:
                self.buffers.put(r.stage)
                r.stage = None
            exc = h.exception(0)
            if exc is None:
                r.state = "ready"
                r.view = r.lease.as_tensor(r.meta.dtype, r.meta.shape)
                self._c["reads"] += 1
                self._c["bytes_read"] += r.meta.stored_bytes
            else:
                r.state = "failed"
                r.error = exc
                if self._res.get(r.key) is r:
                    del self._res[r.key]
                self.buffers.put(r.lease)
            waiters, r.waiters = r.waiters, []
            for _out, t0 in waiters:
                self._c["wait_seconds"] += now - t0
            self._cv.notify_all()
        self._kick()
        for out, _t0 in waiters:
            if exc is None:
                out.set_result(r.view)
            else:
                out.set_exception(exc)
