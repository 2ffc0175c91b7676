"""What the kernel reports about a process and its files, for benchmarks that must say where
time and bytes went: the bytes a process moved at the block layer (``/proc/self/io``, which
counts O_DIRECT too), the CPU seconds the rest of the machine took meanwhile (other processes
and hypervisor steal, from ``/proc/stat``: on a shared 2-core VM they explain slow steps), and
the disk blocks a folder's files occupy.
"""
from __future__ import annotations

import contextlib
import os
import resource


def proc_io() -> tuple[int, int]:
    """(read_bytes, write_bytes) this process caused at the block layer; (0, 0) if unknown."""
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            d = dict(ln.split(": ") for ln in f.read().splitlines() if ": " in ln)
        return int(d["read_bytes"]), int(d["write_bytes"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def cpu_seconds() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine including steal, steal seconds, this process's
    CPU seconds). Pass two of them to :func:`other_cpu`."""
    tick = os.sysconf("SC_CLK_TCK")
    busy = steal = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/stat", encoding="ascii") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / tick  # user nice system irq softirq steal
        steal = v[7] / tick
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return busy, steal, ru.ru_utime + ru.ru_stime


def other_cpu(a: tuple[float, float, float], b: tuple[float, float, float]) -> dict[str, float]:
    """CPU seconds others used between two :func:`cpu_seconds` readings: ``other_cpu_s``
    (other processes and steal), ``steal_s``, and this process's own ``own_cpu_s``."""
    return {"other_cpu_s": max(0.0, (b[0] - a[0]) - (b[2] - a[2])), "steal_s": b[1] - a[1],
            "own_cpu_s": b[2] - a[2]}


def allocated_bytes(path: str) -> int:
    """Disk blocks (in bytes) the files under ``path`` occupy."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for fn in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(dirpath, fn)).st_blocks * 512
    return total
