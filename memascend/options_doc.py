"""``docs/options.md``, generated from the code: every option and environment variable.

Each component's options are the fields of one frozen dataclass (defaults and descriptions
come from the class and its docstring; ``offload_model``'s scalar options are
:class:`memascend.offload_types.OffloadOptions`); the environment variables are the per-field
``MEMASCEND_<SECTION>_<FIELD>`` overrides of :mod:`memascend.config` and the few read
elsewhere (:data:`ENVIRONMENT`). ``python -m memascend.options_doc > docs/options.md`` writes
the page; ``tests/test_options_doc.py`` fails when the page and the code disagree, and when
the package reads an environment variable this page does not list.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
from typing import Any, Optional

#: (title, module, class, environment prefix or None, how the options are given)
SECTIONS = (
    ("Pinned pool", "memascend.pool", "PoolConfig", "MEMASCEND_POOL_",
     "`PinnedPool(**options)` or `PinnedPool(config=PoolConfig(...))`"),
    ("Swap engine", "memascend.engine", "EngineConfig", "MEMASCEND_ENGINE_",
     "`SwapEngine(**options)` or `SwapEngine(config=EngineConfig(...))`"),
    ("Swap store", "memascend.store_config", "StoreConfig", "MEMASCEND_STORE_",
     "`SwapStore(path, **options)` or `SwapStore(path, config=StoreConfig(...))`"),
    ("Tensor swapper", "memascend.swapper", "SwapperConfig", "MEMASCEND_SWAPPER_",
     "`TensorSwapper(store, budget_bytes=..., **options)`. The variables reach every "
     "swapper, also those `offload_model`, the activation tier and the drop-in build, for "
     "the fields they do not set (each sets `budget_bytes`, so its variable only serves "
     "swappers of your own)"),
    ("DeepSpeed drop-in", "memascend.dropin_options", "Options", "MEMASCEND_DROPIN_",
     "`memascend.integrations.deepspeed.enable(**options)`, a `\"memascend\": {...}` block "
     "in the DeepSpeed config (it wins over everything), or `memascend run --set KEY=VALUE`"),
    ("offload_model", "memascend.offload_types", "OffloadOptions", "MEMASCEND_OFFLOAD_",
     "`memascend.offload_model(model, swap_dir, **options)`; besides these it takes the "
     "objects `optimizer` (`memascend.AdamW`), `loss_scaler`, `engine`, `pool` and `init` "
     "(`help(memascend.offload_model)`)"),
)

#: Environment variables read outside the per-field overrides: name -> what it does.
ENVIRONMENT = {
    "MEMASCEND_TUNED": "The tuned file `memascend tune` writes and engines and pools read "
                       "(default `$XDG_CONFIG_HOME/memascend/tuned.json`, else "
                       "`~/.config/memascend/tuned.json`); `off` ignores any "
                       "(`memascend/tune.py`).",
    "XDG_CONFIG_HOME": "Where the default tuned file lives (see `MEMASCEND_TUNED`).",
    "MEMASCEND_DEEPSPEED_OPTIONS": "Set by `memascend run`: the drop-in's options (JSON) for "
                                   "the start-up hook in every Python process of the command.",
    "MALLOC_MMAP_THRESHOLD_": "glibc's own setting; `memascend profile estimate` takes it as "
                              "the default of `--mmap-threshold`.",
    "MEMASCEND_NO_URING": "Build time: `1` builds the native core without liburing (the "
                          "`threads` backend only).",
    "CC": "Build time: the C compiler of the native core.",
}


def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> its description, from the class docstring's Attributes/Parameters."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    current: list[str] = []
    for line in doc.splitlines():
        m = re.match(r"^(\w+(?:, \w+)*):\s*$", line)
        if m:
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                out[n] = ""
        elif current and line.startswith("    "):
            for n in current:
                out[n] = (out[n] + " " + line.strip()).strip()
        elif current and line.strip() and not line.startswith(" "):
            current = []
    return out


def _default(value: Any) -> str:
    if value is dataclasses.MISSING or value is inspect.Parameter.empty:
        return "(required)"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"`{value!r}`"
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if value >= size and value % size == 0:
            return f"`{value}` ({value // size} {unit})"
    return f"`{value}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section(title: str, module: str, name: str, env: Optional[str], how: str) -> list[str]:
    cls = getattr(importlib.import_module(module), name)
    docs = _field_docs(cls)
    lines = [f"## {title}", "", f"`{module}.{name}`: {how}.", ""]
    head = "| option | default |" + (" environment |" if env else "") + " what it does |"
    lines += [head, "|" + "|".join(["---"] * (head.count("|") - 1)) + "|"]
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING  # type: ignore
            else dataclasses.MISSING)
        row = f"| `{f.name}` | {_default(default)} |"
        if env:
            row += f" `{env}{f.name.upper()}` |"
        row += f" {_cell(docs.get(f.name, ''))} |"
        lines.append(row)
    return lines + [""]


def render() -> str:
    """The whole page."""
    lines = ["# Options and environment variables", "",
             "Generated from the code by `python -m memascend.options_doc > docs/options.md` "
             "(`tests/test_options_doc.py` checks it is current). Precedence for the "
             "components with an environment prefix: an explicit argument, then the "
             "environment, then the tuned file of `memascend tune` (engine and pool "
             "settings), then the default. Sizes take `4096`, `\"64MiB\"`, `\"1.5GB\"`; "
             "an unknown option or `MEMASCEND_<SECTION>_*` variable is an error.", ""]
    for sec in SECTIONS:
        lines += _section(*sec)
    lines += ["## Other environment variables", "", "| variable | what it does |", "|---|---|"]
    for name, what in ENVIRONMENT.items():
        lines.append(f"| `{name}` | {_cell(what)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(render(), end="")
