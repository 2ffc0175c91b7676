"""Facts about this process and machine that memory accounting and diagnostics rely on.

Reads ``/proc/self/status`` (VmRSS, VmLck, VmHWM, VmPin), the memlock resource limit, the
effective capabilities (CAP_IPC_LOCK lets a process lock past the limit), physical memory and
the io_uring sysctl. Nothing here changes state.
"""
from __future__ import annotations

import os
import resource

CAP_IPC_LOCK = 14


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """Return the ``Vm*`` lines of ``/proc/<pid>/status`` in bytes (e.g. ``{"VmLck": 0}``).

    Raises
    ------
    OSError
        The process does not exist or ``/proc`` is not mounted.
    """
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
        for line in f:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if key.startswith("Vm") and len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0]) * 1024
    return out


def memlock_limit() -> int | None:
    """The soft RLIMIT_MEMLOCK in bytes, or ``None`` when unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def memlock_hard_limit() -> int | None:
    """The hard RLIMIT_MEMLOCK in bytes, or ``None`` when unlimited."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return None if hard == resource.RLIM_INFINITY else int(hard)


def effective_caps() -> int:
    """The effective capability mask of this process (``CapEff``), 0 when unreadable."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_cap_ipc_lock() -> bool:
    """Whether this process may lock memory past RLIMIT_MEMLOCK (CAP_IPC_LOCK)."""
    return bool(effective_caps() >> CAP_IPC_LOCK & 1)


def lockable_bytes() -> int | None:
    """How many bytes this process may lock in all: ``None`` for no limit."""
    if has_cap_ipc_lock():
        return None
    return memlock_limit()


def phys_bytes() -> int:
    """Physical memory of the machine in bytes."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def io_uring_sysctl() -> int | None:
    """``/proc/sys/kernel/io_uring_disabled`` (0 enabled, 1 root/group only, 2 off), or None."""
    try:
        with open("/proc/sys/kernel/io_uring_disabled", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def fmt_bytes(n: int | None) -> str:
    """Human-readable byte count with binary units, e.g. ``"1.50 GiB"``; ``None`` → ``"unlimited"``."""
    if n is None:
        return "unlimited"
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def memlock_advice() -> str:
    """One paragraph on how to raise the memlock limit, for error messages."""
    return (
        "raise it with `ulimit -l unlimited` in the launching shell (the hard limit must allow "
        "it: `<user> - memlock unlimited` in /etc/security/limits.conf, `LimitMEMLOCK=infinity` "
        "for a systemd unit, `docker run --ulimit memlock=-1`), or grant CAP_IPC_LOCK; or use "
        "lock='auto' to go on with unlocked memory"
    )
