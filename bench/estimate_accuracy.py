"""Accuracy of ``memascend profile estimate``: estimated vs measured peak RSS of real runs.

What it measures: for LLaMA models of two sizes (``configs/models/llama-34m``, 34 M parameters,
and ``llama-134m``, 134 M; ``--quick``: the 34 M one only, two steps), the peak resident memory
(RSS) that the footprint model of :mod:`memascend.profile.estimate` predicts, against what a
real training run reaches, for

* **memascend** (the plain-PyTorch path, ``offload_model``): fp32, parameter budget 4 x the
  largest tensor, optimizer budget 8 x; glibc's mmap threshold fixed at 128 KiB as docs/offload.md
  recommends (the estimate's stated assumption) — and, as a separate row on the first model
  that is not part of the summary, with glibc's default malloc (``memascend-default-malloc``);
* **stock DeepSpeed** 0.19.8 ZeRO-3 with parameters and optimizer state on NVMe, bf16, once with
  DeepSpeed's defaults (``deepspeed``) and once with a memory-lean config (``deepspeed-tuned``:
  ``max_in_cpu`` 0, ``buffer_size`` = the largest parameter, ``sub_group_size`` = the largest
  parameter, so parameters really live on NVMe and the partitioned reserve exists), both with
  glibc's default malloc as users run it; a diagnostic row on the first model (not in the
  summary) repeats the tuned config with ``MALLOC_MMAP_THRESHOLD_=131072``, estimated with
  that threshold (``mmap_threshold``: the heap model's other setting). CPU-only
  machine: the CPU accelerator, gloo, world size 1, ``stage3_max_reuse_distance`` 0, the dtype
  in the config (not passed to ``zero.Init``). DeepSpeed's ``async_io`` op must already be
  built in ``$TORCH_EXTENSIONS_DIR`` (default ``/root/.cache/memascend-torch-ext``): a cold
  build takes ~9 minutes, so the runs are skipped with the reason when it is missing
  (``--deepspeed-build`` allows the build).

* **memascend's DeepSpeed drop-in** (``memascend-deepspeed``, ``memascend-deepspeed-tuned``):
  the same two configs with ``memascend.integrations.deepspeed.enable()`` before ``zero.Init``
  (needs no ``async_io`` build; estimated with the drop-in rules).

How: every training run is a child process, started under ``memascend profile run --json``
(the sampler this issue adds), that builds a ``transformers.LlamaForCausalLM`` (random
weights, no download), trains ``--steps`` steps of batch 1 x ``--seq`` tokens (ids 0-255) and
writes its own numbers to a file. *Measured peak* = the profiler's ``peak_rss_bytes`` (the
largest of the tree's sampled memory — PSS summed when DeepSpeed's helper processes are alive,
so pages a forked helper shares are not counted twice — and the process's own ``VmHWM``,
which is exact); the child's ``VmHWM`` read at its end is recorded next to it. The Python + torch + transformers (+
DeepSpeed) runtime that every training process starts with is measured the same way, by
children that only import those modules (and initialize DeepSpeed's gloo process group), and
passed to the estimate as ``runtime_bytes``: it is the one input taken from this machine
instead of the documented constants. Everything else in the estimate is the sizing rules.
Error = (estimate - measured) / measured; the summary's ``max_abs_error`` is the largest
|error| over the primary rows (memascend with the fixed mmap threshold, and both DeepSpeed
configs, stock and drop-in); ``max_abs_error_all`` includes the default-malloc row. Goal: <= 0.10.

Also recorded per run (not in the goal): the estimated vs measured locked memory (``VmLck``
at the end) and SSD bytes read and written by the last step (memascend: its swappers'
counters; DeepSpeed: ``/proc/self/io``).

Swap folders are fresh ``memascend-est-*`` directories under ``--swap-dir`` (default
/var/tmp), removed at the end, also on error or Ctrl-C.

Usage: ``bench/estimate_accuracy.py [--json PATH] [--quick] [--models 34m,134m] [--steps N]
[--seq N] [--swap-dir DIR] [--interval MS] [--no-deepspeed] [--deepspeed-build]``.
The training children are ``--_child KIND --spec FILE`` (KIND: ``runtime-memascend``,
``runtime-deepspeed``, ``memascend``, ``deepspeed``, ``memascend-deepspeed``); the spec is a JSON object with
``model`` (config dict), ``batch``, ``seq``, ``steps``, ``swap_dir``, ``out`` (result file),
and ``budget`` / ``optimizer_budget`` / ``fix_malloc`` (memascend) or ``ds_config``
(DeepSpeed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import check_json_path, cpu_model, write_json  # noqa: E402

PROG = "estimate_accuracy"
DEFAULT_EXT_DIR = "/root/.cache/memascend-torch-ext"
MODELS = {"34m": "llama-34m", "134m": "llama-134m"}
MIB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Children (run under `memascend profile run`)
# ---------------------------------------------------------------------------------------------

def _status() -> dict[str, int]:
    from memascend.sysinfo import proc_status

    return proc_status()


def _proc_io() -> tuple[int, int]:
    try:
        with open("/proc/self/io", encoding="ascii") as f:
            vals = dict(line.split(":", 1) for line in f if ":" in line)
        return int(vals["read_bytes"]), int(vals["write_bytes"])
    except (OSError, KeyError, ValueError):
        return 0, 0


def _ids(gen: Any, spec: dict[str, Any]) -> Any:
    import torch

    return torch.randint(0, 256, (spec["batch"], spec["seq"]), generator=gen)


def child_runtime(spec: dict[str, Any], deepspeed: bool) -> dict[str, Any]:
    """Import what a training child imports (and set up what it sets up before the model)."""
    import torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401

    import memascend  # noqa: F401

    if spec.get("fix_malloc"):
        from memascend.heap import PLAIN_MMAP_THRESHOLD, set_mmap_threshold

        set_mmap_threshold(PLAIN_MMAP_THRESHOLD)
    if deepspeed:
        _ds_env(spec)
        import deepspeed as ds

        ds.init_distributed(dist_backend="gloo")
    st = _status()
    return {"rss_bytes": st.get("VmRSS", 0), "hwm_bytes": st.get("VmHWM", 0)}


def child_memascend(spec: dict[str, Any]) -> dict[str, Any]:
    """Train with memascend's plain path (offload_model), fp32."""
    import torch
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401

    import memascend
    from memascend.heap import PLAIN_MMAP_THRESHOLD, set_mmap_threshold

    if spec.get("fix_malloc"):
        set_mmap_threshold(PLAIN_MMAP_THRESHOLD)
    transformers.logging.set_verbosity_error()
    rss_runtime = _status().get("VmRSS", 0)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**spec["model"], attn_implementation="sdpa")
    with memascend.meta_parameters():
        model = transformers.LlamaForCausalLM(cfg)
    model.train()
    om = memascend.offload_model(model, spec["swap_dir"], budget=spec["budget"],
                                 optimizer_budget=spec["optimizer_budget"],
                                 compute_dtype=torch.float32, init=model._init_weights)
    gen = torch.Generator().manual_seed(0)
    steps = []
    try:
        for i in range(spec["steps"]):
            ps0, os0 = om.params_sw.stats(), om.optim_sw.stats()
            t0 = time.perf_counter()
            ids = _ids(gen, spec)
            loss = model(input_ids=ids, labels=ids).loss
            om.backward(loss)
            om.step()
            ps, os_ = om.params_sw.stats(), om.optim_sw.stats()
            steps.append({"step": i + 1, "seconds": time.perf_counter() - t0,
                          "loss": float(loss.detach()),
                          "bytes_read": ps.bytes_read - ps0.bytes_read + os_.bytes_read - os0.bytes_read,
                          "bytes_written": ps.bytes_written - ps0.bytes_written
                          + os_.bytes_written - os0.bytes_written,
                          "vm_hwm_bytes": _status().get("VmHWM", 0)})
        pool = om.pool.stats()
        pinned = {"parameters": om.params_sw.stats().pinned_peak,
                  "optimizer": om.optim_sw.stats().pinned_peak}
    finally:
        om.close()
    st = _status()
    return {"rss_runtime_bytes": rss_runtime, "steps": steps, "peak_rss_bytes": st.get("VmHWM", 0),
            "pool_in_use_peak_bytes": pool.in_use_peak, "pool_locked_peak_bytes": pool.locked_peak,
            "swapper_pinned_peak_bytes": pinned, "lock_failures": pool.lock_failures}


