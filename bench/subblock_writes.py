"""What the device writes for an O_DIRECT write shorter than a filesystem block.

Why it matters: ``bench/ssd_footprint.py`` counts bytes written with the ``write_bytes`` of
``/proc/self/io``, which adds up the lengths that O_DIRECT requests ask for. Stock DeepSpeed
pads a tensor to 1 KiB and writes e.g. a 3 KiB norm weight as one 3 KiB request; memascend's
store writes whole 4 KiB blocks. On a filesystem with 4 KiB blocks the block is written
whole either way (the filesystem zero-fills the rest of a block it had not written yet), so
the counter shows stock writing less than the device does.

What it does: in a fresh, preallocated file in ``--dir`` it issues ``--writes`` O_DIRECT
writes of each ``--sizes`` byte count, one per 4 KiB block, fsyncs, and compares the
``write_bytes`` delta of ``/proc/self/io`` with the delta of the sectors written by the
block device that holds ``--dir`` (``/sys/dev/block/MAJ:MIN/stat``). The device counter is
device-wide: run it on a quiet machine (other writers inflate it; the repetitions show the
noise); the process counter counts any page this process writes meanwhile too (a first run
writes bytecode caches), so use enough ``--writes`` to make one page negligible. Sizes run
in turn, ``--reps`` times each.

Usage: ``bench/subblock_writes.py [--dir /var/tmp] [--sizes 3072,4096] [--writes 4096]
[--reps 2] [--json PATH]``.
"""
from __future__ import annotations

import argparse
import mmap
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import check_json_path, log, machine_info, median, write_json  # noqa: E402

BLOCK = 4096
SECTOR = 512  # the unit of /sys/block/*/stat, whatever the device's block size


def device_stat(directory: str) -> str:
    """The ``stat`` file of the block device (or partition) holding ``directory``."""
    st = os.stat(directory)
    path = f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat"
    if not os.path.exists(path):
        raise SystemExit(f"subblock_writes: {directory} is not on a block device this "
                         f"script can read counters of ({path} missing; overlay or tmpfs?)")
    return path


def sectors_written(stat_path: str) -> int:
    with open(stat_path, encoding="ascii") as f:
        return int(f.read().split()[6])


def io_write_bytes() -> int:
    with open("/proc/self/io", encoding="ascii") as f:
        return int(next(ln for ln in f if ln.startswith("write_bytes:")).split()[1])


def one_run(directory: str, stat_path: str, size: int, writes: int) -> dict[str, Any]:
    """``writes`` O_DIRECT writes of ``size`` bytes, one per block of a fresh file."""
    buf = mmap.mmap(-1, BLOCK * ((size + BLOCK - 1) // BLOCK))  # page-aligned
    buf.write(b"\xa5" * len(buf))
    path = os.path.join(directory, f".memascend-subblock-{os.getpid()}")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_DIRECT, 0o600)
    except OSError as exc:
        buf.close()
        raise SystemExit(f"subblock_writes: cannot open a file in {directory} with O_DIRECT: "
                         f"{exc.strerror}") from exc
    try:
        os.posix_fallocate(fd, 0, writes * BLOCK)
        os.fsync(fd)
        time.sleep(0.5)
        w0, s0 = io_write_bytes(), sectors_written(stat_path)
        with memoryview(buf) as whole, whole[:size] as view:
            for i in range(writes):
                os.pwrite(fd, view, i * BLOCK)
        os.fsync(fd)
        time.sleep(0.5)
        w1, s1 = io_write_bytes(), sectors_written(stat_path)
    finally:
        os.close(fd)
        os.unlink(path)
        buf.close()
    return {"size": size, "writes": writes,
            "counted_per_write": (w1 - w0) / writes,
            "device_per_write": (s1 - s0) * SECTOR / writes}


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="/var/tmp", help="folder on the filesystem to measure")
    p.add_argument("--sizes", default="3072,4096",
                   help="comma-separated write sizes in bytes, multiples of 512")
    p.add_argument("--writes", type=int, default=4096, help="writes per run")
    p.add_argument("--reps", type=int, default=2, help="runs per size")
    p.add_argument("--json", metavar="PATH", help="write the results here")
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes: not a list of integers: {args.sizes!r}")
    if any(s <= 0 or s % SECTOR for s in args.sizes):
        p.error("--sizes: each must be a positive multiple of 512")
    if args.writes < 1 or args.reps < 1:
        p.error("--writes and --reps must be at least 1")
    check_json_path(p, args.json)
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    stat_path = device_stat(args.dir)
    runs = []
    for rep in range(args.reps):
        for size in args.sizes:
            r = one_run(args.dir, stat_path, size, args.writes)
            runs.append(r)
            log(f"rep {rep + 1}: {size} B writes: counted {r['counted_per_write']:.0f} B, "
                f"device {r['device_per_write']:.0f} B per write")
    summary = {str(s): {"counted_per_write": median(r["counted_per_write"] for r in runs
                                                    if r["size"] == s),
                        "device_per_write": median(r["device_per_write"] for r in runs
                                                   if r["size"] == s)}
               for s in args.sizes}
    for s, v in summary.items():
        print(f"{s:>6} B O_DIRECT writes: /proc/self/io counts {v['counted_per_write']:.0f} B, "
              f"the device wrote {v['device_per_write']:.0f} B per write (median of "
              f"{args.reps})")
    if args.json:
        write_json(args.json, {"benchmark": "subblock_writes", "machine": machine_info(args.dir),
                               "stat": stat_path, "runs": runs, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
