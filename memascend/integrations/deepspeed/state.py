"""Process-wide switch of the DeepSpeed drop-in: whether it is enabled, and with what options.

:func:`memascend.integrations.deepspeed.enable` sets it; the swappers read it when DeepSpeed
builds them (a ``"memascend"`` block in the DeepSpeed config is merged on top).
"""
from __future__ import annotations

from typing import Optional

from .runtime import Options

_OPTIONS: Optional[Options] = None


def set_options(options: Optional[Options]) -> None:
    """Enable with ``options``, or disable with None."""
    global _OPTIONS
    _OPTIONS = options


def options() -> Options:
    """The options given to ``enable()`` (defaults when it was not called)."""
    return _OPTIONS if _OPTIONS is not None else Options()


def enabled() -> bool:
    """Whether ``enable()`` is in effect."""
    return _OPTIONS is not None
