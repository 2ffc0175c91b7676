"""``memascend run``: run a command with the DeepSpeed drop-in enabled, no edit to its scripts.

For users who drive DeepSpeed through HF ``Trainer`` (``TrainingArguments(deepspeed=...)``),
accelerate, ``torchrun`` or the ``deepspeed`` launcher, often with example scripts they do not
own. :func:`command_env` puts memascend's start-up hook (:mod:`.autostart`, a
``sitecustomize``) first on ``PYTHONPATH`` and the options in
``$MEMASCEND_DEEPSPEED_OPTIONS``; every Python process started by the command inherits both
and calls ``enable(**options)`` as soon as it imports ``deepspeed``. Options can also come
from a ``"memascend"`` block in the DeepSpeed config, which overrides them per engine. On
more than one node, the ``deepspeed`` launcher passes ``PYTHONPATH`` on to the other nodes
but not ``MEMASCEND_*``: put options in the config's block (or in ``.deepspeed_env``).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping, Optional

from ...errors import ConfigError
from .runtime import Options

HOOK_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "autostart")
OPTIONS_ENV = "MEMASCEND_DEEPSPEED_OPTIONS"


def parse_settings(settings: list[str]) -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` -> options of ``enable()`` (VALUE as JSON when it parses, else
    the string), checked.

    Raises
    ------
    ConfigError
        A setting without ``=``, or an unknown or invalid option.
    """
    out: dict[str, Any] = {}
    for item in settings:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError("--set", f"expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except ValueError:
            out[key.strip()] = value
    Options.merged(Options(), out)  # validates
    return out


def command_env(options: Mapping[str, Any],
                environ: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The environment for a command whose Python processes enable the drop-in."""
    env = dict(os.environ if environ is None else environ)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != HOOK_DIR]
    env["PYTHONPATH"] = os.pathsep.join([HOOK_DIR, *rest])
    if options:
        env[OPTIONS_ENV] = json.dumps(dict(options))
    else:
        env.pop(OPTIONS_ENV, None)
    return env


def run(cmd: list[str], options: Mapping[str, Any]) -> int:
    """Replace this process with ``cmd`` under :func:`command_env` (returns only on error:
    127 when the command is not found, 126 when it cannot be run)."""
    env = command_env(options)
    try:
        os.execvpe(cmd[0], cmd, env)
    except FileNotFoundError:
        print(f"memascend run: command not found: {cmd[0]}", file=sys.stderr)
        return 127
    except PermissionError as exc:
        print(f"memascend run: cannot run {cmd[0]}: {exc.strerror}", file=sys.stderr)
        return 126
    return 0  # not reached