def _ds_env(spec: dict[str, Any]) -> None:
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", DEFAULT_EXT_DIR)
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(spec.get("port", 29533))),
                 ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                 ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)


def child_deepspeed(spec: dict[str, Any], drop_in: bool = False) -> dict[str, Any]:
    """Train with DeepSpeed ZeRO-3, parameters and optimizer on NVMe: its own swappers, or
    memascend's (``drop_in``: ``memascend.integrations.deepspeed.enable()`` first)."""
    _ds_env(spec)
    import torch
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401  (before zero.Init)

    import memascend  # noqa: F401  (the runtime child imports it too: same baseline)

    transformers.logging.set_verbosity_error()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    if drop_in:
        import memascend.integrations.deepspeed as ma_ds

        ma_ds.enable()
    rss_runtime = _status().get("VmRSS", 0)
    ds_config = spec["ds_config"]
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**spec["model"], attn_implementation="sdpa")
    with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device="nvme",
                             pin_memory=True):
        model = transformers.LlamaForCausalLM(cfg)
    model.train()
    engine, _opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                              config=ds_config)
    phases = {"after_initialize_rss_bytes": _status().get("VmRSS", 0)}
    gen = torch.Generator().manual_seed(0)
    steps = []
    for i in range(spec["steps"]):
        io0 = _proc_io()
        t0 = time.perf_counter()
        ids = _ids(gen, spec)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        io1 = _proc_io()
        steps.append({"step": i + 1, "seconds": time.perf_counter() - t0,
                      "loss": float(loss.detach()), "bytes_read": io1[0] - io0[0],
                      "bytes_written": io1[1] - io0[1],
                      "vm_hwm_bytes": _status().get("VmHWM", 0)})
    st = _status()
    out = {"rss_runtime_bytes": rss_runtime, "steps": steps, "peak_rss_bytes": st.get("VmHWM", 0),
           "vm_lck_end_bytes": st.get("VmLck", 0), **phases, "deepspeed": deepspeed.__version__}
    if drop_in:
        pool = (ma_ds.stats().get("pool") or {})
        out["pool_in_use_peak_bytes"] = pool.get("in_use_peak")
        out["pool_locked_peak_bytes"] = pool.get("locked_peak")
    return out


