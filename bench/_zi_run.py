"""Running one measured child of bench/zero_infinity.py and watching its memory from outside.

Each training run is a fresh process (``bench/_zi_child.py``), so its ``VmHWM`` (peak RSS) and
``VmLck`` start from zero. The child reports its own ``/proc/self/status`` at the end of each
phase, but locked memory can be given back before exit and a peak can fall between two
phases, so this side also polls ``/proc/<pid>/status`` every ``POLL_S`` seconds and keeps the
peak ``VmLck`` and ``VmRSS`` and a coarse timeline. It also records what else the machine did
meanwhile (busy CPU seconds of the whole machine minus the parent's and the child's, from
``/proc/stat`` and ``getrusage``: on a shared 2-core VM other jobs explain slow steps), and the
memory available before the start. Every child gets its own swap folder (a fresh temporary
directory, removed afterwards, also on failure) and its own rendezvous port; the environment
carries ``TORCH_EXTENSIONS_DIR`` so that DeepSpeed loads its prebuilt ops instead of
JIT-building them.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench._proc import cpu_seconds

CHILD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_zi_child.py")
POLL_S = 0.05
TIMELINE_S = 1.0
KEYS = ("VmRSS", "VmHWM", "VmLck")


def read_status(pid: int) -> dict[str, int] | None:
    """VmRSS / VmHWM / VmLck of ``pid`` in bytes, None once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for line in text.splitlines():
        k, _, rest = line.partition(":")
        p = rest.split()
        if k in KEYS and len(p) == 2:
            out[k] = int(p[0]) * 1024
    return out if len(out) == len(KEYS) else None


def mem_available() -> int:
    """MemAvailable from /proc/meminfo, bytes (0 if unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def free_port() -> int:
    """A TCP port nobody listens on now (for DeepSpeed's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(spec: dict[str, Any], swap_parent: str, ext_dir: str, timeout: float,
              log_dir: str) -> dict[str, Any]:
    """Run one child with ``spec`` (its ``swap_dir`` is filled in here); the child's result
    plus what was sampled from outside. On failure the result has ``failed`` and the tail of
    the child's stderr."""
    swap = tempfile.mkdtemp(prefix="memascend-zi-", dir=swap_parent)
    spec = dict(spec, swap_dir=swap)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=ext_dir, MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               LOCAL_WORLD_SIZE="1")
    err_path = os.path.join(log_dir, f"{spec['label']}.stderr")
    out_path = os.path.join(log_dir, f"{spec['label']}.stdout")
    avail = mem_available()
    cpu0 = cpu_seconds()
    ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = {k: 0 for k in KEYS}
    timeline: list[list[float]] = []
    t0 = time.perf_counter()
    res: dict[str, Any]
    proc = None
    try:
        # Files, not pipes: nothing blocks the child while this side only polls.
        with open(err_path, "w", encoding="utf-8") as err, \
                open(out_path, "w", encoding="utf-8") as outf:
            proc = subprocess.Popen([sys.executable, CHILD, json.dumps(spec)], env=env,
                                    stdout=outf, stderr=err)
            next_tl = 0.0
            while proc.poll() is None:
                now = time.perf_counter() - t0
                if now > timeout:
                    proc.kill()
                    proc.wait()
                    break
                st = read_status(proc.pid)
                if st is not None:
                    for k in KEYS:
                        peak[k] = max(peak[k], st[k])
                    if now >= next_tl:
                        timeline.append([round(now, 2), st["VmRSS"], st["VmLck"]])
                        next_tl = now + TIMELINE_S
                time.sleep(POLL_S)
        with open(out_path, encoding="utf-8", errors="replace") as f:
            out = f.read()
        wall = time.perf_counter() - t0
        line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            with open(err_path, encoding="utf-8", errors="replace") as f:
                tail = f.read().strip().splitlines()[-8:]
            why = (f"timed out after {timeout:.0f} s" if wall > timeout else
                   f"exited {proc.returncode} without a result")
            res = {"failed": why, "stderr_tail": tail}
        else:
            res = json.loads(line[len("RESULT "):])
    finally:
        if proc is not None and proc.poll() is None:  # interrupted: stop our child
            proc.kill()
            proc.wait()
        shutil.rmtree(swap, ignore_errors=True)
    ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu1 = cpu_seconds()
    child_cpu = (ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)
    busy = cpu1[0] - cpu0[0]
    res.update(label=spec["label"], wall_s=wall, mem_available_before=avail,
               sampled_peak=peak, timeline=timeline, child_cpu_s=child_cpu,
               other_cpu_s=max(0.0, busy - child_cpu - (cpu1[2] - cpu0[2])),
               steal_s=cpu1[1] - cpu0[1], swap_dir_removed=not os.path.exists(swap))
    if "failed" not in res:
        final = res["marks"]["trained"]
        # Peak RSS: the kernel's own high-water mark (VmHWM) at the end of the run; peak
        # VmLck: the largest of what was sampled and what the child saw at its phase ends.
        res["peak_rss"] = max(final["VmHWM"], peak["VmHWM"])
        res["peak_vmlck"] = max([peak["VmLck"]] + [m["VmLck"] for m in res["marks"].values()])
        res["final_vmlck"] = final["VmLck"]
        res["swap_bytes_per_step"] = res["read_bytes_per_step"] + res["write_bytes_per_step"]
    return res
