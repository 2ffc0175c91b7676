"""Compute/I/O overlap and pinned-memory peak of the TensorSwapper on a LLaMA parameter stream.

What it measures: how well :class:`memascend.TensorSwapper` hides SSD reads behind compute,
and how much pinned memory it holds doing so, against DeepSpeed ZeRO-Infinity's parameter
swapper. How: the parameter tensors of a LLaMA decoder stack (a model preset truncated to
``--layers`` layers; by default only the decoder layers' tensors, ``--with-embeddings`` adds
embed_tokens, the final norm and lm_head; bf16, so bytes = 2 × numel) are written once to a
:class:`memascend.SwapStore` in a fresh temporary directory, deleted at exit. A swapper with a
byte budget then streams them in module order (``--order fwdbwd``: forward then reverse),
calling ``mark_pass()`` after each pass; per tensor the consumer does ``swap_in → wait →
simulated compute → release``. Pass 0 teaches the swapper the order (all misses) and one
I/O-only warm-up pass follows; neither is counted, and in both the first 64 KiB of every
tensor read is compared with what was written. Then, ``--passes`` times for each
compute/I/O ratio r (default 1, 0.5, 2), a block of five consecutive passes: two I/O-only
passes (zero compute; the second one's wall time is ``T_io``, a pass bound by reads alone,
the consumer's own time in ``swap_in()`` / ``release()`` included),
then three compute passes that sleep ``r × T_io × tensor bytes / total bytes`` per tensor, so
that each pass computes ``T_c ≈ r × T_io``. The first pass of each kind is a lead-in and is not
counted: a pass starts with whatever the previous one prefetched (``mark_pass`` lets the
swapper read the next pass's first tensors early), so an I/O pass right after a compute pass
starts with a full budget of ready data and a compute pass after an I/O pass with little; the
counted passes start from their own kind's steady state, as consecutive training steps do.
Overlap efficiency of a repetition is ``max(T_c, T_io) / wall`` (mean of the two counted
compute passes; 1.0 = the smaller of I/O and compute fully hidden, above 1.0 only through
noise in ``T_io``); the result is the median over repetitions. Running the I/O-only passes inside every repetition keeps a noisy
machine's drift out of the ratios. A budget sweep (``--sweep``, multiples of the largest
tensor) repeats the ratio-1 measurement with other budgets, each on a fresh swapper.

The simulated compute is ``time.sleep`` by default (``--compute busy`` spins instead): on a
2-core machine a spinning "compute" thread competes with the I/O completion threads (io_uring
reaper, CRC32C checks, the swapper's bookkeeping) for the CPU, which a real GPU kernel would
not. Sleeps shorter than 1 ms are carried over to the next tensor; the measured sleep time,
oversleep included, is what counts as ``T_c``. The time the consumer spends inside
``swap_in()`` / ``release()`` (not waiting for data) is reported per access: it is on the
critical path like any other host work of a training loop.

Pinned memory: the swapper has a pinned pool of its own, so the pinned peak is the largest
of the swapper's ``stats().pinned_peak`` (the leases it accounts against its budget, in use or
free), the pool's ``in_use_peak`` (what really existed: a lease given back while a view of it
is alive is freed late, which the swapper's accounting does not see) and the pool's
``locked_peak`` (what was mlock'ed, arena rounding included); each is also reported. The budget
is ``--budget-frac`` (default 0.25) of the total bytes, but at least 3 × the largest tensor.
DeepSpeed 0.19.8's parameter swapper at its defaults locks ``buffer_count × ⌈max(buffer_size,
largest numel)⌉ × 2 B`` = ``5 × ⌈max(1e8, largest)⌉ × 2 B`` (⌈⌉ pads to 512 elements =
1024 B); a tensor larger than ``buffer_size`` makes DeepSpeed refuse to start (issue #3506),
so that case uses the largest numel and says so; "tight" sets ``buffer_size`` to the largest
tensor. ``pinned_peak_vs_deepspeed`` divides by the computed default. Not counted for
DeepSpeed, which favours it: at the default ``max_in_cpu`` = 1e9 it would also pin an fp16
flat CPU buffer of the whole model (≤ 1e9 elements; issue #4221). If DeepSpeed is importable
and its ``async_io`` op is already built (in ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/memascend-torch-ext``; ``--deepspeed-build`` allows the ~9 min JIT build), a
subprocess also constructs, for both slot sizes, DeepSpeed's own ``SwapBufferManager(slot, 5,
bf16, aio_handle)`` and then the parameter swapper's allocation (``torch.empty(5 × slot)`` →
``aio_handle.new_cpu_locked_tensor``, as ``AsyncPartitionedParameterSwapper.__init__`` does),
freeing each before the next, and reports the ``VmLck`` / ``VmRSS`` growth each caused, read
from ``/proc/self/status`` (skipped with ``--quick``: importing DeepSpeed and loading its op
takes ~10 s, more on a cold cache).

Usage: ``bench/swapper.py [--json PATH] [--quick] [--model PRESET] [--layers N] [--passes N]
[--budget-frac F] [--ratios R,...] [--sweep M,...] [--with-embeddings] [--order fwd|fwdbwd]
[--compute sleep|busy] [--dir DIR] [--no-deepspeed] [--deepspeed-build]``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memascend.errors import ConfigError  # noqa: E402
from memascend.shapes import llama_parameter_shapes, load_model_config  # noqa: E402
from memascend.sysinfo import fmt_bytes, proc_status  # noqa: E402
from bench._common import (OneLineParser as _Parser, check_json_path, log,  # noqa: E402
                           machine_info, median as med, write_json)

BF16 = 2
DEFAULT_MODEL, DEFAULT_LAYERS, QUICK_LAYERS = "llama-1b", 8, 2
DEFAULT_PASSES, QUICK_PASSES = 5, 2
DEFAULT_RATIOS, QUICK_RATIOS = (1.0, 0.5, 2.0), (1.0,)
MIN_BUDGET_MULTIPLE = 3           # budget >= this × the largest tensor
STEADY_COMPUTE_PASSES = 2        # measured compute passes per block (after a lead pass)
DEFAULT_SWEEP = (3, 4, 12)        # extra budgets, × the largest tensor (full run only)
MIN_SLEEP = 1e-3                  # shorter simulated compute is carried to the next tensor
GOAL_OVERLAP, GOAL_PINNED_VS_DS = 0.9, 0.25
# DeepSpeed 0.19.8 defaults (see /work/shared/DEEPSPEED_NOTES.md)
DS_BUFFER_COUNT, DS_BUFFER_SIZE = 5, 100_000_000
DS_AIO_ALIGNED_BYTES = 1024       # × intra_op_parallelism (1)
DS_MIN_SWAP_BYTES = 1 << 20       # max(MIN_AIO_BYTES, aio block_size): smaller stay in RAM
DS_MAX_IN_CPU = 1_000_000_000
DEFAULT_EXT_DIR = os.path.expanduser("~/.cache/memascend-torch-ext")
DS_TIMEOUT = 900


# ---------------------------------------------------------------- workload
def model_tensors(model: str, layers: int | None,
                  embeddings: bool = False) -> list[tuple[str, tuple[int, ...]]]:
    """Parameter names and shapes of ``model`` truncated to ``layers`` decoder layers, in
    module order: the decoder layers' tensors only, or (``embeddings``) every parameter."""
    cfg = dict(load_model_config(model))
    if layers is not None:
        cfg["num_hidden_layers"] = layers
    shapes = llama_parameter_shapes(cfg)
    if not embeddings:
        shapes = [(k, s) for k, s in shapes if ".layers." in k]
    return shapes


