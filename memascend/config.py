"""Configuration plumbing shared by every component.

Each component has one frozen dataclass of options with a documented default per field.
``from_env`` builds it from the defaults, the tuned file's settings for its section
(:mod:`memascend.tune`, written by ``memascend tune``), ``MEMASCEND_<SECTION>_<FIELD>``
environment variables, then applies explicit keyword arguments on top (explicit wins).
Unknown keys are errors, both in keyword arguments and in ``MEMASCEND_<SECTION>_*``
variables, so a misspelt option never goes silently unused.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Mapping, TypeVar

from .errors import ConfigError

T = TypeVar("T")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def parse_size(key: str, value: Any) -> int:
    """Parse a byte count: an int, or a string such as ``"64MiB"``, ``"1.5GB"``, ``"4096"``.

    Raises
    ------
    ConfigError
        The value is not a non-negative size; the message names ``key``.
    """
    if isinstance(value, bool):
        raise ConfigError(key, f"expected a byte count, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(key, f"must be >= 0, got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a byte count, got {value!r}")
    units = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1 << 10, "m": 1000**2, "mb": 1000**2,
             "mib": 1 << 20, "g": 1000**3, "gb": 1000**3, "gib": 1 << 30, "t": 1000**4,
             "tb": 1000**4, "tib": 1 << 40}
    s = value.strip().lower().replace("_", "")
    num = s.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = s[len(num):].strip()
    try:
        n = float(num)
    except ValueError:
        raise ConfigError(key, f"cannot parse size {value!r}") from None
    if unit not in units or n < 0:
        raise ConfigError(key, f"cannot parse size {value!r} (units: B, KiB, MiB, GiB, KB, MB, GB)")
    total = n * units[unit]
    if not total.is_integer():  # "2.5" steps or "0.3KiB" would be cut short silently
        raise ConfigError(key, f"{value!r} is not a whole number (of bytes, or of a count)")
    return int(total)


def _coerce(cls: type, field: dataclasses.Field, raw: str, key: str) -> Any:
    hints = typing.get_type_hints(cls)
    typ = hints.get(field.name, str)
    text = raw.strip()
    if typ is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(key, f"expected a boolean, got {raw!r}")
    args = typing.get_args(typ) or (typ,)
    if text.lower() in ("", "none") and (type(None) in args or field.default is None):
        return None
    if int in args:
        return parse_size(key, text)
    if float in args:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(key, f"expected a number, got {raw!r}") from None
    return text


def from_env(cls: type[T], section: str, overrides: Mapping[str, Any] | None = None,
             environ: Mapping[str, str] | None = None, *, given: bool = False) -> T:
    """Build ``cls`` from its defaults, ``MEMASCEND_<SECTION>_*`` variables, then overrides.

    Parameters
    ----------
    cls:
        A frozen dataclass of options.
    section:
        The upper-case section name in the variable names, e.g. ``"POOL"``.
    overrides:
        Explicit options; ``None`` values mean "not given", unless ``given``: then
        ``overrides`` holds only what the caller passed, and an explicit ``None`` wins over
        the environment too (``offload_model(activations=None)``).
    environ:
        The environment to read (default ``os.environ``).

    Raises
    ------
    ConfigError
        An unknown option or variable, or a value the dataclass rejects.
    """
    environ = os.environ if environ is None else environ
    names = {f.name: f for f in dataclasses.fields(cls)}
    from .tune import tuned_settings  # below the environment: see memascend.tune

    values: dict[str, Any] = {k: v for k, v in tuned_settings(section).items() if k in names}
    prefix = f"MEMASCEND_{section}_"
    for var, raw in environ.items():
        if not var.startswith(prefix):
            continue
        name = var[len(prefix):].lower()
        if name not in names:
            raise ConfigError(var, f"unknown option; known: {', '.join(sorted(names))}")
        values[name] = _coerce(cls, names[name], raw, var)
    for name, value in (overrides or {}).items():
        if name not in names:
            raise ConfigError(name, f"unknown option; known: {', '.join(sorted(names))}")
        if value is not None or given:
            values[name] = value
    missing = [f.name for f in names.values() if f.name not in values
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(missing[0], f"required ({section.lower()} option)")
    return cls(**values)


def resolve(cls: type[T], section: str, config: T | None, overrides: Mapping[str, Any]) -> T:
    """The options a component runs with.

    With ``config`` given: its fields, with non-None ``overrides`` on top (the environment is
    not read: an explicit config is complete). Without: :func:`from_env`. Unknown override
    names raise :class:`ConfigError` either way.
    """
    if config is None:
        return from_env(cls, section, overrides)
    base = dataclasses.asdict(config)
    for name in overrides:
        if name not in base:
            raise ConfigError(name, f"unknown {section.lower()} option; known: "
                                    f"{', '.join(sorted(base))}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**base)
