"""Swap-file I/O throughput and CPU cost: memascend's engine backends against DeepSpeed and fio.

What it measures: how fast each I/O path moves bytes between pinned host memory and one
O_DIRECT swap file, and how much CPU time it burns doing so. One file of ``total`` bytes
(1 GiB; ``--quick`` 256 MiB) is preallocated with ``posix_fallocate`` in ``--dir`` (default: a
fresh temporary directory under /var/tmp) and filled once before any timing, so every timed
write overwrites written extents. For each request size (1 MiB, 8 MiB) and queue depth (8, 32)
each competitor writes the whole file as requests of that size with that many in flight, then
reads it back; write and read are timed separately. Repetitions (5; ``--quick`` 2) are
interleaved: within one repetition every competitor runs on every configuration, and the order
of competitors rotates by one each repetition, so slow drifts of the (noisy, virtual) disk hit
all competitors alike.

Competitors:

* ``uring``, ``threads``, ``pyuring`` (when ``probe_backends()`` says it can run):
  :class:`memascend.engine.SwapEngine` with ``queue_depth`` = the configuration's depth,
  ``chunk_bytes`` = the request size and, for ``threads``, as many workers as the depth. Like
  DeepSpeed below, and like the swap store (one ``engine.write``/``read`` per tensor), one
  ``submit`` per direction moves the whole file: a single request of ``total`` bytes, which the
  engine splits into ``chunk_bytes`` pieces and keeps at most ``queue_depth`` of them in
  flight (the native ring has that many slots and queues the rest; ``threads`` has that many
  workers; ``pyuring`` caps its in-flight set). The memory is one ``PinnedPool`` lease of
  ``total`` bytes (mlocked anonymous memory); no fixed buffer is registered (the swap store
  does not register any either).
* ``deepspeed``: DeepSpeed's ``aio_handle(block_size=request size, queue_depth=depth,
  single_submit=False, overlap_events=True, intra_op_parallelism=1)`` (libaio). Its
  ``async_pwrite`` / ``async_pread`` take a tensor, a file name and a ``file_offset`` and split
  the tensor into ``block_size`` blocks with ``queue_depth`` in flight; one call per direction
  moves the whole file from a tensor of ``total`` bytes allocated with the handle's
  ``new_cpu_locked_tensor`` (page-locked and managed by the handle, so DeepSpeed does no bounce
  copy), then ``wait()``. DeepSpeed opens the file itself (by name, O_DIRECT) on every call.
  The ``async_io`` op is JIT-built once into ``$TORCH_EXTENSIONS_DIR`` (default here
  ``~/.cache/memascend-torch-ext``); needs ``pip install deepspeed`` and libaio-dev.
* ``uring-thp`` (diagnostic, not a memascend feature): the same ``uring`` engine and calls,
  but the buffer (also ``total`` bytes) is a private anonymous mapping madvised ``MADV_HUGEPAGE`` (transparent huge
  pages), populated and locked. It separates what the engine costs from what the physical
  layout of the buffer costs: a request whose pages are physically scattered becomes a
  scatter list of many segments, and some virtual disks (virtio-blk without indirect
  descriptors) fit only a few such requests in their ring. Skipped when THP is ``never`` or
  the mapping got no huge pages.
* ``fio`` (the disk's ceiling): ``fio --direct=1 --ioengine=io_uring --bs=R --iodepth=Q
  --size=total --rw=write`` then ``--rw=read`` on the same file, ``--output-format=json``;
  bandwidth from ``bw_bytes``, CPU = (usr_cpu + sys_cpu) / 100 x job runtime. fio takes
  those percentages from ``getrusage(RUSAGE_THREAD)`` of its job thread, so io_uring's io-wq
  workers are not in them (on a filesystem that makes io_uring punt, e.g. tmpfs, fio's CPU
  looks near zero); the raw data also keeps ``process_cpu_s``, the whole fio process
  (``RUSAGE_CHILDREN`` delta, including its start-up).

Wall time runs from the first submission to the last completion; CPU time is the change of
``getrusage(RUSAGE_SELF)`` user + system over the same span, so it includes every thread of
this process (the engine's reaper and workers, and io_uring's io-wq kernel workers, which
belong to the submitting process). After every read the buffer is compared with what was
written (it is zeroed before the read), outside the timed span, over the whole file; the
engine's own counters must also show exactly ``total`` bytes and ``total / request size``
completed pieces each way.

For every timed direction the block device's counters (``/sys/dev/block/M:m/stat``) give the
number of device requests, merges and their average size (``dev KiB``; other I/O on the same
disk at the same time counts too), and, where ``/proc/self/pagemap`` shows physical frames
(root), the buffers' physical layout is recorded: mean physically contiguous run and mean
segments per request.

Reported per (request size, depth, competitor, direction): median MiB/s over repetitions,
median CPU seconds per GiB moved, and the median over repetitions of the ratio to fio's
bandwidth *in the same repetition and configuration*. The summary has, per competitor and
direction, ``<comp>_<dir>_vs_fio``: the median of all its per-repetition ratios (every
repetition of every configuration, pooled), and ``<comp>_cpu_s_per_gib``: the median over the
same (repetition, configuration) cells of (write CPU + read CPU) / GiB moved both ways.
memascend's goals: ``uring`` at >= 0.95 of fio for reads and for writes
(``uring_meets_throughput_goal``) and ``uring_cpu_s_per_gib`` no higher than
``deepspeed_cpu_s_per_gib`` (``uring_meets_cpu_goal``); ``uring_meets_goal`` is both. The
output says plainly whether this run met them, and notes when fio was not the ceiling (some
competitor's median ratio above 1.05: on a virtual disk, fio's own 4 KiB-page buffers can
make it the slowest competitor).

Usage: ``bench/io_throughput.py [--json PATH] [--quick] [--dir DIR] [--reps N]
[--no-fio] [--no-deepspeed] [--no-thp]``.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import math
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memascend import PinnedPool  # noqa: E402
from memascend.config import parse_size  # noqa: E402
from memascend.engine import IORequest, SwapEngine, probe_backends  # noqa: E402
from memascend.errors import ConfigError, MemAscendError  # noqa: E402
from memascend.sysinfo import fmt_bytes, io_uring_sysctl  # noqa: E402
from bench._common import (OneLineParser as _ArgumentParser, check_json_path,  # noqa: E402
                           log, machine_info as common_machine_info, median,
                           write_json)

MiB, GiB = 1 << 20, 1 << 30
REQUEST_SIZES = (1 * MiB, 8 * MiB)
QUEUE_DEPTHS = (8, 32)
FULL_TOTAL, QUICK_TOTAL = 1 * GiB, 256 * MiB
FULL_REPS, QUICK_REPS = 5, 2
FULL_MIN_FREE, QUICK_MIN_FREE = 3 * GiB, 600 * MiB
REFERENCE_BYTES = 64 * MiB  # the data pattern, repeated over the file
ENGINE_BACKENDS = ("uring", "threads", "pyuring")
GOAL = 0.95
WAIT_TIMEOUT = 120.0
DEFAULT_EXT_DIR = os.path.expanduser("~/.cache/memascend-torch-ext")


def cpu_seconds() -> float:
    """User + system CPU time of the whole process (all threads) so far."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def phase(nbytes: int, wall: float, cpu: float, **extra: Any) -> dict[str, Any]:
    """One timed direction as a record."""
    return {"bytes": nbytes, "wall_s": wall, "cpu_s": cpu,
            "mib_s": nbytes / MiB / wall if wall > 0 else float("nan"),
            "cpu_s_per_gib": cpu / (nbytes / GiB), **extra}


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Send fd 1 to stderr for a while (DeepSpeed logs and prints to stdout)."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# ---------------------------------------------------------------- device and memory facts
class BlockDevice:
    """The block device holding a file: per-phase request counters and queue limits."""

    def __init__(self, path: str):
        st = os.stat(path)
        node = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
        self.stat_path: Optional[str] = node + "/stat" if os.path.exists(node + "/stat") else None
        real = os.path.realpath(node)
        disk = real if os.path.isdir(real + "/queue") else os.path.dirname(real)
        self.name = os.path.basename(real)
        self.info: dict[str, Any] = {"name": self.name, "disk": os.path.basename(disk)}
        for key in ("max_segments", "max_sectors_kb", "rotational", "scheduler", "nr_requests",
                    "logical_block_size"):
            with contextlib.suppress(OSError):
                with open(f"{disk}/queue/{key}", encoding="ascii") as f:
                    v = f.read().strip()
                self.info[key] = int(v) if v.isdigit() else v
        with contextlib.suppress(OSError):  # virtio: bit 28 = VIRTIO_RING_F_INDIRECT_DESC
            with open(f"{disk}/device/features", encoding="ascii") as f:
                feats = f.read().strip()
            self.info["virtio_indirect_desc"] = len(feats) > 28 and feats[28] == "1"

    def snapshot(self) -> Optional[list[int]]:
        """The raw counters now, or None when unavailable."""
        if self.stat_path is None:
            return None
        try:
            with open(self.stat_path, encoding="ascii") as f:
                return [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return None

    @staticmethod
    def delta(a: Optional[list[int]], b: Optional[list[int]], op: str) -> dict[str, Any]:
        """Device requests, merges and average request size between two snapshots."""
        if a is None or b is None:
            return {}
        i = 0 if op == "read" else 4  # reads: ios, merges, sectors; writes at 4, 5, 6
        ios, merges, sectors = (b[i] - a[i], b[i + 1] - a[i + 1], b[i + 2] - a[i + 2])
        return {"dev_requests": ios, "dev_merges": merges,
                "dev_avg_request_kib": sectors * 512 / 1024 / ios if ios else None}


def phys_layout(address: int, nbytes: int, req: int, max_segments: Any) -> dict[str, Any]:
    """Physical contiguity of memory (``/proc/self/pagemap``; frames are visible to root only)."""
    import numpy as np

    page = os.sysconf("SC_PAGE_SIZE")
    n = nbytes // page
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(address // page * 8)
            data = f.read(n * 8)
    except OSError as exc:
        return {"unavailable": f"/proc/self/pagemap: {exc.strerror}"}
    pfn = (np.frombuffer(data, dtype=np.uint64) & np.uint64((1 << 55) - 1)).astype(np.int64)
    if len(pfn) != n or not pfn.all():
        return {"unavailable": "physical frames hidden (needs CAP_SYS_ADMIN) or not resident"}
    starts = np.ones(n, dtype=bool)
    starts[1:] = np.diff(pfn) != 1
    per = max(1, req // page)
    segs = starts[: n - n % per].reshape(-1, per).copy()
    segs[:, 0] = True
    segs = segs.sum(axis=1)
    out = {"mean_run_kib": nbytes / 1024 / int(starts.sum()), "request_bytes": req,
           "segments_per_request_mean": float(segs.mean()),
           "segments_per_request_max": int(segs.max())}
    if isinstance(max_segments, int):
        out["requests_over_max_segments"] = float((segs > max_segments).mean())
    return out


class Buffer:
    """Memory the engine runners move: address, size, a uint8 tensor view, and how it was made."""

    def __init__(self, address: int, nbytes: int, tensor: Any, kind: str,
                 close: Callable[[], None]):
        self.address, self.nbytes, self.tensor, self.kind = address, nbytes, tensor, kind
        self._close = close

    def close(self) -> None:
        """Drop the view and free the memory."""
        self.tensor = None
        self._close()


def _anon_huge_kib(address: int) -> int:
    """AnonHugePages (KiB) of the mapping of this process that contains ``address``."""
    lo = None
    with open("/proc/self/smaps", encoding="ascii", errors="replace") as f:
        for line in f:
            head = line.split(None, 1)[0]
            if "-" in head and not head.endswith(":"):
                a, b = (int(x, 16) for x in head.split("-"))
                lo = a if a <= address < b else None
            elif lo is not None and line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def thp_buffer(nbytes: int) -> Buffer:
    """A 2 MiB-aligned private mapping madvised MADV_HUGEPAGE, populated, locked if allowed.

    Raises OSError when the mapping fails or got no huge pages.
    """
    import torch

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    huge = 2 * MiB
    span = nbytes + huge
    prot_rw, map_private_anon, madv_hugepage = 0x3, 0x02 | 0x20, 14
    raw = libc.mmap(None, span, prot_rw, map_private_anon, -1, 0)
    if raw in (None, ctypes.c_void_p(-1).value):
        raise OSError(ctypes.get_errno(), "mmap for the THP buffer failed")
    addr = (raw + huge - 1) & ~(huge - 1)
    try:
        if libc.madvise(addr, nbytes, madv_hugepage) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_HUGEPAGE) failed")
        ctypes.memset(addr, 0, nbytes)
        locked = libc.mlock(addr, nbytes) == 0
        got = _anon_huge_kib(addr) * 1024
        if got < nbytes // 2:
            raise OSError(0, f"only {fmt_bytes(got)} of {fmt_bytes(nbytes)} got huge pages")
    except BaseException:
        libc.munmap(raw, span)
        raise
    tensor = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=torch.uint8)
    return Buffer(addr, nbytes, tensor, f"mmap+MADV_HUGEPAGE ({fmt_bytes(got)} huge pages, "
                                        f"{'locked' if locked else 'NOT locked'})",
                  lambda: libc.munmap(raw, span))


def thp_mode() -> str:
    """The selected transparent-huge-page mode (always, madvise, never) or '?'."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            text = f.read()
        return text[text.index("[") + 1:text.index("]")]
    except (OSError, ValueError):
        return "?"


# ---------------------------------------------------------------- memascend engine
def fill_tiles(t: Any, reference: Any) -> None:
    """Copy ``reference`` over ``t`` repeatedly (``t``'s size is a multiple of it)."""
    tiles = t.view(-1, reference.numel())
    tiles.copy_(reference.expand_as(tiles))


def matches_tiles(t: Any, reference: Any) -> bool:
    """Whether ``t`` holds ``reference`` repeated."""
    import torch

    return bool(torch.equal(t.view(-1, reference.numel()), reference.expand(
        t.numel() // reference.numel(), -1)))


class EngineRunner:
    """Drives one SwapEngine backend over the file, the way the swap store uses it."""

    def __init__(self, backend: str, path: str, buf: Buffer, reference: Any,
                 dev: BlockDevice):
        self.backend, self.path, self.buf, self.reference, self.dev = \
            backend, path, buf, reference, dev

    def run(self, req: int, qd: int, total: int) -> dict[str, Any]:
        """Write then read the whole file with one request per direction; timings, engine
        stats, verification."""
        opts: dict[str, Any] = {"chunk_bytes": req}
        if self.backend == "threads":
            opts["threads"] = qd
        eng = SwapEngine(backend=self.backend, queue_depth=qd, **opts)
        fd = os.open(self.path, os.O_RDWR | os.O_DIRECT)
        try:
            fid = eng.register_file(fd, self.path)
            out: dict[str, Any] = {"engine": {"backend": eng.backend,
                                              "reason": eng.backend_reason,
                                              "queue_depth": qd, **opts},
                                   "buffer": self.buf.kind}
            for op in ("write", "read"):
                if op == "read":
                    self.buf.tensor.zero_()
                d0 = self.dev.snapshot()
                c0, t0 = cpu_seconds(), time.perf_counter()
                h = eng.submit([IORequest(op, fid, self.buf.address, total, 0)])[0]
                moved = h.wait(WAIT_TIMEOUT)  # raises SwapIOError / TimeoutError
                t1, c1 = time.perf_counter(), cpu_seconds()
                if moved != total:
                    raise RuntimeError(f"{self.backend}: {op} moved {moved} of {total} bytes")
                out[op] = phase(total, t1 - t0, c1 - c0,
                                **BlockDevice.delta(d0, self.dev.snapshot(), op))
            out["verified"] = matches_tiles(self.buf.tensor, self.reference)
            fill_tiles(self.buf.tensor, self.reference)
            st = eng.stats().to_dict()
            out["engine"]["stats"] = st
            if st["errors"] or st["bytes_written"] != total or st["bytes_read"] != total \
                    or st["completed"] != 2 * (total // req):
                raise RuntimeError(f"{self.backend}: engine stats disagree with the run: {st}")
            return out
        finally:
            eng.close()
            os.close(fd)


# ---------------------------------------------------------------- DeepSpeed
class DeepSpeedRunner:
    """DeepSpeed's aio_handle (libaio), loaded lazily; see the module docstring."""

    def __init__(self, path: str, dev: Optional[BlockDevice] = None):
        self.path, self.dev = path, dev
        self.module: Any = None
        self.version = None

    def load(self) -> Optional[str]:
        """Import DeepSpeed and load (JIT-build once) its async_io op; None or a skip reason."""
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", DEFAULT_EXT_DIR)
        with stdout_to_stderr():
            try:
                import deepspeed
                from deepspeed.ops.op_builder import AsyncIOBuilder
            except Exception as exc:
                return f"deepspeed not importable ({exc.__class__.__name__}: {exc}); " \
                       f"pip install deepspeed"
            self.version = deepspeed.__version__
            try:
                builder = AsyncIOBuilder()
                if not builder.is_compatible(verbose=False):
                    return "DeepSpeed's async_io op is not compatible here (libaio-dev missing?" \
                           " apt-get install -y libaio-dev)"
                ext = Path(os.environ["TORCH_EXTENSIONS_DIR"]) / "async_io"
                if not any(ext.glob("*.so")):
                    log(f"  building DeepSpeed's async_io op into {ext} (once; ~9 min on 2 "
                        f"cores) ...")
                self.module = builder.load(verbose=False)
            except BaseException as exc:  # a failed JIT build raises many kinds of errors
                if isinstance(exc, KeyboardInterrupt):
                    raise
                return f"DeepSpeed's async_io op failed to build/load ({exc.__class__.__name__}:" \
                       f" {exc})"
        return None

    def run(self, req: int, qd: int, total: int, reference: Any) -> dict[str, Any]:
        """Write then read the whole file with one async call per direction."""
        import torch

        with stdout_to_stderr():
            h = self.module.aio_handle(req, qd, False, True, 1)
            t = h.new_cpu_locked_tensor(total, torch.empty(0, dtype=torch.uint8))
            try:
                fill_tiles(t, reference)
                out: dict[str, Any] = {"handle": {"block_size": req, "queue_depth": qd,
                                                  "single_submit": False, "overlap_events": True,
                                                  "intra_op_parallelism": 1,
                                                  "pinned": bool(h.is_pinned(t))}}
                if self.dev is not None:
                    out["buffer_layout"] = phys_layout(t.data_ptr(), total, req,
                                                       self.dev.info.get("max_segments"))
                for op in ("write", "read"):
                    if op == "read":
                        t.zero_()
                    d0 = self.dev.snapshot() if self.dev is not None else None
                    c0, t0 = cpu_seconds(), time.perf_counter()
                    fn = h.async_pwrite if op == "write" else h.async_pread
                    rc = fn(t, self.path, 0)
                    if rc != 0:
                        raise RuntimeError(f"deepspeed async_p{op} returned {rc}")
                    done = h.wait()
                    t1, c1 = time.perf_counter(), cpu_seconds()
                    if done != 1:
                        raise RuntimeError(f"deepspeed wait() after async_p{op} returned {done}")
                    d1 = self.dev.snapshot() if self.dev is not None else None
                    out[op] = phase(total, t1 - t0, c1 - c0, **BlockDevice.delta(d0, d1, op))
                out["verified"] = matches_tiles(t, reference)
                return out
            finally:
                h.free_cpu_locked_tensor(t)
                del h


# ---------------------------------------------------------------- fio
def fio_version() -> Optional[str]:
    """fio's version string, or None when fio is not on PATH."""
    exe = shutil.which("fio")
    if not exe:
        return None
    try:
        return subprocess.run([exe, "--version"], capture_output=True, text=True,
                              timeout=30).stdout.strip() or "?"
    except (OSError, subprocess.SubprocessError):
        return None


def run_fio(path: str, req: int, qd: int, total: int,
            dev: Optional[BlockDevice] = None) -> dict[str, Any]:
    """fio write then read on the same file; bandwidth and CPU from its JSON."""
    out: dict[str, Any] = {}
    for rw, op in (("write", "write"), ("read", "read")):
        cmd = ["fio", "--name=memascend-io", f"--filename={path}", "--direct=1",
               "--ioengine=io_uring", f"--bs={req}", f"--iodepth={qd}", f"--size={total}",
               "--offset=0", f"--rw={rw}", "--numjobs=1", "--fallocate=none",
               "--output-format=json"]
        d0 = dev.snapshot() if dev is not None else None
        ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc_cpu = (ch1.ru_utime - ch0.ru_utime) + (ch1.ru_stime - ch0.ru_stime)
        devd = BlockDevice.delta(d0, dev.snapshot() if dev is not None else None, op)
        if run.returncode != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed (exit {run.returncode}): "
                               f"{run.stderr.strip()[-500:]}")
        try:
            text = run.stdout[run.stdout.index("{"):]
            job = json.loads(text)["jobs"][0]
        except (ValueError, KeyError, IndexError) as exc:
            raise RuntimeError(f"{shlex.join(cmd)} printed unparsable JSON: {exc}") from exc
        d = job[op]
        if d.get("io_bytes", 0) != total or job.get("error", 0):
            raise RuntimeError(f"fio {rw} moved {d.get('io_bytes')} of {total} bytes "
                               f"(error {job.get('error')})")
        runtime_s = d["runtime"] / 1000.0
        cpu = (job["usr_cpu"] + job["sys_cpu"]) / 100.0 * runtime_s
        rec = phase(total, runtime_s, cpu, usr_cpu_pct=job["usr_cpu"], sys_cpu_pct=job["sys_cpu"],
                    process_wall_s=wall, process_cpu_s=proc_cpu, command=shlex.join(cmd),
                    **devd)
        rec["mib_s"] = d["bw_bytes"] / MiB
        out[op] = rec
    return out


# ---------------------------------------------------------------- file and machine
def make_file(directory: str, total: int) -> str:
    """A new preallocated file of ``total`` bytes in ``directory``; returns its path."""
    fd, path = tempfile.mkstemp(prefix="io_throughput-", suffix=".swap", dir=directory)
    try:
        os.posix_fallocate(fd, 0, total)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def fill_file(path: str, aligned: Any, total: int) -> None:
    """Write the file once (untimed) from an aligned tensor, so timed writes overwrite
    written extents."""
    arr = aligned.numpy()
    try:
        fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    except OSError as exc:
        if exc.errno == 22:
            raise OSError(22, f"{os.path.dirname(path)} does not support O_DIRECT (tmpfs?); "
                              f"pass --dir on a disk-backed filesystem") from exc
        raise
    try:
        off = 0
        while off < total:
            n = min(len(arr), total - off)
            done = os.pwritev(fd, [memoryview(arr)[:n]], off)
            if done != n:
                raise OSError(5, f"short write filling {path}: {done} of {n} bytes")
            off += n
        os.fsync(fd)
    finally:
        os.close(fd)


def fs_type(directory: str) -> str:
    """Filesystem type of the mount holding ``directory`` (best effort)."""
    best, kind = "", "?"
    real = os.path.realpath(directory)
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or
                                        real.startswith(parts[1].rstrip("/") + "/")):
                    if len(parts[1]) > len(best):
                        best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def machine_info(directory: str) -> dict[str, Any]:
    """The shared machine record (:func:`bench._common.machine_info`) plus this benchmark's
    I/O facts: filesystem, the io_uring sysctl, fio and pyuring versions, the load average."""
    try:
        import pyuring
        pyuring_version = getattr(pyuring, "__version__", "?")
    except Exception:
        pyuring_version = None
    return common_machine_info(directory, filesystem=fs_type(directory),
                               io_uring_disabled_sysctl=io_uring_sysctl(), fio=fio_version(),
                               pyuring=pyuring_version, loadavg_start=os.getloadavg())


# ---------------------------------------------------------------- statistics and report
def aggregate(raw: list[dict[str, Any]], competitors: list[str]) -> list[dict[str, Any]]:
    """Per (request size, depth, competitor, direction): medians and median ratio to fio."""
    rows = []
    for req in REQUEST_SIZES:
        for qd in QUEUE_DEPTHS:
            cells = [r for r in raw if r["request_bytes"] == req and r["queue_depth"] == qd]
            for comp in competitors:
                for op in ("write", "read"):
                    mib, cpu, ratios, dev = [], [], [], []
                    for r in cells:
                        c = r["competitors"].get(comp, {})
                        if op not in c:
                            continue
                        mib.append(c[op]["mib_s"])
                        cpu.append(c[op]["cpu_s_per_gib"])
                        if c[op].get("dev_avg_request_kib") is not None:
                            dev.append(c[op]["dev_avg_request_kib"])
                        f = r["competitors"].get("fio", {})
                        if comp != "fio" and op in f:
                            ratios.append(c[op]["mib_s"] / f[op]["mib_s"])
                    if not mib:
                        continue
                    rows.append({"request_bytes": req, "queue_depth": qd, "competitor": comp,
                                 "direction": op, "reps": len(mib), "mib_s_median": median(mib, None),
                                 "mib_s_min": min(mib), "mib_s_max": max(mib),
                                 "cpu_s_per_gib_median": median(cpu, None),
                                 "dev_avg_request_kib_median": median(dev, None),
                                 "ratio_to_fio_median": median(ratios, None),
                                 "ratios_to_fio": ratios})
    return rows


def summarize(raw: list[dict[str, Any]], competitors: list[str]) -> dict[str, Any]:
    """Per competitor, pooled over every (repetition, configuration) cell: the median ratio to
    fio per direction and the median CPU seconds per GiB (write + read); then the goals."""
    s: dict[str, Any] = {}
    for comp in competitors:
        key = comp.replace("-", "_")
        ratios: dict[str, list[float]] = {"read": [], "write": []}
        cpu: list[float] = []
        for cell in raw:
            c = cell["competitors"].get(comp)
            if c is None or "read" not in c or "write" not in c:
                continue
            moved = (c["write"]["bytes"] + c["read"]["bytes"]) / GiB
            cpu.append((c["write"]["cpu_s"] + c["read"]["cpu_s"]) / moved)
            f = cell["competitors"].get("fio")
            if comp != "fio" and f is not None:
                for op in ("read", "write"):
                    ratios[op].append(c[op]["mib_s"] / f[op]["mib_s"])
        if comp != "fio":
            for op in ("read", "write"):
                s[f"{key}_{op}_vs_fio"] = median(ratios[op], None)
        s[f"{key}_cpu_s_per_gib"] = median(cpu, None)
    s["goal_uring_vs_fio"] = GOAL
    r, w = s.get("uring_read_vs_fio"), s.get("uring_write_vs_fio")
    s["uring_meets_throughput_goal"] = None if r is None or w is None else \
        bool(r >= GOAL and w >= GOAL)
    mine, theirs = s.get("uring_cpu_s_per_gib"), s.get("deepspeed_cpu_s_per_gib")
    s["uring_cpu_vs_deepspeed"] = None if mine is None or not theirs else mine / theirs
    s["uring_meets_cpu_goal"] = None if mine is None or theirs is None else bool(mine <= theirs)
    goals = (s["uring_meets_throughput_goal"], s["uring_meets_cpu_goal"])
    s["uring_meets_goal"] = None if None in goals else all(goals)
    above = {k[:-len("_vs_fio")]: v for k, v in s.items()
             if k.endswith("_vs_fio") and v is not None and v > 1.05}
    s["fio_not_ceiling"] = sorted(above)
    return s


def fmt(x: Optional[float], spec: str) -> str:
    """Format a number or show '-'."""
    return "-" if x is None else format(x, spec)


def print_report(rows: list[dict[str, Any]], summary: dict[str, Any],
                 skipped: dict[str, str], total: int, reps: int) -> None:
    """The human-readable table on stdout."""
    print(f"O_DIRECT swap-file throughput: {fmt_bytes(total)} written then read per run, "
          f"{reps} interleaved repetitions (medians)")
    head = (f"{'req':>5} {'qd':>3} {'competitor':<10} {'dir':<5} {'MiB/s':>8} {'min':>7} "
            f"{'max':>7} {'CPU s/GiB':>10} {'vs fio':>7} {'dev KiB':>8}")
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        key = (r["request_bytes"], r["queue_depth"])
        if last is not None and key != last:
            print()
        last = key
        print(f"{fmt_bytes(r['request_bytes']).replace('.00 ', ''):>5} {r['queue_depth']:>3} "
              f"{r['competitor']:<10} {r['direction']:<5} {r['mib_s_median']:8.0f} "
              f"{r['mib_s_min']:7.0f} {r['mib_s_max']:7.0f} {r['cpu_s_per_gib_median']:10.3f} "
              f"{fmt(r['ratio_to_fio_median'], '7.3f'):>7} "
              f"{fmt(r['dev_avg_request_kib_median'], '8.0f'):>8}")
    for comp, why in skipped.items():
        print(f"skipped {comp}: {why}")
    print()
    parts = []
    for comp in ("uring", "threads", "pyuring", "deepspeed", "uring_thp"):
        if f"{comp}_cpu_s_per_gib" not in summary:
            continue
        parts.append(f"{comp.replace('_', '-')} read/write vs fio "
                     f"{fmt(summary.get(f'{comp}_read_vs_fio'), '.3f')}"
                     f"/{fmt(summary.get(f'{comp}_write_vs_fio'), '.3f')}, "
                     f"CPU {fmt(summary[f'{comp}_cpu_s_per_gib'], '.3f')} s/GiB")
    if "fio_cpu_s_per_gib" in summary:
        parts.append(f"fio CPU {fmt(summary['fio_cpu_s_per_gib'], '.3f')} s/GiB")
    print("summary: " + ";\n         ".join(parts))
    if summary.get("fio_not_ceiling"):
        print("note: fio was not this disk's ceiling here (median ratio above 1.05 for "
              + ", ".join(x.replace("_", " ") for x in summary["fio_not_ceiling"])
              + "); the dev KiB column shows how large the device requests were")
    met = summary.get("uring_meets_throughput_goal")
    if met is None:
        print(f"goal (uring >= {GOAL} of fio): not evaluated (no uring or no fio numbers)")
    else:
        print(f"goal (uring >= {GOAL} of fio on reads and writes): "
              f"{'met' if met else 'NOT met'} (read {summary['uring_read_vs_fio']:.3f}, "
              f"write {summary['uring_write_vs_fio']:.3f})")
    met = summary.get("uring_meets_cpu_goal")
    if met is None:
        print("goal (uring CPU/GiB <= DeepSpeed's): not evaluated (no uring or no DeepSpeed "
              "numbers)")
    else:
        print(f"goal (uring CPU/GiB <= DeepSpeed's): {'met' if met else 'NOT met'} "
              f"({summary['uring_cpu_s_per_gib']:.3f} vs "
              f"{summary['deepspeed_cpu_s_per_gib']:.3f} s/GiB)")


# ---------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options; exits 2 with a one-line message on bad arguments."""
    p = _ArgumentParser(prog="io_throughput.py", description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write all numbers as JSON to PATH")
    p.add_argument("--quick", action="store_true",
                   help=f"{fmt_bytes(QUICK_TOTAL)} per run, {QUICK_REPS} repetitions")
    p.add_argument("--dir", metavar="DIR",
                   help="directory for the swap file (default: a temporary dir under /var/tmp)")
    p.add_argument("--reps", metavar="N", help=f"repetitions (default {FULL_REPS}, "
                                               f"--quick {QUICK_REPS})")
    p.add_argument("--no-fio", action="store_true", help="do not run fio (no ratios then)")
    p.add_argument("--no-deepspeed", action="store_true", help="do not run DeepSpeed")
    p.add_argument("--no-thp", action="store_true",
                   help="do not run the diagnostic uring-thp competitor")
    p.add_argument("--total", metavar="SIZE", help=argparse.SUPPRESS)  # tests: e.g. 64MiB
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = QUICK_REPS if args.quick else FULL_REPS
    else:
        try:
            args.reps = int(args.reps)
        except ValueError:
            p.error(f"--reps: expected a positive integer, got {args.reps!r}")
        if args.reps < 1:
            p.error(f"--reps: expected a positive integer, got {args.reps}")
    if args.total is None:
        args.total = QUICK_TOTAL if args.quick else FULL_TOTAL
    else:
        try:
            args.total = parse_size("--total", args.total)
        except ConfigError as exc:
            p.error(str(exc))
        big = max(REQUEST_SIZES)
        if args.total < big or args.total % big:
            p.error(f"--total: must be a positive multiple of {fmt_bytes(big)}, got "
                    f"{args.total}")
    if args.dir is not None:
        if not os.path.isdir(args.dir):
            p.error(f"--dir: {args.dir!r} is not a directory")
        if not os.access(args.dir, os.W_OK | os.X_OK):
            p.error(f"--dir: {args.dir!r} is not writable")
    check_json_path(p, args.json)
    return args


def remove_stale_dirs(base: str) -> None:
    """Remove ``memascend-io-<pid>-*`` directories of earlier runs whose process is gone
    (a run killed with SIGKILL cannot clean up its 1 GiB swap file itself)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            parts = name.split("-")
            if not name.startswith("memascend-io-") or len(parts) < 4 or not parts[2].isdigit():
                continue
            try:
                os.kill(int(parts[2]), 0)
                continue  # still running
            except ProcessLookupError:
                pass
            except OSError:
                continue
            log(f"removing {os.path.join(base, name)} left by a killed run (pid {parts[2]})")
            shutil.rmtree(os.path.join(base, name), ignore_errors=True)


def _on_sigterm(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; 0 on success, 1 when it could not run, 130 on interrupt."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, _on_sigterm)
    need = QUICK_MIN_FREE if args.quick else FULL_MIN_FREE
    need = max(need, args.total + 256 * MiB)
    base = args.dir or "/var/tmp"
    free = shutil.disk_usage(base).free
    if free < need:
        print(f"io_throughput.py: error: only {fmt_bytes(free)} free in {base}, need at least "
              f"{fmt_bytes(need)}; free space or pass --dir on a larger disk", file=sys.stderr)
        return 1

    if not args.dir:
        remove_stale_dirs("/var/tmp")
    tmpdir = None if args.dir else tempfile.mkdtemp(prefix=f"memascend-io-{os.getpid()}-",
                                                    dir="/var/tmp")
    try:
        return _run(args, args.dir or tmpdir)
    except KeyboardInterrupt:
        log("io_throughput.py: interrupted (the swap file has been removed)")
        return 130
    finally:
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)


def _run(args: argparse.Namespace, directory: str) -> int:
    """Measure every competitor; the swap file and buffers are freed whatever happens."""
    import torch

    total = args.total
    probes = probe_backends()
    skipped: dict[str, str] = {}
    competitors: list[str] = []
    for b in ENGINE_BACKENDS:
        ok, why = probes[b]
        if ok:
            competitors.append(b)
        else:
            skipped[b] = why
    info = machine_info(directory)
    path = make_file(directory, total)
    dev = BlockDevice(path)
    info["block_device"] = dev.info
    info["thp_mode"] = thp_mode()
    pool = lease = None
    buffers: dict[str, Buffer] = {}
    try:
        pool = PinnedPool()
        buf_bytes = total  # one buffer holds the whole file, as DeepSpeed's tensor does
        lease = pool.lease(buf_bytes)
        buffers["lease"] = Buffer(lease.address, buf_bytes, lease.as_tensor(torch.uint8),
                                  "PinnedPool lease", lambda: None)
        gen = torch.Generator().manual_seed(1234)
        reference = torch.randint(0, 256, (math.gcd(REFERENCE_BYTES, total),), dtype=torch.uint8,
                                  generator=gen)
        fill_tiles(buffers["lease"].tensor, reference)
        log(f"swap file {path} ({fmt_bytes(total)}, {info['filesystem']} on {dev.name}); "
            f"filling it once ...")
        fill_file(path, buffers["lease"].tensor, total)

        if "uring" not in competitors:
            skipped["uring-thp"] = "uring backend unavailable"
        elif args.no_thp:
            skipped["uring-thp"] = "--no-thp"
        elif info["thp_mode"] not in ("always", "madvise"):
            skipped["uring-thp"] = f"transparent huge pages are {info['thp_mode']!r}"
        else:
            try:
                buffers["thp"] = thp_buffer(buf_bytes)
                fill_tiles(buffers["thp"].tensor, reference)
                competitors.insert(1, "uring-thp")
            except OSError as exc:
                skipped["uring-thp"] = f"no huge-page buffer: {exc}"
        info["buffers"] = {name: {"kind": b.kind, "bytes": b.nbytes, "layout": {
            str(req): phys_layout(b.address, b.nbytes, req, dev.info.get("max_segments"))
            for req in REQUEST_SIZES}} for name, b in buffers.items()}

        ds = None
        if args.no_deepspeed:
            skipped["deepspeed"] = "--no-deepspeed"
        else:
            ds = DeepSpeedRunner(path, dev)
            log("loading DeepSpeed's async_io op ...")
            why = ds.load()
            if why is None:
                competitors.append("deepspeed")
                info["deepspeed"] = ds.version
            else:
                skipped["deepspeed"] = why
                log(f"  skipping deepspeed: {why}")
        if args.no_fio:
            skipped["fio"] = "--no-fio"
        elif info["fio"] is None:
            skipped["fio"] = "fio not on PATH (apt-get install -y fio)"
        else:
            competitors.append("fio")

        runners: dict[str, Callable[[int, int], dict[str, Any]]] = {}
        for comp in competitors:
            if comp in ENGINE_BACKENDS or comp == "uring-thp":
                er = EngineRunner(comp.split("-")[0], path,
                                  buffers["thp" if comp == "uring-thp" else "lease"],
                                  reference, dev)
                runners[comp] = functools.partial(er.run, total=total)
        if "deepspeed" in competitors:
            runners["deepspeed"] = lambda req, qd: ds.run(req, qd, total, reference)
        if "fio" in competitors:
            runners["fio"] = lambda req, qd: run_fio(path, req, qd, total, dev)

        raw: list[dict[str, Any]] = []
        configs = [(req, qd) for req in REQUEST_SIZES for qd in QUEUE_DEPTHS]
        n = len(competitors)
        t_start = time.perf_counter()
        for rep in range(args.reps):
            order = competitors[rep % n:] + competitors[:rep % n]
            for req, qd in configs:
                cell: dict[str, Any] = {"rep": rep, "request_bytes": req, "queue_depth": qd,
                                        "order": order, "competitors": {}}
                for comp in order:
                    res = runners[comp](req, qd)
                    if res.get("verified") is False:
                        raise RuntimeError(f"{comp}: data read back differs from data written "
                                           f"(req {req}, qd {qd}, rep {rep})")
                    cell["competitors"][comp] = res
                log(f"rep {rep + 1}/{args.reps} req {fmt_bytes(req)} qd {qd}: " + ", ".join(
                    f"{c} {cell['competitors'][c]['write']['mib_s']:.0f}/"
                    f"{cell['competitors'][c]['read']['mib_s']:.0f}" for c in order)
                    + " MiB/s (write/read)")
                raw.append(cell)
        elapsed = time.perf_counter() - t_start
        info["loadavg_end"] = os.getloadavg()
    except (MemAscendError, RuntimeError, OSError, MemoryError, TimeoutError) as exc:
        print(f"io_throughput.py: error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        runners = {}
        for b in buffers.values():
            b.close()
        if lease is not None:
            lease.release()
        if pool is not None:
            try:
                pool.close()
            except MemAscendError as exc:  # a view still alive in a traceback: not fatal
                log(f"note: {exc}")

    rows = aggregate(raw, competitors)
    summary = summarize(raw, competitors)
    order_keys = ["uring_read_vs_fio", "uring_write_vs_fio", "uring_cpu_s_per_gib"]
    summary = {**{k: summary[k] for k in order_keys if k in summary}, **summary}
    print_report(rows, summary, skipped, total, args.reps)
    if args.json:
        doc = {"benchmark": "io_throughput", "command": shlex.join([sys.executable, *sys.argv]),
               "machine": info, "quick": args.quick, "total_bytes": total, "reps": args.reps,
               "request_sizes": list(REQUEST_SIZES), "queue_depths": list(QUEUE_DEPTHS),
               "buffer_bytes": buf_bytes, "competitors": competitors, "skipped": skipped,
               "elapsed_s": elapsed, "raw": raw, "results": rows, "summary": summary}
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
