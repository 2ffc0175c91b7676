"""Process-wide switch of the DeepSpeed drop-in: whether it is enabled, and with what options.

:func:`memascend.integrations.deepspeed.enable` sets it; the swappers read it when DeepSpeed
builds them (a ``"memascend"`` block in the DeepSpeed config is merged on top, for the engine
being built, on the base options of ``enable()``).
"""
from __future__ import annotations

from typing import Optional

from .runtime import Options

_OPTIONS: Optional[Options] = None
_BASE: Optional[Options] = None
_AIO_GIVEN = True


def set_options(options: Optional[Options], base: bool = False) -> None:
    """Enable with ``options``, or disable with None. ``base``: these are ``enable()``'s
    options (the wrapped ``deepspeed.initialize`` merges a config's block on them for one
    engine, then sets them back)."""
    global _OPTIONS, _BASE
    _OPTIONS = options
    if base:
        _BASE = options


def base_options() -> Options:
    """The options of ``enable()`` (defaults when it was not called)."""
    return _BASE if _BASE is not None else Options()


def options() -> Options:
    """The options given to ``enable()`` (defaults when it was not called)."""
    return _OPTIONS if _OPTIONS is not None else Options()


def enabled() -> bool:
    """Whether ``enable()`` is in effect."""
    return _OPTIONS is not None


def set_aio_given(given: bool) -> None:
    """Whether the config of the engine being built has an ``aio`` block of its own (set by
    the wrapped ``deepspeed.initialize``)."""
    global _AIO_GIVEN
    _AIO_GIVEN = bool(given)


def aio_given() -> bool:
    """See :func:`set_aio_given` (True outside ``deepspeed.initialize``)."""
    return _AIO_GIVEN
