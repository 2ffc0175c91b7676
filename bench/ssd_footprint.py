"""SSD space and write volume: the swap folder against the state it holds, bytes written per step.

What it measures, for the two ways memascend offloads:

* the DeepSpeed drop-in against stock DeepSpeed on the same ZeRO-3 NVMe configuration (the
  ``tuned`` buffer setting of bench/zero_infinity.py: every parameter on NVMe, sub-groups of
  1e8; DeepSpeedCPUAdam; fp32), in pairs, the one going first alternating. Each run is a fresh
  process (bench/_zi_child.py via bench/_zi_run.py); ``--setting default`` takes
  DeepSpeed's default buffers instead (parameters then stay in stage 3's CPU copy). After
  each timed step the child adds up its swap folder: ``st_blocks`` of every file (what the
  filesystem holds for it, journals and manifests included) and the state stored in it
  (stock: its tensor files' sizes; memascend: the bytes of the keys its stores hold). Bytes
  written per step: the child's ``write_bytes`` delta of ``/proc/self/io`` over the timed
  steps (block-layer bytes; O_DIRECT libaio and io_uring alike).
* ``offload_model`` (bench/_plain_child.py, as in bench/plain_vs_ram.py: the same LLaMA,
  batch 1, fp32, AdamW) alone, twice: with its defaults (exact undo: a step's old versions
  kept aside until ``step()``) and with ``exact_undo=False, accumulation_steps=1`` (each
  update committed as it is made); its two stores' area size and stored bytes after each
  step (their sum, and each store's at the step where the sum peaked: ``per_area``), and
  the bytes they wrote (store counters). The two must give the same losses.

``swap_area_ratio`` of a run is the largest allocated / stored over its timed steps (1.0: no
space beyond the state). The JSON ``summary``: ``swap_area_ratio`` (max over memascend's
runs, drop-in and both plain ones), each run's own ratio, ``dropin_write_ratio`` (median
over pairs of the drop-in's bytes written per step over stock's), stock's own area ratio for
reference, and whether each pair's losses were equal. Without DeepSpeed's prebuilt
``async_io``/``cpu_adam`` ops (``make ds-ops``) the drop-in part is skipped and says why.

Usage: ``bench/ssd_footprint.py [--json PATH] [--model tiny|134m|523m] [--setting
default|tuned] [--pairs 2] [--steps 3] [--warmup 1] [--seq 64] [--dir /var/tmp]
[--timeout 1800] [--no-plain] [--no-dropin]``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import check_json_path, log, median, write_json  # noqa: E402
from bench._zi_run import run_child as run_ds_child  # noqa: E402
from bench.plain_vs_ram import parse_config, run_child as run_plain_child  # noqa: E402
from bench.zero_infinity import DEFAULT_EXT_DIR, MODELS, missing, settings_for  # noqa: E402
from memascend.sysinfo import fmt_bytes  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="ssd_footprint.py", description=__doc__.split("\n")[0])
    p.add_argument("--json", help="write the results here")
    p.add_argument("--model", default="134m", choices=["tiny", "134m", "523m"])
    p.add_argument("--setting", default="tuned", choices=["default", "tuned"],
                   help="DeepSpeed buffer setting of bench/zero_infinity.py (tuned)")
    p.add_argument("--pairs", type=int, default=2, help="stock/drop-in pairs (default 2)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per run (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps (default 1)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sample (default 64)")
    p.add_argument("--dir", default="/var/tmp", help="where the swap folders go")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    p.add_argument("--no-plain", action="store_true", help="skip the offload_model run")
    p.add_argument("--no-dropin", action="store_true", help="skip the DeepSpeed pairs")
    args = p.parse_args(argv)
    check_json_path(p, args.json)
    for name in ("pairs", "steps", "warmup", "seq"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be positive")
    return args


def area_ratio(steps: list[dict[str, Any]], area: str, stored: str) -> Optional[float]:
    """The largest allocated / stored over ``steps`` (None when nothing was stored)."""
    return max((s[area] / s[stored] for s in steps if s.get(stored)), default=None)


def dropin_pairs(args: argparse.Namespace, ext_dir: str) -> tuple[list[dict], Optional[str]]:
    """Stock/drop-in pairs; their records (or why they were skipped)."""
    why = missing(ext_dir, "cpu_adam")
    if why:
        return [], why
    model = MODELS[args.model]
    log_dir = tempfile.mkdtemp(prefix="memascend-ssd-logs-")
    pairs = []
    for i in range(args.pairs):
        order = ("stock", "memascend") if i % 2 == 0 else ("memascend", "stock")
        pair: dict[str, Any] = {}
        for system in order:
            spec = {"label": f"p{i}-{system}", "system": system, "model": model,
                    "settings": settings_for(args.setting, model), "batch": 1, "seq": args.seq,
                    "warmup": args.warmup, "steps": args.steps, "optimizer": "cpu_adam"}
            log(f"pair {i}: {system} ...")
            r = run_ds_child(spec, args.dir, ext_dir, args.timeout, log_dir)
            if "failed" in r:
                log(f"pair {i}: {system} FAILED: {r['failed']}: " + " | ".join(r["stderr_tail"]))
                pair[system] = {"failed": r["failed"]}
                continue
            pair[system] = {
                "write_bytes_per_step": r["write_bytes_per_step"],
                "read_bytes_per_step": r["read_bytes_per_step"],
                "swap_area_ratio": area_ratio(r["steps"], "swap_allocated", "swap_stored"),
                "swap_allocated_max": max(s["swap_allocated"] for s in r["steps"]),
                "swap_stored_max": max(s["swap_stored"] for s in r["steps"]),
                "losses": r["losses"], "step_time_s": r["step_time_s"]}
            log(f"pair {i}: {system}: wrote {fmt_bytes(r['write_bytes_per_step'])}/step, "
                f"area {pair[system]['swap_area_ratio']:.3f}x its state")
        pairs.append(pair)
    return pairs, None


def plain_run(args: argparse.Namespace, options: dict[str, Any]) -> dict[str, Any]:
    """One offload_model run with ``options``; its footprint record."""
    cfg = parse_config(f"{args.model}-1x{args.seq}")
    work = tempfile.mkdtemp(prefix="memascend-ssd-plain-", dir=args.dir)
    log(f"offload_model {options or ''} ...")
    try:
        rec = run_plain_child("offload", cfg, SimpleNamespace(steps=args.warmup + args.steps,
                                                               offload_options=options), work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timed = rec["steps"][args.warmup:]
    out = {"swap_area_ratio": area_ratio(timed, "swap_area", "swap_stored"),
           "swap_area_max": max(s["swap_area"] for s in timed),
           "swap_stored_max": max(s["swap_stored"] for s in timed),
           # each tier's area and stored bytes after the timed step where the sum peaked
           "per_area": max(timed, key=lambda s: s["swap_area"]).get("swap_areas"),
           "write_bytes_per_step": median(s["ssd_written"] for s in timed),
           "read_bytes_per_step": median(s["ssd_read"] for s in timed),
           "options": options, "losses": [s["loss"] for s in rec["steps"]]}
    per = out["per_area"] or {}
    log(f"offload_model: wrote {fmt_bytes(out['write_bytes_per_step'])}/step, area "
        f"{out['swap_area_ratio']:.3f}x its state (" + ", ".join(
            f"{k} {fmt_bytes(v['area'])} for {fmt_bytes(v['stored'])}" for k, v in per.items())
        + ")")
    return out


def summarize(pairs: list[dict], plain: Optional[dict],
              commit: Optional[dict] = None) -> dict[str, Any]:
    """The JSON summary (see the module docstring)."""
    ok = [p for p in pairs if all("failed" not in p.get(s, {"failed": 1})
                                  for s in ("stock", "memascend"))]
    ratios = [p["memascend"]["swap_area_ratio"] for p in ok]
    for run in (plain, commit):
        if run is not None:
            ratios.append(run["swap_area_ratio"])
    ratios = [r for r in ratios if r is not None]
    w = [p["memascend"]["write_bytes_per_step"] / p["stock"]["write_bytes_per_step"]
         for p in ok if p["stock"]["write_bytes_per_step"]]
    return {"pairs_ok": len(ok),
            "swap_area_ratio": max(ratios) if ratios else None,
            "dropin_swap_area_ratio": max((p["memascend"]["swap_area_ratio"] for p in ok),
                                          default=None),
            "stock_swap_area_ratio": max((p["stock"]["swap_area_ratio"] for p in ok),
                                         default=None),
            "plain_swap_area_ratio": plain["swap_area_ratio"] if plain else None,
            "plain_commit_swap_area_ratio": commit["swap_area_ratio"] if commit else None,
            "plain_losses_equal": plain["losses"] == commit["losses"]
            if plain and commit else None,
            "dropin_write_ratio": median(w, None),
            "losses_equal": all(p["stock"]["losses"] == p["memascend"]["losses"] for p in ok)
            if ok else None}


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; 0 on success (or a skipped drop-in part), 1 if nothing ran."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR", DEFAULT_EXT_DIR)
    doc: dict[str, Any] = {"benchmark": "ssd_footprint",
                           "command": shlex.join([sys.executable, *sys.argv]),
                           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "model": args.model, "setting": args.setting, "seq": args.seq,
                           "steps": args.steps}
    pairs, skipped = ([], "--no-dropin") if args.no_dropin else dropin_pairs(args, ext_dir)
    if skipped:
        log(f"drop-in pairs skipped: {skipped}")
        doc["dropin_skipped"] = skipped
    plain = None if args.no_plain else plain_run(args, {})
    commit = None if args.no_plain else plain_run(args, {"exact_undo": False,
                                                         "accumulation_steps": 1})
    doc.update(pairs=pairs, plain=plain, plain_commit=commit,
               summary=summarize(pairs, plain, commit))
    s = doc["summary"]
    print(f"swap area / stored state, max over memascend runs: {s['swap_area_ratio']}")
    print(f"  drop-in {s['dropin_swap_area_ratio']}, offload_model "
          f"{s['plain_swap_area_ratio']} (exact_undo=False: "
          f"{s['plain_commit_swap_area_ratio']}), stock DeepSpeed {s['stock_swap_area_ratio']}")
    print(f"drop-in bytes written per step / stock's (median of {s['pairs_ok']} pairs): "
          f"{s['dropin_write_ratio']}; losses equal: {s['losses_equal']}")
    if args.json:
        write_json(args.json, doc)
    return 0 if (s["pairs_ok"] or plain is not None) else 1


if __name__ == "__main__":
    sys.exit(main())
