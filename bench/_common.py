"""Pieces every benchmark under bench/ shares: the machine record (:func:`machine_info`:
cores, CPU, RAM, kernel, library versions, the swap folder's filesystem), the ``--json PATH``
check, writing the JSON document, progress lines on stderr, the median that
tolerates no data, and an argument parser whose errors are one line. Benchmarks run as scripts
(``python bench/x.py``) that put the repository on ``sys.path``; they import ``bench._common``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import platform
import shutil
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


def _mount_of(directory: str) -> Optional[dict[str, str]]:
    """The mount (device, mount point, filesystem type) that holds ``directory``."""
    found = None
    with contextlib.suppress(OSError):
        dev = os.stat(directory).st_dev
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for ln in f:
                parts = ln.split()
                with contextlib.suppress(OSError):
                    if len(parts) > 2 and os.stat(parts[1]).st_dev == dev:
                        found = {"device": parts[0], "mount": parts[1], "type": parts[2]}
    return found


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(directory: Optional[str] = None, **extra: Any) -> dict[str, Any]:
    """The machine a benchmark ran on, for the record: cores, CPU, RAM, kernel, Python, torch,
    DeepSpeed and transformers versions, CUDA, the effective uid; with ``directory`` (the swap
    folder) its mount and free space; ``extra`` entries added as given."""
    import torch

    from memascend.sysinfo import lockable_bytes, phys_bytes

    info: dict[str, Any] = {
        "cores": os.cpu_count(), "cpu": cpu_model(), "ram_bytes": phys_bytes(),
        "lockable_bytes": lockable_bytes(), "kernel": platform.release(),
        "python": platform.python_version(), "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(), "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"), "uid": os.geteuid()}
    if directory is not None:
        info["swap_dir"] = directory
        info["swap_fs"] = _mount_of(directory)
        with contextlib.suppress(OSError):
            du = shutil.disk_usage(directory)
            info["disk_free_bytes"], info["disk_total_bytes"] = du.free, du.total
    info.update(extra)
    return info


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
