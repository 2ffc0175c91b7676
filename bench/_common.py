"""Pieces every benchmark under bench/ shares: the CPU's name for the machine record, the
``--json PATH`` check, writing the JSON document, progress lines on stderr, the median that
tolerates no data, and an argument parser whose errors are one line. Benchmarks run as scripts
(``python bench/x.py``) that put the repository on ``sys.path``; they import ``bench._common``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Optional


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (``platform.processor()`` where absent)."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                        cpu)
    except OSError:
        return cpu


def check_json_path(p: argparse.ArgumentParser, path: Optional[str]) -> None:
    """Exit through ``p.error`` when ``--json PATH``'s folder does not exist."""
    if path is not None:
        parent = Path(path).resolve().parent
        if not parent.is_dir():
            p.error(f"--json: directory {str(parent)!r} does not exist")


def write_json(path: str, doc: dict[str, Any], **dump: Any) -> None:
    """Write ``doc`` to ``path`` (indent 1, trailing newline); ``dump`` goes to json.dump."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, **dump)
        f.write("\n")


def log(msg: str) -> None:
    """Progress goes to stderr; stdout carries only the report."""
    print(msg, file=sys.stderr, flush=True)


def median(xs: Any, empty: Any = math.nan) -> Any:
    """The median of the values of ``xs`` that are not None; ``empty`` when there are none."""
    vals = [x for x in xs if x is not None]
    return statistics.median(vals) if vals else empty


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line on stderr and exit status 2."""

    def error(self, message: str) -> Any:  # noqa: D102
        self.exit(2, f"{self.prog}: error: {message}\n")
