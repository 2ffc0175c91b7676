"""A transient memory cgroup: a hard RAM limit, with no swap, for one child process.

A benchmark that claims "trains under X GiB" lets the kernel enforce X: it creates a cgroup
named ``<prefix>-<pid>-<n>``, sets the limit (cgroup v2 ``memory.max`` with
``memory.swap.max`` = 0; on a v1 hierarchy ``memory.limit_in_bytes`` with
``memory.memsw.limit_in_bytes`` equal to it, so swap cannot extend it), and starts the child
through ``sh -c 'echo $$ > cgroup.procs; exec ...'`` so that every byte the child maps is
charged from its first instruction. Page cache the child causes counts toward the limit;
O_DIRECT I/O does not enter it. Afterwards the kernel's own peak (``memory.peak`` /
``memory.max_usage_in_bytes``) and OOM-kill count say what happened, and the cgroup is removed
(any process left in it is killed first). Creating one needs root and a mounted memory
controller; :func:`cgroup_root` raises :class:`CgroupUnavailable` with the reason otherwise.

The pid in the name lets a later run remove the cgroups of a run that was killed with SIGKILL
(:func:`remove_stale_cgroups`).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from typing import Any, Optional


class CgroupUnavailable(Exception):
    """No memory cgroup can be created here (the reason is the message)."""


def cgroup_root() -> tuple[str, int]:
    """(directory under which to create a memory cgroup, cgroup version 1 or 2).

    Raises
    ------
    CgroupUnavailable
        Not root, or no writable hierarchy with the memory controller.
    """
    if os.geteuid() != 0:
        raise CgroupUnavailable(f"not root (uid {os.geteuid()}): creating a memory cgroup "
                                "needs root")
    mounts = []
    with contextlib.suppress(OSError), open("/proc/mounts", encoding="utf-8") as f:
        mounts = [ln.split() for ln in f]
    for m in mounts:
        if len(m) > 3 and m[2] == "cgroup2":
            root = m[1]
            try:
                with open(os.path.join(root, "cgroup.controllers"), encoding="ascii") as f:
                    if "memory" not in f.read().split():
                        continue
                sub = os.path.join(root, "cgroup.subtree_control")
                with open(sub, encoding="ascii") as f:
                    enabled = "memory" in f.read().split()
                if not enabled:
                    with open(sub, "w", encoding="ascii") as f:
                        f.write("+memory")
                return root, 2
            except OSError:
                continue
    for m in mounts:
        if len(m) > 3 and m[2] == "cgroup" and "memory" in m[3].split(","):
            if os.access(m[1], os.W_OK):
                return m[1], 1
    raise CgroupUnavailable("no writable cgroup v2 hierarchy with the memory controller and "
                            "no cgroup v1 memory hierarchy mounted")


class MemoryCgroup:
    """A memory cgroup of ``limit`` bytes and no swap; :meth:`remove` deletes it.

    Parameters
    ----------
    limit:
        Hard limit in bytes (page cache included).
    prefix:
        Name prefix; the cgroup is ``<prefix>-<this pid>-<n>``.

    Raises
    ------
    CgroupUnavailable
        See :func:`cgroup_root`.
    OSError
        The kernel refused to create or configure it (nothing is left behind).
    """

    _count = 0

    def __init__(self, limit: int, prefix: str):
        root, self.version = cgroup_root()
        MemoryCgroup._count += 1
        self.path = os.path.join(root, f"{prefix}-{os.getpid()}-{MemoryCgroup._count}")
        os.mkdir(self.path)
        self.limit = limit
        try:
            if self.version == 2:
                self._write("memory.max", limit)
                if os.path.exists(os.path.join(self.path, "memory.swap.max")):
                    self._write("memory.swap.max", 0)
            else:
                self._write("memory.limit_in_bytes", limit)
                if os.path.exists(os.path.join(self.path, "memory.memsw.limit_in_bytes")):
                    self._write("memory.memsw.limit_in_bytes", limit)
        except OSError:
            self.remove()
            raise

    def _write(self, name: str, value: Any) -> None:
        with open(os.path.join(self.path, name), "w", encoding="ascii") as f:
            f.write(str(value))

    def _read(self, name: str) -> Optional[str]:
        try:
            with open(os.path.join(self.path, name), encoding="ascii") as f:
                return f.read()
        except OSError:
            return None

    def wrap(self, cmd: list[str]) -> list[str]:
        """``cmd`` run so that its process joins this cgroup before it execs."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', procs, *cmd]

    def info(self) -> dict[str, Any]:
        """Limit, peak usage (page cache included), OOM kills, as the kernel reports them."""
        out: dict[str, Any] = {"path": self.path, "version": self.version,
                               "limit_bytes": self.limit}
        if self.version == 2:
            peak = self._read("memory.peak")
            out["peak_bytes"] = int(peak) if peak and peak.strip().isdigit() else None
            out["peak_source"] = "memory.peak" if peak else None
            ev = dict(ln.split() for ln in (self._read("memory.events") or "").splitlines()
                      if len(ln.split()) == 2)
            out["oom_kills"] = int(ev.get("oom_kill", 0))
            out["max_events"] = int(ev.get("max", 0))
            out["swap_max"] = (self._read("memory.swap.max") or "").strip() or None
        else:
            peak = self._read("memory.max_usage_in_bytes")
            out["peak_bytes"] = int(peak) if peak and peak.strip().isdigit() else None
            out["peak_source"] = "memory.max_usage_in_bytes"
            ctl = dict(ln.split() for ln in (self._read("memory.oom_control") or "").splitlines()
                       if len(ln.split()) == 2)
            out["oom_kills"] = int(ctl.get("oom_kill", 0))
            fc = self._read("memory.failcnt")
            out["max_events"] = int(fc) if fc and fc.strip().isdigit() else None
            out["swap_max"] = ("0 (memory.memsw.limit_in_bytes = limit)"
                               if self._read("memory.memsw.limit_in_bytes") else
                               "no swap accounting (memory.memsw.* absent)")
        return out

    def remove(self) -> None:
        """Kill what is left in the cgroup (our child's processes) and delete it."""
        for _ in range(50):
            try:
                os.rmdir(self.path)
                return
            except FileNotFoundError:
                return
            except OSError:
                for pid in (self._read("cgroup.procs") or "").split():
                    with contextlib.suppress(OSError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
                time.sleep(0.1)
        print(f"warning: could not remove cgroup {self.path}", file=sys.stderr, flush=True)


def pid_gone(name: str, prefix: str) -> Optional[int]:
    """The pid in ``<prefix>-<pid>-...`` if that process no longer exists, else None."""
    if not name.startswith(prefix + "-"):
        return None
    pid = name[len(prefix) + 1:].split("-", 1)[0]
    if not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
        return None  # still running
    except ProcessLookupError:
        return int(pid)
    except OSError:
        return None  # exists, owned by someone else


def remove_stale_cgroups(prefix: str) -> list[str]:
    """Remove the ``<prefix>-<pid>-*`` cgroups of runs whose process is gone; their paths."""
    try:
        root = cgroup_root()[0]
        names = os.listdir(root)
    except (CgroupUnavailable, OSError):
        return []
    removed = []
    for name in names:
        if pid_gone(name, prefix) is not None:
            with contextlib.suppress(OSError):
                os.rmdir(os.path.join(root, name))
                removed.append(os.path.join(root, name))
    return removed