def child_main(kind: str, spec_path: str) -> int:
    """Entry point of a child: run, write the result JSON to ``spec['out']``."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        if kind == "runtime-memascend":
            result = child_runtime(spec, deepspeed=False)
        elif kind == "runtime-deepspeed":
            result = child_runtime(spec, deepspeed=True)
        elif kind == "memascend":
            result = child_memascend(spec)
        else:
            result = child_deepspeed(spec, drop_in=kind == "memascend-deepspeed")
    except Exception as exc:  # reported by the parent, with the child's stderr
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
    with open(spec["out"], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0 if "error" not in result else 1


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_child(kind: str, spec: dict[str, Any], workdir: str, interval_ms: float,
              timeout: float) -> dict[str, Any]:
    """Run one child under ``memascend profile run --json``; its result plus the profile."""
    spec = dict(spec, out=os.path.join(workdir, f"{kind}-{time.monotonic_ns()}.json"))
    spec_path = spec["out"] + ".spec"
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    cmd = [sys.executable, "-m", "memascend.cli", "profile", "run", "--json", "--interval",
           str(interval_ms), "--", sys.executable, str(Path(__file__).resolve()), "--_child",
           kind, "--spec", spec_path]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(spec.get("env", {}))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    try:
        profile = json.loads(proc.stdout[proc.stdout.index("{"):])
    except ValueError:
        profile = None
    try:
        with open(spec["out"], encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"error": f"child exited {proc.returncode} without a result: {tail[:300]}"}
    if "error" in result:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip()][-3:]
        result["stderr_tail"] = tail
        return result
    result["profile"] = profile
    return result


def deepspeed_unavailable(allow_build: bool) -> Optional[str]:
    """Why stock DeepSpeed cannot be measured here, or None."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed (pip install 'memascend[deepspeed]')"
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", DEFAULT_EXT_DIR)
    if not allow_build and not any(Path(ext).glob("**/async_io*.so")):
        return (f"DeepSpeed's async_io op is not built in {ext} (a ~9 min JIT build; "
                "--deepspeed-build allows it)")
    return None


