"""memascend's start-up hook: enables the DeepSpeed drop-in in this Python process.

Active in every Python process whose ``PYTHONPATH`` holds this folder (``memascend run`` puts
it there, and child processes inherit it: ``torchrun`` workers, the ``deepspeed`` launcher's
ranks, HF Trainer and accelerate scripts). It imports nothing heavy at start-up: it only waits
for ``deepspeed`` to be imported, and right after DeepSpeed's own ``__init__`` has run (so
before any ``zero.Init``, ``from_pretrained`` under ZeRO-3 or ``deepspeed.initialize``) calls
``memascend.integrations.deepspeed.enable(**options)``, the options being the JSON object in
``$MEMASCEND_DEEPSPEED_OPTIONS`` (if set). If ``enable()`` refuses (an unsupported DeepSpeed,
a bad option), the import of ``deepspeed`` fails with its ``ConfigError``: the run never
goes on with stock swappers when memascend was asked for. Then the ``sitecustomize`` this
one hides on ``sys.path`` (e.g. the distribution's), if any, is run as it would have been.
"""
import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
OPTIONS_ENV = "MEMASCEND_DEEPSPEED_OPTIONS"


def _enable() -> None:
    import json

    import memascend.integrations.deepspeed as ma_ds

    raw = os.environ.get(OPTIONS_ENV, "").strip()
    options = json.loads(raw) if raw else {}
    if not isinstance(options, dict):
        raise ValueError(f"${OPTIONS_ENV} must be a JSON object, got {raw!r}")
    ma_ds.enable(**options)


class _Loader:
    """DeepSpeed's own loader, then :func:`_enable` (and the finder retires)."""

    def __init__(self, loader, finder):
        self._loader = loader
        self._finder = finder

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)
        _enable()

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _Finder:
    """Finds ``deepspeed`` through the rest of ``sys.meta_path`` and wraps its loader. It stays
    until deepspeed is actually imported: ``importlib.util.find_spec("deepspeed")`` (how
    transformers and accelerate test whether it is installed) also comes here."""

    def __init__(self):
        self._busy = False

    def find_spec(self, name, path=None, target=None):
        if name != "deepspeed" or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self._busy = False
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, self)
        return spec


def _run_hidden_sitecustomize() -> None:
    path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is not None and spec.loader is not None:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


if "deepspeed" in sys.modules:  # imported before site ran (unusual): enable now
    _enable()
else:
    sys.meta_path.insert(0, _Finder())
_run_hidden_sitecustomize()
