"""An out-of-core update's optimizer state: made resident and held, then given back.

Both streamed optimizer steps, the plain path's (:mod:`memascend.update_jobs`, one parameter
at a time as backward hands gradients over) and the DeepSpeed drop-in's
(:mod:`memascend.integrations.deepspeed.stream`, one piece of a sub-group at a time), run the
same sequence on a :class:`~memascend.swapper.TensorSwapper`: hold the state's keys resident
(:func:`acquire_state`: every read issued before any is waited on, moments that start at zero
created in their pinned buffers without a read or a write), update in place
(:func:`memascend.adam.adamw_update`), write each key behind from its own buffer
(``swap_out`` of the swapper's own view: no copy), and give the holds back whatever happened
(:func:`release_held`). The drivers around it differ by what drives them (autograd hooks or
stage 3's per-sub-group calls); this sequence is written once.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional


def acquire_state(sw: Any, keys: Iterable[str], held: list[str], fresh: Iterable[str] = (),
                  on_wait: Optional[Callable[[float], None]] = None) -> dict[str, Any]:
    """``{key: resident tensor}`` for ``keys``, each held in ``sw``.

    Keys in ``fresh`` are created zero-filled (nothing read); the others are swapped in,
    all reads issued before the first wait. Each key is appended to ``held`` as soon as it
    is held, so that the caller can give every hold back (:func:`release_held`) even when a
    read fails part-way. ``on_wait`` receives the seconds spent waiting for each read.
    """
    fresh = set(fresh)
    handles: list[tuple[str, Any]] = []
    for key in keys:
        if key in fresh:
            handles.append((key, None))
        else:
            held.append(key)
            handles.append((key, sw.swap_in(key)))
    out: dict[str, Any] = {}
    for key, h in handles:
        if h is None:
            out[key] = sw.create(key)
            held.append(key)
        else:
            t0 = time.perf_counter()
            out[key] = h.wait()
            if on_wait is not None:
                on_wait(time.perf_counter() - t0)
    return out


def release_held(sw: Any, keys: Iterable[str]) -> None:
    """Give back held keys; a key whose read failed is no longer held (nothing to give)."""
    for key in keys:
        try:
            sw.release(key)
        except ValueError:
            pass