class Compute:
    """Simulated compute: sleep (or spin) a fixed time per byte, carrying short debts."""

    def __init__(self, mode: str):
        self.mode = mode
        self.owed = 0.0
        self.spent = 0.0

    def run(self, seconds: float) -> None:
        """Owe ``seconds`` more compute; pay it now if the debt is worth a sleep."""
        self.owed += seconds
        if self.owed >= (MIN_SLEEP if self.mode == "sleep" else 0.0) and self.owed > 0:
            self._pay()

    def flush(self) -> None:
        """Pay whatever is still owed (end of a pass)."""
        if self.owed > 0:
            self._pay()

    def _pay(self) -> None:
        t0 = time.perf_counter()
        if self.mode == "sleep":
            time.sleep(self.owed)
        else:
            end = t0 + self.owed
            while time.perf_counter() < end:
                pass
        dt = time.perf_counter() - t0
        self.spent += dt
        self.owed -= dt  # oversleep is credited to the next tensor


COUNTERS = ("accesses", "hits", "reuse_hits", "late", "misses", "wait_seconds", "budget_waits",
            "reads", "bytes_read", "evictions", "wasted_prefetches", "leases_created",
            "leases_reused")


def run_pass(sw: Any, pool: Any, order: list[tuple[str, int]], total: int, kind: str,
             ratio: float, t_io: float, mode: str, verify: Any | None = None) -> dict:
    """One pass over ``order`` ((key, nbytes) pairs); its timings and counter deltas."""
    per_byte = ratio * t_io / total if ratio > 0 else 0.0
    comp = Compute(mode)
    clock = time.perf_counter
    calls = waits = 0.0
    before = sw.stats()
    t0 = clock()
    for key, nbytes in order:
        a = clock()
        h = sw.swap_in(key)
        b = clock()
        v = h.wait()
        c = clock()
        if verify is not None:
            verify(key, v)
        if per_byte:
            comp.run(per_byte * nbytes)
        del v, h  # the view is invalid after release; dropping it first lets its buffer go
        d = clock()
        sw.release(key)
        calls += (b - a) + (clock() - d)
        waits += c - b
    comp.flush()
    wall = clock() - t0
    sw.mark_pass()
    after = sw.stats()
    ps = pool.stats()
    vm = proc_status()
    delta = {c: getattr(after, c) - getattr(before, c) for c in COUNTERS}
    delta["wait_seconds"] = round(delta["wait_seconds"], 6)
    acc = delta["accesses"]
    return {"kind": kind, "ratio": ratio, "wall_s": wall, "compute_s": comp.spent,
            "compute_target_s": per_byte * total, "t_io_ref_s": t_io if ratio else None,
            "hit_rate": (delta["hits"] + delta["reuse_hits"]) / acc if acc else math.nan,
            "consumer_wait_s": waits, "swapper_calls_s": calls, "depth_end": after.depth,
            "pinned_bytes_end": after.pinned_bytes,
            "pool_in_use_end": ps.in_use, "pool_locked_end": ps.locked,
            "vmlck_end": vm.get("VmLck", 0), "vmrss_end": vm.get("VmRSS", 0), **delta}


