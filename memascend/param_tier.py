"""The parameter tier as the model sees it: which parameters are resident, and for whom.

A parameter of an offloaded model is resident while something holds it: its module's forward
(``"fwd"``), its module's backward (``"bwd"``), or an optimizer update (through the swapper
directly). :class:`ParamTier` counts the forward and backward holds per parameter, points the
parameter's ``.data`` at its pinned buffer while any is held and at an empty placeholder
otherwise, and tells the saved-tensor hooks (:class:`memascend.saved_views.SavedParamViews`)
which buffer holds which parameter, so that views autograd saved are re-derived from the
parameter when it comes back rather than read from a recycled buffer.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import PoolExhaustedError
from .saved_views import SavedParamViews


class ParamTier:
    """Holds and views of the parameters in the parameter tier (see the module docstring).

    Parameters
    ----------
    params:
        Name -> the model's parameter object.
    swapper:
        The parameter tier's :class:`~memascend.swapper.TensorSwapper` (keys ``p/<name>``).
    compute_dtype:
        The dtype of the placeholders.
    on_backward_fetch:
        Called before a fetch for backward (the owner tracks backward passes).
    jobs_pending, drain:
        Whether optimizer jobs that hold parameter buffers are still queued, and a wait for
        them: a fetch that finds the budget held waits for them before it gives up.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], swapper: Any,
                 compute_dtype: torch.dtype, on_backward_fetch: Callable[[], None],
                 jobs_pending: Callable[[], bool], drain: Callable[[], None]):
        self.params = params
        self.sw = swapper
        self.compute_dtype = compute_dtype
        self._on_bwd = on_backward_fetch
        self._jobs_pending = jobs_pending
        self._drain = drain
        self.holds: dict[str, dict[str, int]] = {"fwd": {}, "bwd": {}}
        self.saved = SavedParamViews(lambda n: self.params[n].data, self.ensure_resident)

    def fetch(self, names: list[str], hold: str) -> None:
        """Bring ``names`` in and count a hold of kind ``hold`` ("fwd" or "bwd") on each."""
        if not names:
            return
        if hold == "bwd":
            self._on_bwd()
        handles = [(n, self._swap_in(f"p/{n}")) for n in names]
        for n, h in handles:
            view = h.wait()
            self.params[n].data = view
            self.saved.track(n, view)
            self.holds[hold][n] = self.holds[hold].get(n, 0) + 1

    def _swap_in(self, key: str) -> Any:
        """``swap_in(key)``; when the budget is held, part of it may be held by optimizer
        jobs that have not run yet: wait for them, then try again."""
        try:
            return self.sw.swap_in(key)
        except PoolExhaustedError:
            if not self._jobs_pending():
                raise
            self._drain()
            return self.sw.swap_in(key)

    def held(self, name: str) -> bool:
        """Whether a forward or backward hold keeps ``name`` resident."""
        return bool(self.holds["fwd"].get(name) or self.holds["bwd"].get(name))

    def evict_view(self, name: str) -> None:
        """Point the parameter at its placeholder (its buffer may be recycled)."""
        p = self.params[name]
        self.saved.untrack(name, p.data)
        p.data = torch.empty(0, dtype=self.compute_dtype)

    def ensure_resident(self, name: str) -> torch.Tensor:
        """The parameter's buffer view, fetched for backward if it is not resident (a saved
        view is unpacked after its parameter was released)."""
        if not self.held(name):
            self.fetch([name], hold="bwd")
        return self.params[name].data

    def drop_holds(self, name: str, hold: str) -> None:
        """Give back every hold of kind ``hold`` on ``name``."""
        count = self.holds[hold].pop(name, 0)
        if not self.held(name):
            # Drop the view before releasing: a live view keeps a recycled buffer mapped.
            self.evict_view(name)
        for _ in range(count):
            self.sw.release(f"p/{name}")

    def release_forward(self, names: list[str]) -> None:
        """A module's forward is done with ``names``: one forward hold each."""
        for n in names:
            count = self.holds["fwd"].get(n, 0)
            if count == 1:
                del self.holds["fwd"][n]
            elif count:
                self.holds["fwd"][n] = count - 1
            if not self.held(n):
                self.evict_view(n)
            if count:
                self.sw.release(f"p/{n}")

    def drop_all(self) -> None:
        """Give back every hold (the end of a backward pass: activation checkpointing may
        stop a recompute early, so an interrupted forward never released its own)."""
        for hold in ("bwd", "fwd"):
            for name in list(self.holds[hold]):
                self.drop_holds(name, hold)
