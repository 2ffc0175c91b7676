"""Reading the optimizer state ahead during forward, for the backward that follows.

In a fused window the optimizer worker updates each parameter as soon as its gradient is
final, and it needs the parameter's Adam moments (and fp32 master in mixed precision) then.
The moments used to be read when the parameter's module started backward, so the first
updates of a backward (the LM head, often the largest tensors) waited for their reads, and
backward, reading parameters and moments and writing updates at once, is where the disk
bounds the step. Forward reads only parameters, and leaves the disk idle while it computes.
:class:`ForwardReadAhead` records the order in which the first forward fetched parameters;
in later forwards, once half of them have been fetched, it asks the optimizer tier to read
ahead the state of the parameters backward will reach first (the reverse of forward's
order), up to half of that tier's pinned budget, when the backward is expected to fuse its
updates (:meth:`memascend.fused.FusedAdam.expects_fused_backward`). A wrong guess costs
only reads: buffers read ahead and not used are evicted like any other.
"""
from __future__ import annotations

import math
from typing import Callable


class ForwardReadAhead:
    """See the module docstring. Called on the compute thread by the module hooks."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], keys_of: Callable[[str], list[str]],
                 expects_fused: Callable[[], bool], prefetch: Callable[[list[str]], None],
                 limit_bytes: int):
        self._numel = {n: math.prod(s) for n, s in shapes.items()}
        self._keys_of = keys_of  # a parameter's stored optimizer-state keys (fp32 each)
        self._expects_fused = expects_fused
        self._prefetch = prefetch
        self.limit_bytes = limit_bytes
        self.order: list[str] = []  # forward's fetch order, recorded in the first forward
        self._seen: set[str] = set()
        self._recording = True
        self._fetched = 0  # parameters fetched by this forward so far
        self._issued = False
        self.issued_bytes = 0  # bytes asked for in all forwards (for stats)

    def backward_starts(self) -> None:
        """A backward pass begins: the forward before it is over. After the first one,
        forward's order is known; the next forward counts its fetches from zero."""
        if self.order:
            self._recording = False
        self._fetched = 0
        self._issued = False

    def fetched(self, names: list[str]) -> None:
        """A module's forward fetched ``names`` (not a recomputation inside backward)."""
        if self._recording:
            for n in names:
                if n not in self._seen:
                    self._seen.add(n)
                    self.order.append(n)
            return
        self._fetched += len(names)
        if not self._issued and 2 * self._fetched >= len(self.order):
            self._issued = True
            if self._expects_fused():
                self._issue()

    def _issue(self) -> None:
        keys: list[str] = []
        total = 0
        for n in reversed(self.order):
            ks = self._keys_of(n)
            nbytes = 4 * self._numel.get(n, 0) * len(ks)
            if total + nbytes > self.limit_bytes:
                break
            keys += ks
            total += nbytes
        if keys:
            self.issued_bytes += total
            self._prefetch(keys)
