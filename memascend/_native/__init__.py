"""Private binding to the C core (``native/``), built by cffi in API mode.

Everything public goes through the plain modules (``memascend.pool`` …); this package only
exposes ``ffi``/``lib`` and tells whether the extension was built. ``require()`` raises a
:class:`~memascend.errors.NativeUnavailableError` that says how to build it.
"""
from __future__ import annotations

from ..errors import NativeUnavailableError

try:  # pragma: no cover - exercised by every test that uses the pool
    from ._lib import ffi, lib  # type: ignore[import-not-found]

    AVAILABLE = True
    IMPORT_ERROR: Exception | None = None
except ImportError as exc:  # pragma: no cover - only on a broken install
    ffi = None
    lib = None
    AVAILABLE = False
    IMPORT_ERROR = exc


def require():
    """Return ``(ffi, lib)`` of the native extension.

    Raises
    ------
    NativeUnavailableError
        The extension was not built; the message names the import error and the fix.
    """
    if not AVAILABLE:
        raise NativeUnavailableError(
            f"memascend's native extension is not built ({IMPORT_ERROR}); "
            "run `make install` (or `pip install -e .`) in the source tree"
        )
    return ffi, lib
