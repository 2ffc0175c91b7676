"""DeepSpeed's ``aio_handle`` interface, served by a memascend swap store.

DeepSpeed's swappers talk to storage through an ``aio_handle``: ``async_pread`` /
``async_pwrite`` of a tensor to a *file path*, ``wait()`` returning how many operations
finished, and pinned-memory helpers. :class:`StoreAioHandle` keeps that interface but maps
each path to a key in the tier's single :class:`~memascend.store.SwapStore` (the path relative
to the swap folder, e.g. ``12_param.tensor.swp``), so DeepSpeed's bookkeeping is reused while
the bytes go through memascend's engine. Unlike the stock handle, every completion is
checked: ``wait()`` raises the first failure (a :class:`~memascend.errors.SwapIOError` naming
errno, key, path, offset and size, or a ChecksumError) after all operations have finished.
Pinned tensors are exact-size leases from the runtime's pool (no power-of-two rounding, no
SIGABRT when the memlock limit refuses).
"""
from __future__ import annotations

import os
from typing import Any

from ...errors import MemAscendError
from ...store import SwapStore
from .runtime import Runtime


class StoreAioHandle:
    """An ``aio_handle`` look-alike over ``store``, with paths relative to ``folder``.

    Parameters
    ----------
    runtime:
        The shared runtime (pinned leases).
    store:
        The tier's swap area.
    folder:
        The swap folder DeepSpeed builds its paths in.
    block_size, queue_depth:
        Reported back by the getters (DeepSpeed prints them).
    """

    def __init__(self, runtime: Runtime, store: SwapStore, folder: str, block_size: int = 1 << 20,
                 queue_depth: int = 8):
        self._rt = runtime
        self._store = store
        self._folder = os.path.abspath(folder)
        self._pending: list[Any] = []
        self._block_size = block_size
        self._queue_depth = queue_depth

    def key_of(self, path: str) -> str:
        """The store key of a DeepSpeed swap path in this handle's folder."""
        rel = os.path.relpath(os.path.abspath(path), self._folder)
        if rel.startswith(".."):
            raise MemAscendError(f"swap path {path} is outside the swap folder {self._folder}")
        return rel

    def _locate(self, path: str) -> tuple[SwapStore, str]:
        """The store and key of ``path``: this handle's area, or another tier's (DeepSpeed's
        fast optimizer init reads the parameter tier through the optimizer's handle)."""
        path = os.path.abspath(path)
        if os.path.relpath(path, self._folder).startswith(".."):
            found = self._rt.store_for(path)
            if found is None:
                raise MemAscendError(f"swap path {path} is in no memascend swap area")
            return found
        return self._store, self.key_of(path)

    @staticmethod
    def _check_offset(file_offset: int, path: str) -> None:
        if file_offset != 0:
            raise MemAscendError(f"{path}: file offset {file_offset} is not supported (DeepSpeed "
                                 "swaps whole tensors at offset 0)")

    def async_pread(self, buffer: Any, filename: str, file_offset: int = 0) -> int:
        """Start reading ``filename``'s tensor into ``buffer``; 0 on a started read."""
        self._check_offset(file_offset, filename)
        store, key = self._locate(filename)
        self._pending.append(store.read(key, buffer))
        return 0

    def async_pwrite(self, buffer: Any, filename: str, file_offset: int = 0) -> int:
        """Start writing ``buffer`` as ``filename``'s tensor; 0 on a started write."""
        self._check_offset(file_offset, filename)
        store, key = self._locate(filename)
        self._pending.append(store.write(key, buffer.detach()))
        return 0

    def sync_pread(self, buffer: Any, filename: str, file_offset: int = 0) -> int:
        """Blocking :meth:`async_pread` (of this one operation); returns 1."""
        self._check_offset(file_offset, filename)
        store, key = self._locate(filename)
        store.read(key, buffer).wait()
        return 1

    def sync_pwrite(self, buffer: Any, filename: str, file_offset: int = 0) -> int:
        """Blocking :meth:`async_pwrite` (of this one operation); returns 1."""
        self._check_offset(file_offset, filename)
        store, key = self._locate(filename)
        store.write(key, buffer.detach()).wait()
        return 1

    def wait(self) -> int:
        """Wait for every started operation; returns their count, or raises the first
        failure once all have finished."""
        pending, self._pending = self._pending, []
        first = None
        for h in pending:
            try:
                h.wait()
            except BaseException as exc:  # noqa: B036 - re-raised below after draining
                first = first or exc
        if first is not None:
            raise first
        return len(pending)

    # ---- pinned memory ----
    def new_cpu_locked_tensor(self, num_elem: int, example_tensor: Any) -> Any:
        """A 1-D tensor of ``num_elem`` elements of ``example_tensor``'s dtype on an exact
        pinned lease."""
        esize = example_tensor.element_size()
        lease = self._rt.lease(int(num_elem) * esize)
        return lease.as_tensor(example_tensor.dtype, int(num_elem))

    def free_cpu_locked_tensor(self, tensor: Any) -> bool:
        """Give back a tensor from :meth:`new_cpu_locked_tensor`."""
        lease = self._rt.lease_of(tensor)
        if lease is None:
            return False
        self._rt.free(lease)
        return True

    def is_pinned(self, tensor: Any) -> bool:
        """True if ``tensor`` lies in memory leased from the runtime's pool."""
        return self._rt.lease_of(tensor) is not None

    # ---- the getters the stock handle has ----
    def get_block_size(self) -> int:  # noqa: D102
        return self._block_size

    def get_queue_depth(self) -> int:  # noqa: D102
        return self._queue_depth

    def get_single_submit(self) -> bool:  # noqa: D102
        return False

    def get_overlap_events(self) -> bool:  # noqa: D102
        return True

    def get_intra_op_parallelism(self) -> int:  # noqa: D102
        return 1

    def get_thread_count(self) -> int:  # noqa: D102
        return 1