def ds_configs(model: dict[str, Any], numels: list[int]) -> dict[str, dict[str, Any]]:
    """The two DeepSpeed configs: defaults, and memory-lean (see the module docstring)."""
    largest = max(numels)
    base = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
            "bf16": {"enabled": True},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}}}
    default = dict(base, zero_optimization={
        "stage": 3, "stage3_max_reuse_distance": 0,
        "offload_param": {"device": "nvme", "nvme_path": None},
        "offload_optimizer": {"device": "nvme", "nvme_path": None}})
    tuned = dict(base, zero_optimization={
        "stage": 3, "stage3_max_reuse_distance": 0, "sub_group_size": largest,
        "offload_param": {"device": "nvme", "nvme_path": None, "buffer_size": largest,
                          "max_in_cpu": 0},
        "offload_optimizer": {"device": "nvme", "nvme_path": None}})
    return {"deepspeed": default, "deepspeed-tuned": tuned}


def _with_path(cfg: dict[str, Any], path: str) -> dict[str, Any]:
    cfg = json.loads(json.dumps(cfg))
    for key in ("offload_param", "offload_optimizer"):
        cfg["zero_optimization"][key]["nvme_path"] = path
    return cfg


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--json", default=None, metavar="PATH", help="write the results as JSON")
    p.add_argument("--quick", action="store_true", help="the 34 M model only, two steps")
    p.add_argument("--models", default=None, help="comma-separated: 34m,134m (default both)")
    p.add_argument("--steps", type=int, default=None, help="training steps per run (3)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (64)")
    p.add_argument("--swap-dir", default="/var/tmp", help="parent of the swap folders")
    p.add_argument("--interval", type=float, default=50.0, help="sampling interval, ms (50)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per child (900)")
    p.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed runs")
    p.add_argument("--deepspeed-build", action="store_true",
                   help="allow DeepSpeed's ~9 min JIT build of async_io")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._child:
        return child_main(args._child, args.spec)
    check_json_path(p, args.json)
    if not os.path.isdir(args.swap_dir):
        p.error(f"--swap-dir {args.swap_dir!r} does not exist")

    from memascend import sizing as sz
    from memascend.profile import Workload, estimate_deepspeed, estimate_offload
    from memascend.shapes import llama_parameter_shapes, load_model_config

    names = ["34m"] if args.quick else (args.models.split(",") if args.models else list(MODELS))
    for n in names:
        if n not in MODELS:
            p.error(f"--models: unknown model {n!r} (known: {', '.join(MODELS)})")
    steps = args.steps or (2 if args.quick else 3)
    ds_skip = "--no-deepspeed" if args.no_deepspeed else deepspeed_unavailable(args.deepspeed_build)
    drop_in_skip = "--no-deepspeed" if args.no_deepspeed else deepspeed_unavailable(True)
    workdir = tempfile.mkdtemp(prefix="memascend-est-", dir=args.swap_dir)
    t_start = time.monotonic()
    rows: list[dict[str, Any]] = []
    runtimes: dict[str, Any] = {}
    try:
        common = {"batch": 1, "seq": args.seq, "steps": steps, "swap_dir": workdir}
        for kind, fix in (("runtime-memascend", True), ("runtime-memascend", False)):
            r = run_child(kind, dict(common, fix_malloc=fix), workdir, args.interval, args.timeout)
            runtimes[f"memascend{'' if fix else '-default-malloc'}"] = r
        if not (ds_skip and drop_in_skip):
            runtimes["deepspeed"] = run_child("runtime-deepspeed", dict(common, port=_free_port()),
                                              workdir, args.interval, args.timeout)
        for rt_name, r in runtimes.items():
            if "error" in r:
                print(f"{PROG}: runtime child {rt_name} failed: {r['error']}", file=sys.stderr)
                return 1
        for name in names:
            model = load_model_config(MODELS[name])
            numels = [math.prod(s) for _n, s in llama_parameter_shapes(model)]
            largest = max(numels)
            budget, obudget = 4 * sz.round_up(largest * 4), 8 * sz.round_up(largest * 4)
            diagnostics = name == names[0]  # diagnostic rows on the first (smallest) model
            plan: list[tuple[str, str, dict[str, Any], bool]] = [
                ("memascend", "memascend", {"fix_malloc": True}, True)]
            if diagnostics:
                plan.append(("memascend-default-malloc", "memascend", {"fix_malloc": False},
                             False))
            if not ds_skip:
                for cname, cfg in ds_configs(model, numels).items():
                    plan.append((cname, "deepspeed", {"ds_config": cfg}, True))
            if not drop_in_skip:
                for cname, cfg in ds_configs(model, numels).items():
                    plan.append(("memascend-" + cname, "memascend-deepspeed",
                                 {"ds_config": cfg}, True))
            if not ds_skip and diagnostics:
                # Diagnostic: the same with glibc's mmap threshold fixed, to show how much of
                # the miss is freed temporaries kept in glibc's heap (not in the summary).
                plan.append(("deepspeed-tuned-mmap128k", "deepspeed",
                             {"ds_config": ds_configs(model, numels)["deepspeed-tuned"],
                              "env": {"MALLOC_MMAP_THRESHOLD_": "131072"}}, False))
            for system, kind, extra, primary in plan:
                run_dir = tempfile.mkdtemp(prefix=f"{system}-", dir=workdir)
                spec = dict(common, model=model, swap_dir=run_dir, **extra)
                if kind == "memascend":
                    spec.update(budget=budget, optimizer_budget=obudget)
                    rt = runtimes["memascend" if extra["fix_malloc"] else "memascend-default-malloc"]
                else:
                    spec["ds_config"] = _with_path(extra["ds_config"], run_dir)
                    spec["port"] = _free_port()
                    rt = runtimes["deepspeed"]
                print(f"{PROG}: {name} {system} ...", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                res = run_child(kind, spec, workdir, args.interval, args.timeout)
                shutil.rmtree(run_dir, ignore_errors=True)
                w = Workload(model, batch=1, seq=args.seq, gpus=0, runtime_bytes=rt["hwm_bytes"])
                if kind == "memascend":
                    est = estimate_offload(w, compute_dtype="float32", budget=budget,
                                           optimizer_budget=obudget)
                else:
                    mmap = spec.get("env", {}).get("MALLOC_MMAP_THRESHOLD_")
                    est = estimate_deepspeed(w, sz.parse_deepspeed_config(spec["ds_config"]),
                                             flavor="stock" if kind == "deepspeed" else "memascend",
                                             mmap_threshold=int(mmap) if mmap else None)
                row = {"model": name, "parameters": sum(numels), "system": system,
                       "primary": primary, "seconds": round(time.monotonic() - t0, 1),
                       "runtime_bytes": rt["hwm_bytes"], "estimate": est.to_dict()}
                if "error" in res:
                    row["error"] = res["error"]
                    row["stderr_tail"] = res.get("stderr_tail", [])
                    print(f"{PROG}: {name} {system} failed: {res['error']}", file=sys.stderr)
                    rows.append(row)
                    continue
                prof = res.get("profile") or {}
                measured = prof.get("peak_rss_bytes") or res["peak_rss_bytes"]
                last = res["steps"][-1]
                row.update({
                    "measured_peak_rss_bytes": measured,
                    "child_vm_hwm_bytes": res["peak_rss_bytes"],
                    "sampled_peak_rss_bytes": prof.get("sampled_peak_rss_bytes"),
                    "estimated_peak_rss_bytes": est.peak_bytes,
                    "rel_error": (est.peak_bytes - measured) / measured,
                    "estimated_peak_phase": est.peak_phase,
                    "estimated_locked_bytes": est.locked_bytes,
                    "measured_vm_lck_peak_bytes": prof.get("peak_vm_lck_bytes"),
                    "estimated_read_per_step": est.ssd.read_per_step,
                    "estimated_written_per_step": est.ssd.written_per_step,
                    "measured_read_last_step": last["bytes_read"],
                    "measured_written_last_step": last["bytes_written"],
                    "step_seconds": [round(s["seconds"], 2) for s in res["steps"]],
                    "child": {k: v for k, v in res.items() if k not in ("profile",)},
                    "profile": prof,
                })
                rows.append(row)
                print(f"{PROG}: {name} {system}: estimate {est.peak_bytes / MIB:.0f} MiB, "
                      f"measured {measured / MIB:.0f} MiB ({100 * row['rel_error']:+.1f} %)",
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    ok = [r for r in rows if "rel_error" in r]
    prim = [r for r in ok if r["primary"]]
    summary = {
        "max_abs_error": max((abs(r["rel_error"]) for r in prim), default=None),
        "max_abs_error_all": max((abs(r["rel_error"]) for r in ok), default=None),
        "goal": 0.10,
        "runs": len(rows), "failed_runs": len(rows) - len(ok),
        "deepspeed": ds_skip and {"skipped": ds_skip} or "measured",
        "memascend_deepspeed": drop_in_skip and {"skipped": drop_in_skip} or "measured",
        "seconds": round(time.monotonic() - t_start, 1),
    }
    summary["goal_met"] = summary["max_abs_error"] is not None and \
        summary["max_abs_error"] <= 0.10 and not summary["failed_runs"]
    print_table(rows, runtimes, summary)
    if args.json:
        import importlib.metadata as md

        def version(pkg: str) -> Optional[str]:
            try:
                return md.version(pkg)
            except md.PackageNotFoundError:
                return None

        doc = {"benchmark": PROG, "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d"),
               "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                           "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                           "kernel": platform.release(), "python": platform.python_version(),
                           "torch": version("torch"), "transformers": version("transformers"),
                           "deepspeed": version("deepspeed")},
               "config": {"models": names, "steps": steps, "batch": 1, "seq": args.seq,
                          "interval_ms": args.interval},
               "runtimes": runtimes, "runs": rows, "summary": summary}
        write_json(args.json, doc)
    return 0 if not summary["failed_runs"] else 1


