"""Saved-tensor hooks that keep autograd from reading recycled parameter buffers.

During forward, autograd saves tensors for backward, often a view of a weight (``linear``
saves ``weight.t()``). An offloaded parameter lives in a pinned swap buffer only while its
module runs; by the time backward reads the saved view, that buffer may hold another tensor.
:class:`SavedParamViews` therefore packs a saved tensor that lies inside a resident parameter's
buffer as a reference — parameter name, size, stride, offset — and unpacks it by fetching the
parameter again when it is not resident and re-deriving the same view from its current buffer.
A view it cannot re-derive (another dtype, an unaligned offset) is saved as a copy: correct,
at the cost of memory. Any other tensor goes to the hooks that were active before (activation
checkpointing's, for instance), so checkpointing still drops and recomputes activations; with
no outer hooks it is saved as usual.

The owner pushes the hooks around each parameter-owning module's forward, which includes a
checkpoint's recomputation, so forward and recomputation make the same choices (checkpointing
counts the tensors it sees and requires the counts to match).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch


class _ParamRef:
    """A saved tensor that is a view of parameter ``name``'s buffer."""

    __slots__ = ("name", "size", "stride", "offset")

    def __init__(self, name: str, size: tuple[int, ...], stride: tuple[int, ...], offset: int):
        self.name = name
        self.size = size
        self.stride = stride
        self.offset = offset  # elements from the parameter's first element


class _Copy:
    """A saved parameter view that could not be re-derived, kept as a private copy."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _Outer:
    """What the outer (previously active) pack hook returned, with its unpack hook."""

    __slots__ = ("unpack", "packed")

    def __init__(self, unpack: Callable[[Any], torch.Tensor], packed: Any):
        self.unpack = unpack
        self.packed = packed


def _top_hooks() -> Optional[tuple[Callable, Callable]]:
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(True) if top is not None else None


class _Pair:
    """One pushed (pack, unpack) pair, chained to the hooks that were on top when pushed."""

    def __init__(self, views: "SavedParamViews", outer: Optional[tuple[Callable, Callable]]):
        self.views = views
        self.outer = outer

    def pack(self, t: torch.Tensor) -> Any:
        ref = self.views._ref(t)
        if ref is not None:
            return ref
        if self.outer is not None:
            return _Outer(self.outer[1], self.outer[0](t))
        return t.detach()  # the hook may not keep a reference to t itself

    def unpack(self, x: Any) -> torch.Tensor:
        if isinstance(x, _ParamRef):
            base = self.views._ensure(x.name)
            return base.as_strided(x.size, x.stride, base.storage_offset() + x.offset)
        if isinstance(x, _Copy):
            return x.tensor
        if isinstance(x, _Outer):
            return x.unpack(x.packed)
        return x


class SavedParamViews:
    """Tracks which buffers hold resident parameters and pushes/pops the saved-tensor hooks.

    Parameters
    ----------
    data_of:
        ``data_of(name)`` is the parameter's current tensor (its buffer view when resident).
    ensure:
        ``ensure(name)`` makes the parameter resident for backward and returns its view.
    """

    def __init__(self, data_of: Callable[[str], torch.Tensor],
                 ensure: Callable[[str], torch.Tensor]):
        self._data_of = data_of
        self._ensure = ensure
        self._live: dict[int, str] = {}  # storage data_ptr -> name of the resident parameter
        self._pushed: list[_Pair] = []
        self.copies = 0  # saved views kept as copies (see the module docstring)

    # ---- residency ----
    def track(self, name: str, view: torch.Tensor) -> None:
        """``name`` is now resident in ``view``'s buffer."""
        self._live[view.untyped_storage().data_ptr()] = name

    def untrack(self, name: str, view: torch.Tensor) -> None:
        """``name`` no longer lives in ``view``'s buffer."""
        if view.numel() == 0:
            return
        ptr = view.untyped_storage().data_ptr()
        if self._live.get(ptr) == name:
            del self._live[ptr]

    def _ref(self, t: torch.Tensor) -> Any:
        if not self._live or t.layout != torch.strided or t.device.type != "cpu":
            return None
        try:
            ptr = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # tensors without storage
            return None
        name = self._live.get(ptr)
        if name is None:
            return None
        base = self._data_of(name)
        nbytes = t.data_ptr() - base.data_ptr()
        if t.dtype != base.dtype or nbytes % base.element_size():
            self.copies += 1
            return _Copy(t.detach().clone())
        return _ParamRef(name, tuple(t.size()), tuple(t.stride()), nbytes // base.element_size())

    # ---- the hook stack ----
    def push(self) -> None:
        """Make these hooks the innermost saved-tensor hooks (chained to the current ones)."""
        top = _top_hooks()
        owner = getattr(top[0], "__self__", None) if top is not None else None
        outer = owner.outer if isinstance(owner, _Pair) and owner.views is self else top
        pair = _Pair(self, outer)
        torch._C._autograd._push_saved_tensors_default_hooks(pair.pack, pair.unpack)
        self._pushed.append(pair)

    def pop(self) -> None:
        """Undo the latest :meth:`push`."""
        self._pushed.pop()
        torch._C._autograd._pop_saved_tensors_default_hooks()
