"""Pinned-memory overhead of three allocators on ZeRO-Infinity's swap-buffer trace.

For each model config this replays the swap-buffer allocations that ZeRO-Infinity (DeepSpeed
0.19.8, default ``offload_param`` / ``offload_optimizer`` / ``aio`` settings, one rank) makes
in one training step, and reports for each allocator its peak reserved bytes against the peak
of bytes actually requested (ratio 1.0 = zero overhead):

* ``memascend``: the real :class:`memascend.PinnedPool` (``lock="off", populate=False``: only
  address space is reserved, so multi-GB traces replay on a small machine), driven through
  actual ``lease`` / ``release``; numbers are its ``stats()`` ``reserved_peak`` and
  ``requested_peak``.
* ``pow2-cached``: PyTorch's CUDA caching host allocator, emulated: a request is rounded up to
  the next power of two, freed blocks are cached by that rounded size and reused only for the
  same size, never split, never returned. With CUDA present the trace is also replayed through
  real ``pin_memory=True`` tensors (when it fits in RAM); otherwise that is reported skipped.
* ``deepspeed-fixed``: DeepSpeed's fixed slots at their defaults: parameter pool
  ``5 × ⌈1e8⌉ × 2 B`` plus optimizer pool ``4 × ⌈L⌉ × 4 B``, L the largest sub-group numel
  (``⌈n⌉`` pads n elements to A = 1024 B / element size: 512 fp16, 256 fp32 elements). The
  trace is replayed through the slots to prove every request fits. A parameter larger than
  ``buffer_size`` makes DeepSpeed refuse to start (issue #3506); the slots are then sized to the
  largest parameter and a ``note`` says so.

The trace. Parameter phase: forward in module order, then backward in reverse; each parameter
of at least ``max(1 MiB, aio block_size = 1 MiB)`` bytes in fp16 is swapped in as a buffer of
``⌈numel⌉ × 2 B`` (smaller ones stay in RAM and are skipped), with up to ``buffer_count = 5``
in flight: before each swap-in the buffer 5 behind is freed. Optimizer phase: parameters
(all of them, in module order) form sub-groups, closed as soon as their numel reaches
``sub_group_size = 1e9`` (so a sub-group overshoots by at most one parameter); for each
sub-group the fp32 master, exp_avg, exp_avg_sq and fp32 gradient, each ``⌈numel⌉ × 4 B``, are
allocated together, then freed. Requested bytes are these exact aligned sizes. Only swap
buffers are modelled: DeepSpeed's other host memory (fp16 flat CPU buffer of up to
``max_in_cpu`` elements, the gradient buffer, bounce buffers) is outside this comparison.

The allocate/free cost is measured by ``native/bench_pool`` (built with make, JSON parsed).

Usage: ``bench/pool_overhead.py [--json PATH] [--quick] [--models a,b,...]``.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memascend import PinnedPool  # noqa: E402
from memascend.errors import ConfigError  # noqa: E402
from memascend.shapes import (llama_parameter_shapes,  # noqa: E402
                              load_model_config)
from memascend.sysinfo import fmt_bytes  # noqa: E402
from bench._common import check_json_path, machine_info, write_json  # noqa: E402

FULL_MODELS = ("llama-1b", "llama2-7b", "llama2-13b", "llama2-70b")
QUICK_MODELS = ("llama-tiny", "llama-1b")
QUICK_TIMING_ITERS = 30
FP16, FP32 = 2, 4
# DeepSpeed 0.19.8 defaults (see /work/shared/DEEPSPEED_NOTES.md)
AIO_ALIGNED_BYTES = 1024          # × intra_op_parallelism (1)
MIN_SWAP_BYTES = max(1 << 20, 1 << 20)  # max(MIN_AIO_BYTES, aio block_size)
PARAM_BUFFER_COUNT, PARAM_BUFFER_SIZE = 5, 100_000_000
OPT_BUFFER_COUNT, SUB_GROUP_SIZE = 4, 1_000_000_000
OVERHEAD_LIMIT = 1.01


def aligned_numel(numel: int, elem: int) -> int:
    """``numel`` padded to DeepSpeed's I/O alignment of ``AIO_ALIGNED_BYTES // elem`` elements."""
    a = AIO_ALIGNED_BYTES // elem
    return -(-numel // a) * a


def sub_groups(numels: list[int], size: int = SUB_GROUP_SIZE) -> list[int]:
    """Numels of ZeRO-3's sub-groups: consecutive parameters, closed once they reach ``size``."""
    groups, acc = [], 0
    for i, n in enumerate(numels):
        acc += n
        if acc >= size or i == len(numels) - 1:
            groups.append(acc)
            acc = 0
    return groups


def build_trace(numels: list[int]) -> list[tuple[str, str, int, int]]:
    """The swap-buffer trace as ``(op, phase, id, nbytes)`` events; op is alloc or free."""
    events: list[tuple[str, str, int, int]] = []
    swapped = [aligned_numel(n, FP16) * FP16 for n in numels if n * FP16 >= MIN_SWAP_BYTES]
    inflight: deque[int] = deque()
    next_id = 0
    for nbytes in swapped + swapped[::-1]:
        if len(inflight) == PARAM_BUFFER_COUNT:
            events.append(("free", "param", inflight.popleft(), 0))
        events.append(("alloc", "param", next_id, nbytes))
        inflight.append(next_id)
        next_id += 1
    while inflight:
        events.append(("free", "param", inflight.popleft(), 0))
    for sg in sub_groups(numels):
        ids = list(range(next_id, next_id + 4))  # master, exp_avg, exp_avg_sq, gradient
        next_id += 4
        events += [("alloc", "optim", i, aligned_numel(sg, FP32) * FP32) for i in ids]
        events += [("free", "optim", i, 0) for i in ids]
    return events


def requested_peaks(events: list[tuple[str, str, int, int]]) -> dict[str, int]:
    """Peak of live requested bytes over the whole trace and per phase."""
    live: dict[int, int] = {}
    cur, peak = 0, {"param": 0, "optim": 0}
    for op, phase, i, nbytes in events:
        if op == "alloc":
            live[i] = nbytes
            cur += nbytes
            peak[phase] = max(peak[phase], cur)
        else:
            cur -= live.pop(i)
    return {"requested_peak": max(peak.values()), "param_phase_requested_peak": peak["param"],
            "optimizer_phase_requested_peak": peak["optim"]}


def replay_memascend(events: list[tuple[str, str, int, int]]) -> dict[str, Any]:
    """Replay through a real PinnedPool(lock="off", populate=False); returns its peak stats."""
    pool = PinnedPool(lock="off", populate=False)
    live = {}
    try:
        for op, _phase, i, nbytes in events:
            if op == "alloc":
                live[i] = pool.lease(nbytes)
            else:
                live.pop(i).release()
        st = pool.stats()
    finally:
        for lease in live.values():
            lease.release()
        pool.close()
    return {"method": "real PinnedPool(lock='off', populate=False), lease/release replay",
            "reserved_peak": st.reserved_peak, "requested_peak": st.requested_peak,
            "ratio": st.reserved_peak / st.requested_peak, "in_use_peak": st.in_use_peak,
            "arenas_peak": st.arenas_peak, "leases_total": st.leases_total,
            "reserved_after": st.reserved, "deferred_releases": st.deferred_releases}


def replay_pow2(events: list[tuple[str, str, int, int]]) -> tuple[int, int]:
    """Emulated caching host allocator; returns (reserved_peak, distinct block sizes)."""
    cached: dict[int, int] = {}
    live: dict[int, int] = {}
    reserved = 0
    for op, _phase, i, nbytes in events:
        if op == "alloc":
            size = 1 << (nbytes - 1).bit_length()
            if cached.get(size, 0):
                cached[size] -= 1
            else:
                reserved += size  # a new block; blocks are never returned
                cached.setdefault(size, 0)
            live[i] = size
        else:
            cached[live.pop(i)] += 1
    return reserved, len(cached)


def replay_real_pinned(events: list[tuple[str, str, int, int]], emulated_peak: int) -> dict:
    """Replay through real pinned torch tensors (CUDA only); skipped when it cannot run."""
    import torch

    if not torch.cuda.is_available():
        return {"skipped": "torch.cuda.is_available() is False: no CUDA on this machine"}
    import psutil

    avail = psutil.virtual_memory().available
    if emulated_peak > avail // 2:
        return {"skipped": f"needs about {fmt_bytes(emulated_peak)} of pinned RAM, more than "
                           f"half of the {fmt_bytes(avail)} available"}
    stats_fn = getattr(torch.cuda, "host_memory_stats", None)
    empty_fn = getattr(torch._C, "_host_emptyCache", None)
    if empty_fn is not None:
        empty_fn()
    if hasattr(torch.cuda, "reset_peak_host_memory_stats"):
        torch.cuda.reset_peak_host_memory_stats()
    live = {}
    try:
        for op, _phase, i, nbytes in events:
            if op == "alloc":
                live[i] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            else:
                del live[i]
        if stats_fn is None:
            return {"skipped": "torch.cuda.host_memory_stats is not in this torch"}
        stats = {k: int(v) for k, v in stats_fn().items() if isinstance(v, (int, float))}
    except RuntimeError as exc:
        return {"failed": str(exc)}
    finally:
        live.clear()
        if empty_fn is not None:
            empty_fn()
    return {"method": "real pin_memory=True tensors, torch.cuda.host_memory_stats()",
            "stats": stats}


def deepspeed_fixed(numels: list[int], groups: list[int]) -> dict[str, Any]:
    """DeepSpeed's fixed swap slots at defaults, sized for this model."""
    swapped = [n for n in numels if n * FP16 >= MIN_SWAP_BYTES]
    slot = aligned_numel(PARAM_BUFFER_SIZE, FP16)
    out: dict[str, Any] = {"method": "fixed slots at DeepSpeed 0.19.8 defaults (computed)"}
    largest = aligned_numel(max(swapped), FP16) if swapped else 0
    if largest > slot:
        out["note"] = (f"largest swapped parameter has {max(swapped):,} elements > buffer_size "
                       f"{PARAM_BUFFER_SIZE:,}: DeepSpeed refuses to start (issue #3506); "
                       f"slots sized to the largest parameter instead")
        slot = largest
    opt_slot = aligned_numel(max(groups), FP32)
    out.update(param_slot_numel=slot, param_pool_bytes=PARAM_BUFFER_COUNT * slot * FP16,
               optimizer_slot_numel=opt_slot,
               optimizer_pool_bytes=OPT_BUFFER_COUNT * opt_slot * FP32)
    out["reserved_peak"] = out["param_pool_bytes"] + out["optimizer_pool_bytes"]
    return out


def check_fixed_slots(events: list[tuple[str, str, int, int]], fixed: dict[str, Any]) -> None:
    """Replay the trace through the fixed slots; raise RuntimeError if a request cannot fit."""
    cap = {"param": (PARAM_BUFFER_COUNT, fixed["param_slot_numel"] * FP16),
           "optim": (OPT_BUFFER_COUNT, fixed["optimizer_slot_numel"] * FP32)}
    used = {"param": 0, "optim": 0}
    phase_of: dict[int, str] = {}
    for op, phase, i, nbytes in events:
        if op == "free":
            used[phase_of.pop(i)] -= 1
            continue
        count, slot_bytes = cap[phase]
        if nbytes > slot_bytes or used[phase] == count:
            raise RuntimeError(f"trace request {nbytes} B does not fit DeepSpeed's {phase} "
                               f"slots ({count} × {slot_bytes} B, {used[phase]} in use)")
        used[phase] += 1
        phase_of[i] = phase


def measure_model(name: str) -> dict[str, Any]:
    """All allocators on one model's trace."""
    cfg = load_model_config(name)
    shapes = llama_parameter_shapes(cfg)
    numels = [math.prod(s) for _n, s in shapes]
    groups = sub_groups(numels)
    events = build_trace(numels)
    peaks = requested_peaks(events)
    req = peaks["requested_peak"]
    ma = replay_memascend(events)
    pow2_peak, pow2_sizes = replay_pow2(events)
    import torch

    cuda = torch.cuda.is_available()
    fixed = deepspeed_fixed(numels, groups)
    check_fixed_slots(events, fixed)
    fixed.update(requested_peak=req, ratio=fixed["reserved_peak"] / req)
    return {
        "model": name, "parameters": sum(numels), "parameter_tensors": len(numels),
        "swapped_parameter_tensors": sum(n * FP16 >= MIN_SWAP_BYTES for n in numels),
        "largest_parameter_numel": max(numels), "sub_groups": len(groups),
        "largest_sub_group_numel": max(groups),
        "trace": {"events": len(events), "allocations": sum(e[0] == "alloc" for e in events),
                  **peaks},
        "allocators": {
            "memascend": ma,
            "pow2_cached": {"method": "emulated" if cuda else "emulated (no CUDA on this machine)",
                            "reserved_peak": pow2_peak, "requested_peak": req,
                            "ratio": pow2_peak / req, "block_sizes": pow2_sizes,
                            "real_pinned": replay_real_pinned(events, pow2_peak)},
            "deepspeed_fixed": fixed,
        },
    }


def run_timing(iters: int | None) -> dict[str, Any]:
    """Build and run native/bench_pool; its parsed JSON."""
    build = subprocess.run(["make", "-s", "-C", str(REPO / "native"), "build/plain/bench_pool"],
                           capture_output=True, text=True)
    if build.returncode != 0:
        raise RuntimeError(f"building native/bench_pool failed (make exit {build.returncode}):\n"
                           f"{build.stdout}{build.stderr}")
    cmd = [str(REPO / "native" / "build" / "plain" / "bench_pool")]
    if iters:
        cmd.append(str(iters))
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed (exit {run.returncode}): {run.stderr}")
    try:
        out = json.loads(run.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{shlex.join(cmd)} printed invalid JSON: {exc}") from exc
    out["command"] = shlex.join(cmd)
    return out


def print_tables(results: list[dict[str, Any]], timing: dict[str, Any]) -> None:
    """The human-readable report on stdout."""
    gib = 1 << 30
    head = (f"{'model':<11} {'params':>7} {'swapped':>7} {'requested':>10} "
            f"{'memascend':>16} {'pow2-cached':>17} {'deepspeed-fixed':>17}")
    print("Peak pinned bytes (GiB) and reserved/requested ratio")
    print(head)
    print("-" * len(head))
    for r in results:
        a = r["allocators"]
        cells = [f"{a[k]['reserved_peak'] / gib:7.2f} ({a[k]['ratio']:5.3f})"
                 for k in ("memascend", "pow2_cached", "deepspeed_fixed")]
        print(f"{r['model']:<11} {r['parameters'] / 1e9:6.2f}B {r['swapped_parameter_tensors']:>7}"
              f" {r['trace']['requested_peak'] / gib:10.2f} {cells[0]:>16} {cells[1]:>17}"
              f" {cells[2]:>17}")
    for r in results:
        if "note" in r["allocators"]["deepspeed_fixed"]:
            print(f"note ({r['model']}): {r['allocators']['deepspeed_fixed']['note']}")
    kinds = ("ma_pool", "ma_pool_retain", "memalign_mlock", "memalign")
    print("\nAllocate/free pair, µs (native/bench_pool)")
    print(f"{'size':>8} " + " ".join(f"{k:>15}" for k in kinds))
    for row in timing["results"]:
        print(f"{fmt_bytes(row['bytes']):>8} "
              + " ".join(f"{row[k]['ns_per_pair'] / 1e3:15.2f}" for k in kinds))


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options; exits 2 with a message on bad arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true",
                   help=f"models {','.join(QUICK_MODELS)} and {QUICK_TIMING_ITERS} timing "
                        f"iterations per case")
    p.add_argument("--models", metavar="A,B,...",
                   help=f"model presets or config paths (default: {','.join(FULL_MODELS)})")
    args = p.parse_args(argv)
    if args.models is not None:
        args.models = [m.strip() for m in args.models.split(",") if m.strip()]
        if not args.models:
            p.error("--models: no model given")
    else:
        args.models = list(QUICK_MODELS if args.quick else FULL_MODELS)
    for m in args.models:
        try:
            load_model_config(m)
        except ConfigError as exc:
            p.error(f"--models: {exc}")
    check_json_path(p, args.json)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 when a measurement could not be made."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = []
    try:
        for name in args.models:
            print(f"replaying {name} ...", file=sys.stderr, flush=True)
            results.append(measure_model(name))
        print("timing allocate/free pairs (native/bench_pool) ...", file=sys.stderr, flush=True)
        timing = run_timing(QUICK_TIMING_ITERS if args.quick else None)
    except (RuntimeError, OSError, MemoryError) as exc:
        print(f"pool_overhead: error: {exc}", file=sys.stderr)
        return 1

    warnings = []
    for r in results:
        ma = r["allocators"]["memascend"]
        if ma["requested_peak"] != r["trace"]["requested_peak"]:
            warnings.append(f"{r['model']}: pool requested_peak {ma['requested_peak']} != trace "
                            f"requested peak {r['trace']['requested_peak']}")
        if ma["ratio"] > OVERHEAD_LIMIT:
            warnings.append(f"{r['model']}: memascend overhead {ma['ratio']:.4f} exceeds "
                            f"{OVERHEAD_LIMIT}")
    summary = {k: max(r["allocators"][a]["ratio"] for r in results) for k, a in (
        ("memascend_max_overhead", "memascend"), ("pow2_max_overhead", "pow2_cached"),
        ("deepspeed_fixed_max_overhead", "deepspeed_fixed"))}
    summary["memascend_within_limit"] = summary["memascend_max_overhead"] <= OVERHEAD_LIMIT
    summary["limit"] = OVERHEAD_LIMIT
    summary["warnings"] = warnings

    print_tables(results, timing)
    print(f"\nsummary: memascend max overhead {summary['memascend_max_overhead']:.4f}, "
          f"pow2-cached {summary['pow2_max_overhead']:.4f}, "
          f"deepspeed-fixed {summary['deepspeed_fixed_max_overhead']:.4f}")
    for w in warnings:
        print(f"WARNING: {w}")
    if args.json:
        doc = {"benchmark": "pool_overhead", "command": shlex.join([sys.executable, *sys.argv]),
               "machine": machine_info(), "quick": args.quick, "models": results,
               "timing": timing, "summary": summary}
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