def print_table(rows: list[dict[str, Any]], runtimes: dict[str, Any],
                summary: dict[str, Any]) -> None:
    """The table RESULTS.md quotes."""
    print("Runtime baselines (RSS of a child that only imports the training stack): " +
          ", ".join(f"{k} {v['hwm_bytes'] / MIB:.0f} MiB" for k, v in runtimes.items()))
    print()
    print("Peak RSS, MiB: estimate vs measured (profile run peak)")
    head = (f"{'model':<6}{'system':<26}{'estimate':>10}{'measured':>10}{'error':>9}"
            f"{'phase':>10}{'locked est':>12}{'VmLck':>9}{'rd/step est':>13}{'rd meas':>9}"
            f"{'wr/step est':>13}{'wr meas':>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "rel_error" not in r:
            print(f"{r['model']:<6}{r['system']:<26}  FAILED: {r.get('error')}")
            continue
        m = lambda n: f"{n / MIB:.0f}" if n is not None else "-"  # noqa: E731
        mark = "" if r["primary"] else " *"
        print(f"{r['model']:<6}{(r['system'] + mark):<26}{m(r['estimated_peak_rss_bytes']):>10}"
              f"{m(r['measured_peak_rss_bytes']):>10}{100 * r['rel_error']:>8.1f}%"
              f"{r['estimated_peak_phase']:>10}{m(r['estimated_locked_bytes']):>12}"
              f"{m(r['measured_vm_lck_peak_bytes']):>9}{m(r['estimated_read_per_step']):>13}"
              f"{m(r['measured_read_last_step']):>9}{m(r['estimated_written_per_step']):>13}"
              f"{m(r['measured_written_last_step']):>9}")
    print("* not in the summary: diagnostic rows (memascend with glibc's default malloc, "
          "outside the estimate's stated assumption; DeepSpeed with MALLOC_MMAP_THRESHOLD_="
          "131072, estimated with that threshold)")
    mx = summary["max_abs_error"]
    print(f"\nsummary: max_abs_error {mx if mx is None else round(mx, 4)} (goal <= 0.10, "
          f"{'met' if summary['goal_met'] else 'NOT met'}), max_abs_error_all "
          f"{summary['max_abs_error_all'] if summary['max_abs_error_all'] is None else round(summary['max_abs_error_all'], 4)}"
          f", deepspeed {summary['deepspeed'] if isinstance(summary['deepspeed'], str) else summary['deepspeed']['skipped']}"
          f", {summary['seconds']:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
