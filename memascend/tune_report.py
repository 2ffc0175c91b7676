"""``memascend tune``: the command around :mod:`memascend.tune` (measure, print, save).

It measures the swap folder's filesystem (:func:`memascend.tune.measure`) with a progress bar,
prints one row per trial and the best configuration (or, with ``--json``, one JSON document),
and saves the best settings to the tuned file, which every engine and pool then uses unless
an explicit argument or the environment says otherwise (``--dry-run`` saves nothing).
``--quick`` measures fewer combinations on a smaller file.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from . import tune
from .config import parse_size
from .progress import Progress
from .sysinfo import fmt_bytes


def add_parser(sub: Any, positive_float: Any) -> None:
    """The ``tune`` sub-command's arguments."""
    p = sub.add_parser("tune", help="measure the swap folder's filesystem (backend x queue "
                                    "depth x request size x huge pages) and save the best "
                                    "I/O settings as the default")
    p.add_argument("--swap-dir", default=None,
                   help="where swap areas will live (default /var/tmp); a scratch file is "
                        "written there and removed")
    p.add_argument("--size", default=None,
                   help="bytes of the scratch file (default 1GiB; --quick 128MiB)")
    p.add_argument("--time-limit", type=positive_float, default=120.0, metavar="S",
                   help="stop measuring after S seconds with the trials so far (120)")
    p.add_argument("--quick", action="store_true",
                   help="fewer combinations (queue depth 16/64, requests 1/16 MiB, the pool's "
                        "default pages)")
    p.add_argument("--dry-run", action="store_true", help="measure and print; save nothing")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="save here instead of the tuned file in effect")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    """Run ``memascend tune``; 0 on success."""
    from .demo import _swap_base

    swap_dir = _swap_base(args.swap_dir)
    size = parse_size("--size", args.size) if args.size else \
        (128 << 20 if args.quick else 1 << 30)
    grid: dict[str, Any] = {}
    if args.quick:
        grid = {"depths": (16, 64), "chunks": (1 << 20, 16 << 20), "huge": ("auto",)}
    bar = Progress(1, "tune", enabled=not args.json or sys.stderr.isatty())  # total: below

    def progress(done: int, total: int, status: str) -> None:
        bar.total = total
        bar.update(done, status)

    try:
        trials = tune.measure(swap_dir, size, time_limit=args.time_limit, progress=progress,
                              **grid)
    finally:
        bar.close()
    b = tune.best(trials)
    saved = None if args.dry_run else tune.save(trials, swap_dir, size, args.output)
    if args.json:
        print(json.dumps({"swap_dir": swap_dir, "size_bytes": size,
                          "trials": [t.to_dict() for t in trials], "best": b.to_dict(),
                          "complete": len(trials) == bar.total, "saved_to": saved}, indent=2))
        return 0
    print(f"swap folder {swap_dir}, scratch file {fmt_bytes(size)}, O_DIRECT")
    print(f"{'backend':<9}{'depth':>6}{'request':>10}{'pages':>7}{'write MB/s':>12}"
          f"{'read MB/s':>11}{'mean':>9}")
    for t in sorted(trials, key=lambda t: -t.score):
        print(f"{t.backend:<9}{t.queue_depth:>6}{fmt_bytes(t.chunk_bytes):>10}"
              f"{'huge' if t.huge_pages == 'auto' else 'small':>7}{t.write_bps / 1e6:>12,.0f}"
              f"{t.read_bps / 1e6:>11,.0f}{t.score / 1e6:>9,.0f}")
    if len(trials) < bar.total:
        print(f"(time limit: {len(trials)} of {bar.total} combinations measured)")
    print(f"best: backend {b.backend}, queue depth {b.queue_depth}, requests of "
          f"{fmt_bytes(b.chunk_bytes)}, huge pages {b.huge_pages}")
    if saved:
        print(f"saved to {saved}: engines and pools use it unless an argument or a "
              "MEMASCEND_ENGINE_* / MEMASCEND_POOL_* variable says otherwise")
    return 0