def measure_budget(args: argparse.Namespace, store: Any, shapes: list[tuple[str, tuple[int, ...]]],
                   order: list[tuple[str, int]], budget: int, ratios: list[float],
                   verify: Any | None, label: str) -> dict[str, Any]:
    """A fresh swapper (and pinned pool) with ``budget`` over ``store``: the learning and
    warm-up passes, then ``args.passes`` repetitions of the block protocol for each ratio."""
    import torch

    from memascend import PinnedPool, TensorSwapper

    total_order = sum(n for _k, n in order)
    pool = PinnedPool()  # the swapper's buffers only: its stats are the swapper's
    sw = TensorSwapper(store, pool=pool, budget_bytes=budget)
    passes: list[dict] = []

    def one(kind: str, ratio: float = 0.0, t_io: float = 0.0, check: bool = False) -> dict:
        p = run_pass(sw, pool, order, total_order, kind, ratio, t_io, args.compute,
                     verify if check else None)
        p["index"] = len(passes)
        passes.append(p)
        extra = (f", compute {p['compute_s']:.3f} s (target {p['compute_target_s']:.3f})"
                 if ratio else "")
        log(f"  [{label}] pass {p['index']:>3} {kind:<12} r={ratio:<4g} wall {p['wall_s']:.3f} s"
            f"{extra}, hit {p['hit_rate']:.2f}, late {p['late']}, miss {p['misses']}, "
            f"depth {p['depth_end']}, leases+{p['leases_created']}")
        return p

    try:
        for k, s in shapes:
            sw.register(k, s, torch.bfloat16)
        one("learn", check=True)
        one("warmup", check=True)
        reps: list[dict] = []
        for rep in range(args.passes):
            for ratio in ratios:
                one("io-lead")
                io = one("io")
                t_io = io["wall_s"]
                one("compute-lead", ratio, t_io)
                cs = [one("compute", ratio, t_io) for _ in range(STEADY_COMPUTE_PASSES)]
                wall = statistics.fmean(c["wall_s"] for c in cs)
                t_c = statistics.fmean(c["compute_s"] for c in cs)
                acc = sum(c["accesses"] for c in cs)
                reps.append({"rep": rep, "ratio": ratio, "io_pass": io["index"],
                             "compute_passes": [c["index"] for c in cs], "t_io_s": t_io,
                             "t_c_s": t_c, "wall_s": wall, "actual_ratio": t_c / t_io,
                             "efficiency": max(t_c, t_io) / wall,
                             "hit_rate": sum(c["hits"] + c["reuse_hits"] for c in cs) / acc})
        sw.wait_idle()
        return {"budget_bytes": budget, "passes": passes, "repetitions": reps,
                "swapper_stats": sw.stats().to_dict(), "pool_stats": pool.stats().to_dict()}
    finally:
        sw.close()
        pool.close()


def stream(args: argparse.Namespace, shapes: list[tuple[str, tuple[int, ...]]], budget: int,
           sweep: list[int], workdir: str) -> dict[str, Any]:
    """Write every tensor once, then measure at ``budget`` (all ratios) and at each ``sweep``
    budget (ratio 1 only)."""
    import torch

    from memascend import PinnedPool, SwapStore

    sizes = [(k, math.prod(s) * BF16) for k, s in shapes]
    total = sum(n for _k, n in sizes)
    largest = max(n for _k, n in sizes)
    order = sizes + sizes[::-1] if args.order == "fwdbwd" else sizes
    out: dict[str, Any] = {"workdir": workdir}

    write_pool = PinnedPool()     # the writer's source and the store's bounce buffers
    store = SwapStore(os.path.join(workdir, "swap.area"), pool=write_pool)
    try:
        out["store"] = {"direct": store.direct, "checksum": store.config.checksum,
                        "engine_backend": getattr(store.engine, "backend", None),
                        "path": store.path}
        log(f"writing {len(sizes)} tensors, {fmt_bytes(total)} ...")
        src = write_pool.lease(largest)
        pattern = src.as_tensor(torch.uint8, (largest,))
        pattern.copy_(torch.randint(0, 256, (largest,), dtype=torch.uint8,
                                    generator=torch.Generator().manual_seed(4)))
        t0 = time.perf_counter()
        handles = [store.write(k, src, dtype="bfloat16", shape=s, nbytes=n)
                   for (k, s), (_k, n) in zip(shapes, sizes)]
        for h in handles:
            h.wait()
        store.sync()
        wt = time.perf_counter() - t0
        out["write"] = {"seconds": wt, "bytes": total, "gb_per_s": total / wt / 1e9}
        probe = 65536
        ref = pattern[:probe].clone()
        del pattern
        src.release()

        def verify(key: str, v: Any) -> None:
            got = v.view(-1).view(torch.uint8)[:probe]
            if not torch.equal(got, ref[:got.numel()]):
                raise RuntimeError(f"data read back for {key!r} differs from what was written")

        log(f"streaming {len(order)} accesses/pass ({args.order}), budget {fmt_bytes(budget)}, "
            f"compute={args.compute} ...")
        out["main"] = measure_budget(args, store, shapes, order, budget, args.ratios, verify,
                                     "main")
        out["sweep"] = []
        for b in sweep:
            log(f"budget sweep: {fmt_bytes(b)} ({b / largest:.1f} × largest tensor), ratio 1 ...")
            m = measure_budget(args, store, shapes, order, b, [1.0], verify,
                               f"{b / largest:.0f}x")
            out["sweep"].append(m)
        out["store_stats"] = store.stats().to_dict()
        out["engine_stats"] = store.engine.stats().to_dict()
    finally:
        store.close()
        write_pool.close()
    return out


# ---------------------------------------------------------------- DeepSpeed
def ds_aligned(numel: int, elem: int = BF16) -> int:
    """``numel`` padded to DeepSpeed's I/O alignment (1024 B / element size elements)."""
    a = DS_AIO_ALIGNED_BYTES // elem
    return -(-numel // a) * a


def deepspeed_computed(numels: list[int]) -> dict[str, Any]:
    """DeepSpeed 0.19.8's parameter-swapper locked bytes for these tensors, from its rules."""
    largest = max(numels)
    slot = ds_aligned(max(DS_BUFFER_SIZE, largest))
    out: dict[str, Any] = {
        "rule": f"parameter swapper (AsyncPartitionedParameterSwapper) pool: buffer_count × "
                f"⌈max(buffer_size, largest numel)⌉ × 2 B = {DS_BUFFER_COUNT} × "
                f"⌈max({DS_BUFFER_SIZE:.0e}, {largest:,})⌉ × 2 B, ⌈⌉ padding to "
                f"{DS_AIO_ALIGNED_BYTES // BF16} elements",
        "buffer_count": DS_BUFFER_COUNT, "buffer_size": DS_BUFFER_SIZE,
        "largest_numel": largest, "slot_numel": slot,
        "default_locked_bytes": DS_BUFFER_COUNT * slot * BF16,
        "tight_slot_numel": ds_aligned(largest),
        "tight_locked_bytes": DS_BUFFER_COUNT * ds_aligned(largest) * BF16,
        "tensors_swapped_by_deepspeed": sum(n * BF16 >= DS_MIN_SWAP_BYTES for n in numels),
        "fp16_flat_cpu_buffer_bytes": min(sum(numels), DS_MAX_IN_CPU) * BF16,
    }
    if largest > DS_BUFFER_SIZE:
        out["note"] = (f"largest tensor has {largest:,} elements > buffer_size "
                       f"{DS_BUFFER_SIZE:,}: DeepSpeed refuses to start at defaults (issue "
                       f"#3506); slots sized to the largest tensor instead")
    return out


DS_CHILD = r"""
import json, os, socket, sys, time
P = json.loads(sys.argv[1])
def status():
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, rest = line.partition(":")
            p = rest.split()
            if k in ("VmLck", "VmRSS", "VmHWM", "VmPin") and len(p) == 2:
                out[k] = int(p[0]) * 1024
    return out
def run(case, numel, count, how, make, free):
    s0 = status(); t0 = time.perf_counter()
    bufs = make()
    dt = time.perf_counter() - t0; s1 = status()
    nbytes = sum(t.numel() * t.element_size() for t in bufs)
    free(bufs)
    s2 = status()
    return {"case": case, "how": how, "num_elems": numel, "count": count,
            "buffer_bytes": nbytes, "seconds": dt, "before": s0, "after": s1, "after_free": s2,
            "vmlck_delta": s1["VmLck"] - s0["VmLck"], "vmrss_delta": s1["VmRSS"] - s0["VmRSS"],
            "vmhwm_delta": s1["VmHWM"] - s0["VmHWM"],
            "vmlck_after_free_delta": s2["VmLck"] - s0["VmLck"]}
real_stdout = sys.stdout
sys.stdout = sys.stderr  # DeepSpeed logs to stdout; keep ours clean
res = {}
try:
    import torch, deepspeed
    from deepspeed.ops.op_builder import AsyncIOBuilder
    res["version"] = deepspeed.__version__
    b = AsyncIOBuilder()
    ext = os.path.join(os.environ["TORCH_EXTENSIONS_DIR"], "async_io")
    built = os.path.isdir(ext) and any(n.endswith(".so") for n in os.listdir(ext))
    if not b.is_compatible(verbose=False):
        res["skipped"] = "DeepSpeed's async_io op is not compatible here (libaio-dev missing?)"
    elif not built and not P["allow_build"]:
        res["skipped"] = ("DeepSpeed's async_io op is not built in " + ext + " (a JIT build "
                          "takes ~9 min on 2 cores; rerun with --deepspeed-build)")
    else:
        t0 = time.perf_counter()
        mod = b.load(verbose=False)
        res["op_load_seconds"] = time.perf_counter() - t0
        s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False,
                                   verbose=False)
        from deepspeed.runtime.swap_tensor.utils import SwapBufferManager
        count = P["count"]
        runs = []
        for label, numel in P["cases"]:
            h = mod.aio_handle(*P["aio"])
            holder = {}
            def make():
                holder["mgr"] = SwapBufferManager(num_elems=numel, count=count,
                                                  dtype=torch.bfloat16, aio_handle=h)
                return holder["mgr"].all_buffers
            def free(_bufs):
                holder["pinned"] = [bool(h.is_pinned(t)) for t in holder["mgr"].all_buffers]
                del _bufs
                holder.pop("mgr")  # its __del__ frees the locked buffers
            r = run(label, numel, count, "SwapBufferManager", make, free)
            r["is_pinned"] = holder["pinned"]
            runs.append(r)
            # The parameter swapper (AsyncPartitionedParameterSwapper.__init__) allocates the
            # same bytes as one tensor: torch.empty(count x slot), then new_cpu_locked_tensor.
            def make_param():
                e = torch.empty(count * numel, dtype=torch.bfloat16)
                return [h.new_cpu_locked_tensor(e.numel(), e)]
            def free_param(bufs):
                holder["pinned"] = [bool(h.is_pinned(t)) for t in bufs]
                for t in bufs:
                    h.free_cpu_locked_tensor(t)
                bufs.clear()
            r = run(label, numel, count, "parameter-swapper path", make_param, free_param)
            r["is_pinned"] = holder["pinned"]
            runs.append(r)
            del h
        res["runs"] = runs
        res["pin_memory_backend"] = os.environ.get("DS_PIN_MEMORY_BACKEND", "(unset)")
except Exception as exc:
    res["failed"] = f"{exc.__class__.__name__}: {exc}"
real_stdout.write("DSRESULT " + json.dumps(res) + "\n")
real_stdout.flush()
"""
DS_AIO_ARGS = (1_048_576, 8, False, True, 1)  # block_size, queue_depth, single_submit,
#                                               overlap_events, intra_op_parallelism


def deepspeed_measured(comp: dict[str, Any], allow_build: bool) -> dict[str, Any]:
    """Construct DeepSpeed's SwapBufferManager (and the parameter swapper's single locked
    tensor) in a subprocess for each slot size; what each locked."""
    try:
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            return {"skipped": "deepspeed not installed"}
    except (ImportError, ValueError):
        return {"skipped": "deepspeed not installed"}
    cases = [("default", comp["slot_numel"])]
    if comp["tight_slot_numel"] != comp["slot_numel"]:
        cases.append(("tight", comp["tight_slot_numel"]))
    params = {"allow_build": allow_build, "cases": cases, "count": DS_BUFFER_COUNT,
              "aio": list(DS_AIO_ARGS)}
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", DEFAULT_EXT_DIR)
    try:
        run = subprocess.run([sys.executable, "-c", DS_CHILD, json.dumps(params)],
                             capture_output=True, text=True, env=env, timeout=DS_TIMEOUT,
                             check=False)
    except subprocess.TimeoutExpired:
        return {"failed": f"DeepSpeed subprocess timed out after {DS_TIMEOUT} s"}
    line = next((ln for ln in run.stdout.splitlines() if ln.startswith("DSRESULT ")), None)
    if line is None:
        tail = (run.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"failed": f"DeepSpeed subprocess exited {run.returncode} without a result "
                          f"(signal {-run.returncode} = mlock failure?): {tail}"
                if run.returncode < 0 else f"DeepSpeed subprocess exited {run.returncode} "
                                           f"without a result: {tail}"}
    res = json.loads(line[len("DSRESULT "):])
    res["method"] = ("subprocess, per slot size: deepspeed.runtime.swap_tensor.utils."
                     "SwapBufferManager(num_elems=slot, count=5, bf16, aio_handle(1 MiB, 8, "
                     "False, True, 1)), then the parameter swapper's own path (torch.empty(5 × "
                     "slot) → aio_handle.new_cpu_locked_tensor); VmLck/VmRSS deltas from "
                     "/proc/self/status around each allocation, each freed before the next")
    res["torch_extensions_dir"] = env["TORCH_EXTENSIONS_DIR"]
    return res


# ---------------------------------------------------------------- reporting


def ratio_rows(m: dict[str, Any]) -> dict[str, Any]:
    """Per-ratio medians over the repetitions of one budget's measurement."""
    reps = m["repetitions"]
    steady = {p["index"]: p for p in m["passes"] if p["kind"] == "compute"}
    out: dict[str, Any] = {}
    for r in sorted({x["ratio"] for x in reps}):
        xs = [x for x in reps if x["ratio"] == r]
        ps = [steady[i] for x in xs for i in x["compute_passes"]]
        acc = sum(p["accesses"] for p in ps)
        out[f"{r:g}"] = {
            "overlap_efficiency": med([x["efficiency"] for x in xs]),
            "efficiency_min": min(x["efficiency"] for x in xs),
            "efficiency_max": max(x["efficiency"] for x in xs),
            "t_io_s": med([x["t_io_s"] for x in xs]), "t_c_s": med([x["t_c_s"] for x in xs]),
            "wall_s": med([x["wall_s"] for x in xs]),
            "actual_ratio": med([x["actual_ratio"] for x in xs]),
            "hit_rate": sum(p["hits"] + p["reuse_hits"] for p in ps) / acc,
            "consumer_wait_s": med([p["consumer_wait_s"] for p in ps]),
            "swapper_calls_ms_per_access": 1e3 * sum(p["swapper_calls_s"] for p in ps) / acc,
            "swapper_calls_s_per_pass": med([p["swapper_calls_s"] for p in ps]),
            "leases_created_per_pass": med([p["leases_created"] for p in ps]),
            "bytes_read_per_pass": med([p["bytes_read"] for p in ps]),
            "repetitions": len(xs)}
    return out


def pinned_peak(m: dict[str, Any]) -> int:
    """The pinned peak of one budget's measurement: the largest of what the swapper accounted
    (``pinned_peak``) and what its dedicated pool really held (``in_use_peak``) and locked
    (``locked_peak``, arena rounding included)."""
    return max(m["swapper_stats"]["pinned_peak"], m["pool_stats"]["in_use_peak"],
               m["pool_stats"]["locked_peak"])


def ds_measured_default(dsm: dict[str, Any]) -> int | None:
    """VmLck growth of DeepSpeed's SwapBufferManager at the default slot size, if measured."""
    return next((r["vmlck_delta"] for r in dsm.get("runs", [])
                 if r["case"] == "default" and r["how"] == "SwapBufferManager"), None)


def summarize(res: dict[str, Any], budget: int, largest: int,
              ds: dict[str, Any], dsm: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers, the budget sweep, and goal checks."""
    main = res["main"]
    st, pool = main["swapper_stats"], main["pool_stats"]
    by_ratio = ratio_rows(main)
    ds_bytes = ds["default_locked_bytes"]
    ds_meas = ds_measured_default(dsm)
    peak = pinned_peak(main)
    eff = by_ratio["1"]["overlap_efficiency"]
    sweep = []
    for m in [main, *res["sweep"]]:
        row = ratio_rows(m)["1"]
        sweep.append({"budget_bytes": m["budget_bytes"],
                      "budget_vs_largest": m["budget_bytes"] / largest,
                      "pinned_peak_bytes": pinned_peak(m),
                      "swapper_pinned_peak_bytes": m["swapper_stats"]["pinned_peak"],
                      "pool_in_use_peak_bytes": m["pool_stats"]["in_use_peak"],
                      "pinned_peak_vs_deepspeed": pinned_peak(m) / ds_bytes,
                      **{k: row[k] for k in ("overlap_efficiency", "efficiency_min",
                                             "efficiency_max", "hit_rate", "t_io_s",
                                             "t_c_s", "wall_s", "consumer_wait_s",
                                             "swapper_calls_ms_per_access",
                                             "swapper_calls_s_per_pass",
                                             "leases_created_per_pass",
                                             "bytes_read_per_pass")}})
    sweep.sort(key=lambda r: r["budget_bytes"])
    s = {"overlap_efficiency": eff,
         "pinned_peak_vs_deepspeed": peak / ds_bytes,
         "hit_rate_steady": by_ratio["1"]["hit_rate"],
         "pinned_peak_bytes": peak, "budget_bytes": budget,
         "pinned_peak_vs_budget": peak / budget,
         "swapper_pinned_peak_bytes": st["pinned_peak"],
         "pool_in_use_peak_bytes": pool["in_use_peak"],
         "pool_locked_peak_bytes": pool["locked_peak"],
         "deepspeed_default_locked_bytes": ds_bytes,
         "deepspeed_default_locked_bytes_measured": ds_meas,
         "pinned_peak_vs_deepspeed_measured": peak / ds_meas if ds_meas else None,
         "deepspeed_tight_locked_bytes": ds["tight_locked_bytes"],
         "pinned_peak_vs_deepspeed_tight": peak / ds["tight_locked_bytes"],
         "swapper_calls_ms_per_access": by_ratio["1"]["swapper_calls_ms_per_access"],
         "by_ratio": by_ratio, "budget_sweep": sweep,
         "goals": {"overlap_efficiency": GOAL_OVERLAP,
                   "pinned_peak_vs_deepspeed": GOAL_PINNED_VS_DS},
         "overlap_goal_met": bool(eff >= GOAL_OVERLAP),
         "pinned_goal_met": bool(peak / ds_bytes <= GOAL_PINNED_VS_DS)}
    notes = []
    for m in [main, *res["sweep"]]:
        p = m["pool_stats"]["in_use_peak"]
        if p > m["budget_bytes"]:
            notes.append(f"budget {fmt_bytes(m['budget_bytes'])}: the swapper's pinned pool "
                         f"held {fmt_bytes(p)} at its peak (in_use_peak), more than the budget; "
                         f"the swapper's own accounting (pinned_peak "
                         f"{fmt_bytes(m['swapper_stats']['pinned_peak'])}) does not see it: a "
                         f"lease it gave back to the pool was still referenced by a tensor "
                         f"view, so its memory was freed only after a new lease was mapped. "
                         f"pinned_peak_bytes above uses the pool's figure")
    s["notes"] = notes
    return s


def print_report(args: argparse.Namespace, meta: dict[str, Any], res: dict[str, Any],
                 s: dict[str, Any], ds: dict[str, Any], dsm: dict[str, Any]) -> None:
    """The human-readable report on stdout."""
    mib = 1 << 20
    main = res["main"]
    print(f"TensorSwapper overlap: {meta['model']}, {meta['layers']} layers"
          f"{' + embeddings' if meta['with_embeddings'] else ' (decoder layers only)'}, "
          f"{meta['tensors']} tensors, {fmt_bytes(meta['total_bytes'])} bf16 (largest "
          f"{fmt_bytes(meta['largest_bytes'])}); order {args.order}; compute={args.compute}; "
          f"budget {fmt_bytes(s['budget_bytes'])}; {args.passes} repetitions")
    head = (f"{'ratio':>5} {'T_io s':>7} {'T_c s':>7} {'wall s':>7} {'eff':>6} {'min':>6} "
            f"{'max':>6} {'hit':>5} {'wait s':>7} {'calls ms/acc':>12}")
    print(head)
    print("-" * len(head))
    for r, b in s["by_ratio"].items():
        print(f"{r:>5} {b['t_io_s']:7.3f} {b['t_c_s']:7.3f} {b['wall_s']:7.3f} "
              f"{b['overlap_efficiency']:6.3f} {b['efficiency_min']:6.3f} "
              f"{b['efficiency_max']:6.3f} {b['hit_rate']:5.2f} {b['consumer_wait_s']:7.3f} "
              f"{b['swapper_calls_ms_per_access']:12.2f}")
    if len(s["budget_sweep"]) > 1:
        print("\nBudget sweep at compute == I/O (ratio 1)")
        head = (f"{'budget MiB':>10} {'x largest':>9} {'peak MiB':>8} {'vs DS':>6} "
                f"{'eff':>6} {'min':>6} {'max':>6} {'hit':>5} {'calls ms/acc':>12} "
                f"{'leases/pass':>11}")
        print(head)
        print("-" * len(head))
        for r in s["budget_sweep"]:
            print(f"{r['budget_bytes'] / mib:10.1f} {r['budget_vs_largest']:9.1f} "
                  f"{r['pinned_peak_bytes'] / mib:8.1f} {r['pinned_peak_vs_deepspeed']:6.3f} "
                  f"{r['overlap_efficiency']:6.3f} {r['efficiency_min']:6.3f} "
                  f"{r['efficiency_max']:6.3f} {r['hit_rate']:5.2f} "
                  f"{r['swapper_calls_ms_per_access']:12.2f} "
                  f"{r['leases_created_per_pass']:11.0f}")
    print()
    st, pool = main["swapper_stats"], main["pool_stats"]
    print("Pinned memory (MiB)")
    rows = [("swapper budget", s["budget_bytes"]),
            ("swapper pinned_peak (its accounting)", st["pinned_peak"]),
            ("pool in_use_peak", pool["in_use_peak"]),
            ("pool locked_peak", pool["locked_peak"]),
            ("pinned peak (largest of the three)", s["pinned_peak_bytes"]),
            ("deepspeed default (computed)", ds["default_locked_bytes"]),
            ("deepspeed tight (computed)", ds["tight_locked_bytes"])]
    for run in dsm.get("runs", []):
        how = "SBM" if run["how"] == "SwapBufferManager" else "param path"
        rows.append((f"deepspeed {run['case']} {how}: VmLck", run["vmlck_delta"]))
        rows.append((f"deepspeed {run['case']} {how}: VmRSS", run["vmrss_delta"]))
    for name, v in rows:
        print(f"{name:<40} {v / mib:10.1f}")
    if "runs" not in dsm:
        print(f"deepspeed measured: {dsm.get('skipped') or dsm.get('failed')}")
    print(f"deepspeed rule: {ds['rule']}; tight = buffer_size set to the largest tensor")
    print(f"not counted for DeepSpeed (so the comparison favours it): with max_in_cpu = "
          f"{DS_MAX_IN_CPU:.0e} it would also pin a fp16 flat CPU buffer of "
          f"{ds['fp16_flat_cpu_buffer_bytes'] / mib:.1f} MiB for these tensors (issue #4221); "
          f"it swaps only the {ds['tensors_swapped_by_deepspeed']} tensors of >= 1 MiB")
    if "note" in ds:
        print(f"note: {ds['note']}")
    print(f"swapper (main budget, all passes): accesses {st['accesses']}, hits {st['hits']}, "
          f"reuse {st['reuse_hits']}, late {st['late']}, misses {st['misses']}, wait "
          f"{st['wait_seconds']:.2f} s, evictions {st['evictions']}, wasted "
          f"{st['wasted_prefetches']}, leases created {st['leases_created']} / reused "
          f"{st['leases_reused']}, depth {st['depth']}")
    for n in s["notes"]:
        print(f"note: {n}")
    print()
    ok_o = "met" if s["overlap_goal_met"] else "MISSED"
    ok_p = "met" if s["pinned_goal_met"] else "MISSED"
    print(f"summary: overlap_efficiency {s['overlap_efficiency']:.3f} (goal >= {GOAL_OVERLAP}:"
          f" {ok_o}), pinned_peak_vs_deepspeed {s['pinned_peak_vs_deepspeed']:.3f} (goal <= "
          f"{GOAL_PINNED_VS_DS}: {ok_p}), hit_rate_steady {s['hit_rate_steady']:.3f}, "
          f"pinned_peak {fmt_bytes(s['pinned_peak_bytes'])} of budget "
          f"{fmt_bytes(s['budget_bytes'])}")
    if not s["pinned_goal_met"]:
        floor = MIN_BUDGET_MULTIPLE * meta["largest_bytes"]
        why = (f"the budget is at least {MIN_BUDGET_MULTIPLE} × the largest tensor "
               f"({fmt_bytes(meta['largest_bytes'])}) = {fmt_bytes(floor)}, "
               f"{floor / ds['default_locked_bytes']:.2f} of DeepSpeed's pool"
               if s["budget_bytes"] <= floor + 4096 else
               f"the budget ({args.budget_frac:g} of {fmt_bytes(meta['total_bytes'])}) is "
               f"{s['budget_bytes'] / ds['default_locked_bytes']:.2f} of DeepSpeed's pool, "
               f"which does not grow with the model")
        print(f"pinned goal missed: {why}")
    if not s["overlap_goal_met"]:
        b = s["by_ratio"]["1"]
        calls = b["swapper_calls_s_per_pass"]
        print(f"overlap goal missed: at ratio 1 a pass took {b['wall_s']:.3f} s for "
              f"T_c {b['t_c_s']:.3f} s; the consumer waited {b['consumer_wait_s']:.3f} s for "
              f"data and spent {calls:.3f} s inside swap_in()/release() "
              f"({b['swapper_calls_ms_per_access']:.2f} ms per access: submitting reads, "
              f"evicting, mapping new pinned leases ({b['leases_created_per_pass']:.0f} per "
              f"pass), bookkeeping, on the consumer's thread), which no prefetching can "
              f"hide: T_c / (T_c + that) = {b['t_c_s'] / (b['t_c_s'] + calls):.3f}")


# ---------------------------------------------------------------- main
def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options; exits 2 with a one-line message on bad arguments."""
    p = _Parser(prog="swapper.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write all numbers as JSON to PATH")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_LAYERS} layers, {QUICK_PASSES} repetitions, ratio 1 only "
                        f"(~10 s)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"preset or config path "
                   f"(default {DEFAULT_MODEL})")
    p.add_argument("--layers", type=int, help=f"decoder layers to keep (default "
                   f"{DEFAULT_LAYERS}; --quick {QUICK_LAYERS}; 0 = all of the model's)")
    p.add_argument("--passes", type=int, help=f"measured repetitions per ratio (default "
                   f"{DEFAULT_PASSES}; --quick {QUICK_PASSES})")
    p.add_argument("--budget-frac", type=float, default=0.25,
                   help=f"swapper budget as a fraction of the total bytes (default 0.25; at "
                        f"least {MIN_BUDGET_MULTIPLE} × the largest tensor)")
    p.add_argument("--ratios", help="compute/I-O ratios, comma-separated (default "
                   f"{','.join(f'{r:g}' for r in DEFAULT_RATIOS)}; --quick 1)")
    p.add_argument("--sweep", metavar="M,M,...",
                   help=f"extra budgets at ratio 1, as multiples of the largest tensor "
                        f"(default {','.join(map(str, DEFAULT_SWEEP))}; --quick none; '' none)")
    p.add_argument("--with-embeddings", action="store_true",
                   help="also stream embed_tokens, the final norm and lm_head (default: the "
                        "decoder layers' tensors only)")
    p.add_argument("--order", choices=("fwd", "fwdbwd"), default="fwd",
                   help="access order per pass (default fwd: module order)")
    p.add_argument("--compute", choices=("sleep", "busy"), default="sleep",
                   help="simulated compute: time.sleep (default) or a busy wait")
    p.add_argument("--dir", default=tempfile.gettempdir(),
                   help="where the temporary swap directory goes (default: the temp dir)")
    p.add_argument("--no-deepspeed", action="store_true",
                   help="do not measure DeepSpeed's SwapBufferManager")
    p.add_argument("--deepspeed-build", action="store_true",
                   help="allow JIT-building DeepSpeed's async_io op (~9 min) if missing")
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = QUICK_LAYERS if args.quick else DEFAULT_LAYERS
    if args.layers < 0:
        p.error(f"--layers must be >= 0, got {args.layers}")
    if args.passes is None:
        args.passes = QUICK_PASSES if args.quick else DEFAULT_PASSES
    if args.passes < 1:
        p.error(f"--passes must be >= 1, got {args.passes}")
    if not 0 < args.budget_frac <= 1 or math.isnan(args.budget_frac):
        p.error(f"--budget-frac must be in (0, 1], got {args.budget_frac}")
    if args.ratios is None:
        args.ratios = list(QUICK_RATIOS if args.quick else DEFAULT_RATIOS)
    else:
        try:
            args.ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
        except ValueError:
            p.error(f"--ratios: not a comma-separated list of numbers: {args.ratios!r}")
        if not args.ratios or any(not r > 0 or math.isinf(r) for r in args.ratios):
            p.error(f"--ratios: need positive finite numbers, got {args.ratios!r}")
        if 1.0 not in args.ratios:
            p.error("--ratios must include 1 (the headline: compute == I/O)")
    try:
        cfg = load_model_config(args.model)
        if args.layers > cfg.get("num_hidden_layers", 0):
            p.error(f"--layers {args.layers}: {args.model} has only "
                    f"{cfg.get('num_hidden_layers')} layers")
        if args.layers == 0:
            args.layers = cfg.get("num_hidden_layers")
        model_tensors(args.model, args.layers, args.with_embeddings)
    except ConfigError as exc:
        p.error(f"--model: {exc}")
    if args.sweep is None:
        args.sweep = [] if args.quick else list(DEFAULT_SWEEP)
    else:
        try:
            args.sweep = [float(x) for x in args.sweep.split(",") if x.strip()]
        except ValueError:
            p.error(f"--sweep: not a comma-separated list of numbers: {args.sweep!r}")
        if any(not 1 <= m < 1e6 for m in args.sweep):
            p.error(f"--sweep: multiples must be >= 1, got {args.sweep!r}")
    if not os.path.isdir(args.dir):
        p.error(f"--dir: {args.dir!r} is not a directory")
    check_json_path(p, args.json)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success, 1 when a measurement could not be made."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    shapes = model_tensors(args.model, args.layers, args.with_embeddings)
    numels = [math.prod(s) for _k, s in shapes]
    total = sum(numels) * BF16
    largest = max(numels) * BF16
    budget = max(int(args.budget_frac * total), MIN_BUDGET_MULTIPLE * largest)
    budget = -(-budget // 4096) * 4096
    sweep = sorted({-(-int(m * largest) // 4096) * 4096 for m in args.sweep} - {budget})
    meta = {"model": args.model, "layers": args.layers, "with_embeddings": args.with_embeddings,
            "tensors": len(shapes),
            "total_bytes": total, "largest_bytes": largest, "dtype": "bfloat16",
            "order": args.order, "compute": args.compute, "ratios": args.ratios,
            "passes": args.passes, "budget_frac": args.budget_frac,
            "sweep_multiples": args.sweep, "steady_compute_passes": STEADY_COMPUTE_PASSES,
            "budget_rule": f"max(budget_frac × total, {MIN_BUDGET_MULTIPLE} × largest), "
                           f"rounded up to 4096"}
    need = total + (256 << 20) + (1 << 30)
    free = shutil.disk_usage(args.dir).free
    if free < need:
        print(f"swapper.py: error: {args.dir} has {fmt_bytes(free)} free, need "
              f"{fmt_bytes(need)} for {fmt_bytes(total)} of tensors plus margin",
              file=sys.stderr)
        return 1

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks: the swap file goes

    signal.signal(signal.SIGTERM, on_term)
    workdir = tempfile.mkdtemp(prefix="memascend-bench-swapper-", dir=args.dir)
    log(f"{args.model}, {args.layers} layers: {len(shapes)} tensors, {fmt_bytes(total)}; "
        f"swap dir {workdir} ({fmt_bytes(free)} free)")
    try:
        res = stream(args, shapes, budget, sweep, workdir)
    except (RuntimeError, OSError, MemoryError) as exc:
        print(f"swapper.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if os.path.exists(workdir):
            log(f"WARNING: could not remove {workdir}")
    ds = deepspeed_computed(numels)
    if args.no_deepspeed:
        dsm: dict[str, Any] = {"skipped": "--no-deepspeed"}
    elif args.quick:
        dsm = {"skipped": "--quick (importing DeepSpeed and loading its op takes ~10 s, more "
                          "on a cold cache); run without --quick to measure it"}
    else:
        log("measuring DeepSpeed's SwapBufferManager (subprocess) ...")
        dsm = deepspeed_measured(ds, args.deepspeed_build)
    s = summarize(res, budget, largest, ds, dsm)
    print_report(args, meta, res, s, ds, dsm)
    if args.json:
        doc = {"benchmark": "swapper", "command": shlex.join([sys.executable, *sys.argv]),
               "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "machine": machine_info(args.dir), "quick": args.quick, "config": meta,
               "results": res, "deepspeed_computed": ds, "deepspeed_measured": dsm,
               "summary": s}
        write_json(args.json, doc, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
