"""Train a model whose training state is several times a hard RAM limit: memascend vs DeepSpeed.

What it measures: whether a LLaMA whose in-memory training state is at least 3x a RAM limit
trains under that limit with memascend's SSD offload, and how close each step comes to the
machine's own bounds (disk bandwidth and compute). The default is ``configs/models/llama-1b``
(1.1 B parameters, vocabulary 32000) under a 4.5 GiB limit, 3 steps of batch 1 x 128 tokens;
``--quick`` is a 240 M-parameter model (18 layers, hidden 1024, vocabulary 4096) under
1.125 GiB, 2 steps of 1 x 16 tokens (the smoke test). The limits leave ~10 % headroom over the
peaks measured here with glibc's default malloc, which keeps ~1.3 GB of freed tensor memory in
its heap for the 1.1 B model (peak RSS ~4.2 GB; ~2.9 GB with ``MALLOC_MMAP_THRESHOLD_=1048576``).

How:

* **The limit** is a fresh memory cgroup per training child, hard limit and no swap
  (``bench/_cgroup.py``); page cache counts toward it, the O_DIRECT swap I/O does not.
  Creating a cgroup needs root and a memory controller: otherwise the benchmark is skipped
  with the reason (exit 0, ``skipped`` in the JSON).
* **The training children** (``bench/_fit_children.py``) each run in their own process: the
  model (a ``transformers.LlamaForCausalLM``) trains on the Python standard library's source,
  byte-level tokenized (ids 0-255; the config's vocabulary is kept, so the state has the real
  model's size), AdamW lr 1e-4. memascend builds it under :func:`memascend.meta_parameters`
  and :func:`memascend.offload_model` materializes it one module at a time
  (``init=model._init_weights``), so it never exists in RAM.
  Every decoder layer uses reentrant activation checkpointing, for the usual reason: autograd
  then keeps only each layer's input plus one layer's activations at a time instead of every
  layer's activations (an estimated ~0.5 GB for llama-1b at 1 x 128 tokens, linear in the
  tokens), which matters under a hard limit. memascend trains correctly either way (it
  re-derives saved weight views from the re-fetched parameter, with or without checkpointing,
  reentrant or not); DeepSpeed gets the same checkpointing, so both do the same arithmetic,
  recompute included.
  **Compute is fp32**: bf16 matmuls are ~10x slower than fp32 on this CPU (no AMX), so both
  tiers hold fp32 and the in-memory training state this replaces is 16 B/parameter (fp32
  weights = master 4, gradients 4, Adam moments 8), as ``training_state_bytes()`` computes;
  the issue's bf16 recipe (bf16 weights and gradients, fp32 master and moments) is also
  16 B/parameter. ``state_to_ram_limit`` = that / the limit; the JSON also gives the state
  without gradients (12 B/parameter) and the issue's "fp32 master + Adam moments + bf16
  params" (14 B/parameter, ``issue_state_to_ram_limit``) over the limit. On SSD:
  4 B/parameter in the parameter tier (in fp32 the parameter is its own master) + 8 in the
  optimizer tier (m, v); the step is fused into backward, so no gradient is stored.
* **Pinned budgets** (``--budget``, per tier): by default the parameter tier gets
  max(3 x the largest tensor, 2 decoder layers + the largest tensor), so a layer's weights can
  stay resident from its recompute to its backward instead of being read a third time, and
  the optimizer tier 5x the largest tensor (an update holds a parameter's two moments, and the
  next parameters' moments are read ahead).
* **Per step** (the first is a warm-up: the swappers learn the access order and the moments
  are created; it is reported but not in the medians) the child records the wall time of
  forward + backward + ``om.step()`` and its three parts, the bytes the two swappers read and
  wrote (``stats()`` deltas; ``/proc/self/io`` is recorded as a cross-check), their wait time,
  and ``VmHWM``. Peak RSS is the child's ``VmHWM`` at the end; the cgroup's own peak (page
  cache included) is reported too. Every step and measurement also records ``other_cpu_s``:
  CPU seconds other processes and the hypervisor (steal) used meanwhile.
* **Disk bandwidth and compute** are measured in this (parent) process, with no child
  running, before and after the memascend training (``bench/_fit_bounds.py``). Bandwidth:
  memascend's SwapEngine writes then reads 1 GiB (``--quick`` 256 MiB) O_DIRECT, twice each
  time; write and read bandwidth are the best of the four samples (the disk is noisy, +-30 %;
  the best errs toward a small I/O bound). **I/O bound** of a step = bytes read / read
  bandwidth + bytes written / write bandwidth. **Compute** is the whole model's, measured, not
  extrapolated from a part: forward + backward of the real graph (embedding, every layer call
  under the same reentrant checkpointing, norm, head, loss) with one decoder layer's weights
  shared by all layer calls (identical layers do identical arithmetic, and the measurement
  itself stays small on a shared machine), plus ``torch.optim.adamw.adamw`` once per
  parameter of the model, as ``om.step()`` calls it. Each is the fastest of 4 timed runs (2 per
  round after a warm-up; ``--quick`` 2, 1 per round): the least disturbed by the other users
  of the 2 cores. ``others_cores_during_best`` says how many cores others still used during
  the runs kept (above ~0.2 the compute is inflated and a warning is printed). The compute
  bound of a step is max(forward + backward, AdamW, their CPU-seconds over the cores): the
  fused step overlaps AdamW with backward, so their sum (``serial_seconds``, the bound until
  session 15) is not one (``bench/_fit_bounds.py``). Copies into pinned buffers, CRC32C and
  swapper bookkeeping are not compute.
* **Overlap efficiency** = max(compute, I/O bound) / step time (median over the measured
  steps, ``bench/_fit_report.py``): 1.0 when the smaller of compute and I/O is completely
  hidden behind the larger. Goal: >= 0.8. A step faster than its own bound means an estimate
  is wrong: that step is reported as an anomaly, and the run gets no efficiency (None), never
  an efficiency above 1.
* **DeepSpeed** (when importable, and not ``--no-deepspeed``): the same model, data and batch
  through stock DeepSpeed ZeRO-3 with ``offload_param`` and ``offload_optimizer`` on NVMe,
  fp32, the same checkpointing, AdamW in the config (DeepSpeedCPUAdam). Config: DeepSpeed's
  defaults except what this machine and this model need to run at all, each chosen for the
  least host memory: ``stage3_max_reuse_distance`` 0 (else "Not enough buffers" on the CPU
  accelerator), ``buffer_size`` = the largest parameter (the default 1e8 elements would be
  bigger), ``max_in_cpu`` 0 (else it keeps up to 1e9 parameters in a pinned CPU buffer),
  ``sub_group_size`` 1e8 (the default 1e9 makes a 4 x 1e9 x 4 B = 16 GB optimizer swap pool).
  It runs first under the same limit; if the cgroup kills it there, it runs again under a
  limit of 3/4 of physical RAM (``deepspeed_unconstrained``), to measure what it needs and how
  fast it steps. Its efficiency uses the same compute time, measured with torch's AdamW;
  DeepSpeedCPUAdam is another kernel, so DeepSpeed's figure is approximate. ``host_floor`` is
  what DeepSpeed allocates at any limit, from its source: the fp32 gradient partitions of
  every parameter in CPU memory (4 B/parameter) plus its swap-buffer pools.
  A child that exceeds ``--timeout`` seconds is killed and reported as such.

Swap directories are fresh ``memascend-fit-<pid>-*`` folders under ``--swap-dir`` (default
/var/tmp), removed at the end, also on error or SIGTERM (a later run removes those of a run
killed with SIGKILL); free space is checked first (twice the state on SSD: a swap store may
grow to about twice its stored bytes before it reclaims overwritten extents).

Usage: ``bench/fit_under_budget.py [--json PATH] [--quick] [--model M] [--steps N]
[--limit SIZE] [--batch B] [--seq-len S] [--swap-dir DIR] [--budget SIZE] [--no-deepspeed]
[--timeout S]``.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._cgroup import (CgroupUnavailable, cgroup_root, pid_gone,  # noqa: E402
                           remove_stale_cgroups)
from bench._common import (OneLineParser as _ArgumentParser, check_json_path,  # noqa: E402
                           log, machine_info, write_json)
from bench._fit_bounds import combine_compute, measure_bandwidth, measure_compute  # noqa: E402
from bench._fit_children import (CGROUP_PREFIX, DEFAULT_EXT_DIR, LR,  # noqa: E402
                                 deepspeed_floor, deepspeed_ops_prebuilt, run_child)
from bench._fit_report import MIN_RATIO, analyse, print_report, summarize  # noqa: E402
from memascend.config import parse_size  # noqa: E402
from memascend.errors import ConfigError, MemAscendError  # noqa: E402
from memascend.sysinfo import fmt_bytes, phys_bytes  # noqa: E402

MiB, GiB = 1 << 20, 1 << 30
PROG = "fit_under_budget.py"
#: The --quick model: 240 M parameters, small vocabulary so the largest tensor stays small.
QUICK_MODEL = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 18,
               "num_attention_heads": 16, "num_key_value_heads": 16, "vocab_size": 4096,
               "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
               "tie_word_embeddings": False}
FULL = {"model": "llama-1b", "limit": 4608 * MiB, "steps": 3, "batch": 1, "seq_len": 128,
        "bw_bytes": 1 * GiB, "timeout": 1800.0, "compute_reps": 2}
QUICK = {"model": "quick", "limit": 1152 * MiB, "steps": 2, "batch": 1, "seq_len": 16,
         "bw_bytes": 256 * MiB, "timeout": 300.0, "compute_reps": 1}
SSD_BYTES_PER_PARAM = 12  # fp32: the parameter (its own master) 4 + m and v 8
SSD_GROWTH = 2  # a step keeps the old versions of what it updated aside until step(): ~2x


def model_dict(name: str) -> dict[str, Any]:
    """The LLaMA config dict for ``quick``, a demo preset, a configs/models preset or a path."""
    if name == "quick":
        return dict(QUICK_MODEL)
    from memascend.demo import model_config

    cfg = model_config(name)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("tie_word_embeddings", False)
    return cfg


def remove_stale(base: str) -> None:
    """Remove the swap folders and cgroups of runs whose process is gone (a run killed with
    SIGKILL cannot clean up its ~20 GB of swap files itself)."""
    with contextlib.suppress(OSError):
        for name in os.listdir(base):
            pid = pid_gone(name, CGROUP_PREFIX)
            if pid is not None:
                log(f"removing {os.path.join(base, name)} left by a killed run (pid {pid})")
                shutil.rmtree(os.path.join(base, name), ignore_errors=True)
    for path in remove_stale_cgroups(CGROUP_PREFIX):
        log(f"removed cgroup {path} left by a killed run")


def _int_arg(p: argparse.ArgumentParser, name: str, raw: Optional[str], default: int,
             lo: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if value < lo:
        p.error(f"--{name.replace('_', '-')}: expected an integer >= {lo}, got {raw!r}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options; exits 2 with a one-line message on bad arguments."""
    p = _ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write all numbers as JSON to PATH")
    p.add_argument("--quick", action="store_true",
                   help=f"a {QUICK['model']} model (240 M parameters) under "
                        f"{fmt_bytes(QUICK['limit'])}, {QUICK['steps']} steps (smoke test)")
    p.add_argument("--model", metavar="M", help=f"'quick', a demo preset, a configs/models "
                   f"preset or a config.json path (default {FULL['model']})")
    p.add_argument("--steps", metavar="N", help=f"training steps, the first a warm-up "
                   f"(default {FULL['steps']}, --quick {QUICK['steps']})")
    p.add_argument("--limit", metavar="SIZE", help=f"RAM limit of the training process "
                   f"(default {fmt_bytes(FULL['limit'])}, --quick {fmt_bytes(QUICK['limit'])})")
    p.add_argument("--batch", metavar="B", help=f"sequences per step (default {FULL['batch']})")
    p.add_argument("--seq-len", metavar="S", help=f"tokens per sequence (default "
                   f"{FULL['seq_len']}, --quick {QUICK['seq_len']})")
    p.add_argument("--swap-dir", metavar="DIR", help="where the swap folders go (default "
                   "/var/tmp; must be on disk, not tmpfs)")
    p.add_argument("--budget", metavar="SIZE", help="pinned budget of each memascend swap tier "
                   "(default: see the docstring, per tier)")
    p.add_argument("--no-deepspeed", action="store_true", help="do not run DeepSpeed")
    p.add_argument("--timeout", metavar="S", help=f"seconds per training child before it is "
                   f"killed (default {FULL['timeout']:.0f}, --quick {QUICK['timeout']:.0f})")
    args = p.parse_args(argv)
    d = QUICK if args.quick else FULL
    args.model = args.model or d["model"]
    try:
        args.config = model_dict(args.model)
    except ConfigError as exc:
        p.error(f"--model: {exc}")
    args.steps = _int_arg(p, "steps", args.steps, d["steps"], 2)
    args.batch = _int_arg(p, "batch", args.batch, d["batch"], 1)
    args.seq_len = _int_arg(p, "seq_len", args.seq_len, d["seq_len"], 1)
    if args.seq_len + 1 > args.config.get("max_position_embeddings", 1 << 30):
        p.error(f"--seq-len: {args.seq_len} exceeds the model's max_position_embeddings "
                f"{args.config['max_position_embeddings']}")
    for name in ("limit", "budget"):
        raw = getattr(args, name)
        if raw is not None:
            try:
                setattr(args, name, parse_size(f"--{name}", raw))
            except ConfigError as exc:
                p.error(str(exc))
    if args.limit is None:
        args.limit = d["limit"]
    elif args.limit < 256 * MiB:
        p.error(f"--limit: at least 256 MiB (the Python runtime alone needs ~330 MiB), got "
                f"{args.limit}")
    if args.timeout is None:
        args.timeout = d["timeout"]
    else:
        try:
            args.timeout = float(args.timeout)
        except ValueError:
            p.error(f"--timeout: expected seconds, got {args.timeout!r}")
        if not args.timeout > 0:
            p.error(f"--timeout: must be positive, got {args.timeout}")
    args.bw_bytes, args.compute_reps = d["bw_bytes"], d["compute_reps"]
    args.swap_dir = args.swap_dir or "/var/tmp"
    if not os.path.isdir(args.swap_dir):
        p.error(f"--swap-dir: {args.swap_dir!r} is not a directory")
    if not os.access(args.swap_dir, os.W_OK | os.X_OK):
        p.error(f"--swap-dir: {args.swap_dir!r} is not writable")
    check_json_path(p, args.json)
    return args


class Interrupted(Exception):
    """SIGTERM."""


def _on_signal(signum: int, _frame: Any) -> None:
    raise Interrupted(f"signal {signum}")


def main(argv: Optional[list[str]] = None) -> int:
    """Run the benchmark; 0 on success or skip, 1 when it could not run, 130 on interrupt."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    command = shlex.join([sys.executable, *(sys.argv if argv is None else [__file__, *argv])])
    try:
        cgroup_root()
    except CgroupUnavailable as exc:
        return skip(args, command, str(exc))
    signal.signal(signal.SIGTERM, _on_signal)
    remove_stale(args.swap_dir)
    from memascend.shapes import llama_parameter_shapes

    shapes = llama_parameter_shapes(args.config)
    n_params = sum(math.prod(s) for _n, s in shapes)
    need = n_params * SSD_BYTES_PER_PARAM * SSD_GROWTH + args.bw_bytes + 2 * GiB
    free = shutil.disk_usage(args.swap_dir).free
    if free < need:
        print(f"{PROG}: error: only {fmt_bytes(free)} free in {args.swap_dir}, need about "
              f"{fmt_bytes(need)} for {n_params / 1e9:.2f} B parameters; free space or pass "
              f"--swap-dir on a larger disk", file=sys.stderr)
        return 1
    workdir = tempfile.mkdtemp(prefix=f"{CGROUP_PREFIX}-{os.getpid()}-", dir=args.swap_dir)
    try:
        return _run(args, command, workdir, shapes, n_params)
    except (Interrupted, KeyboardInterrupt) as exc:
        log(f"{PROG}: interrupted ({exc}); swap files and cgroups removed")
        return 130
    except (CgroupUnavailable, MemAscendError, OSError, RuntimeError, ValueError) as exc:
        print(f"{PROG}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def skip(args: argparse.Namespace, command: str, reason: str) -> int:
    """Report a skipped run (no cgroup possible): exit 0, ``skipped`` in the JSON."""
    print(f"skipped: {reason}")
    if args.json:
        write_json(args.json, {
            "benchmark": "fit_under_budget", "command": command, "skipped": reason,
            "machine": machine_info(args.swap_dir), "results": {},
            "summary": {"state_to_ram_limit": None, "overlap_efficiency": None,
                        "peak_rss_bytes": None, "goal_met": None, "skipped": reason}})
    return 0


def training_state(n_params: int, largest: int) -> dict[str, Any]:
    """The in-memory training state offload replaces, and what it takes on SSD (fp32)."""
    return {"parameters": n_params, "compute_dtype": "float32",
            "bytes_per_parameter": {"weights_fp32_master": 4, "gradients": 4,
                                    "adam_m": 4, "adam_v": 4},
            "in_memory_bytes": 16 * n_params, "without_gradients_bytes": 12 * n_params,
            "bf16_recipe_bytes": n_params * (2 + 2 + 4 + 4 + 4),
            "issue_definition_bytes": n_params * (4 + 4 + 4 + 2),  # master, m, v, bf16 params
            "ssd_bytes": SSD_BYTES_PER_PARAM * n_params, "largest_tensor_numel": largest}


def _run_deepspeed(args: argparse.Namespace, spec: dict[str, Any], workdir: str,
                   n_params: int, runs: dict[str, Any]) -> None:
    """DeepSpeed under the same limit; again under 3/4 of RAM if the limit killed it."""
    if args.no_deepspeed:
        runs["deepspeed"] = {"skipped": "--no-deepspeed"}
        return
    if importlib.util.find_spec("deepspeed") is None:
        runs["deepspeed"] = {"skipped": "deepspeed is not installed (pip install deepspeed)"}
        return
    ext = os.environ.get("TORCH_EXTENSIONS_DIR", DEFAULT_EXT_DIR)
    if not deepspeed_ops_prebuilt(ext):
        log(f"note: DeepSpeed's async_io/cpu_adam ops are not built in {ext}: the child "
            "JIT-builds them first (~10 min on 2 cores)")
    for name, limit in (("deepspeed", args.limit),
                        ("deepspeed_unconstrained", phys_bytes() * 3 // 4)):
        swap = os.path.join(workdir, name)
        os.mkdir(swap)
        log(f"{name}: training {args.steps} steps under {fmt_bytes(limit)} ...")
        ds_spec = dict(spec, swap_dir=swap, port=29500 + os.getpid() % 500)
        runs[name] = run_child("deepspeed", ds_spec, limit, workdir, args.timeout)
        runs[name]["host_floor"] = deepspeed_floor(ds_spec, n_params)
        shutil.rmtree(swap, ignore_errors=True)
        log(f"  {name}: {runs[name]['status']}")
        if "oom-killed" not in runs[name]["status"]:
            break


def _run(args: argparse.Namespace, command: str, workdir: str,
         shapes: list[tuple[str, tuple[int, ...]]], n_params: int) -> int:
    largest = max(math.prod(s) for _n, s in shapes)
    layer = sum(math.prod(s) for n, s in shapes if n.startswith("model.layers.0."))
    elem = 4  # fp32 compute
    pb = args.budget or -(-max(3 * largest, 2 * layer + largest) * elem // MiB) * MiB
    ob = args.budget or -(-5 * largest * 4 // MiB) * MiB
    state = training_state(n_params, largest)
    ratio = state["in_memory_bytes"] / args.limit
    log(f"model {args.model}: {n_params / 1e9:.3f} B parameters; in-memory state "
        f"{fmt_bytes(state['in_memory_bytes'])} = {ratio:.2f} x the {fmt_bytes(args.limit)} "
        f"limit; swap dir {workdir}")
    if ratio < MIN_RATIO:
        log(f"warning: state/limit {ratio:.2f} < {MIN_RATIO}: the model fits too easily")
    bws = []
    log(f"disk bandwidth ({fmt_bytes(args.bw_bytes)} O_DIRECT) ...")
    bws.append(measure_bandwidth(workdir, args.bw_bytes))
    log("compute time, round 1 (whole model, weights in RAM) ...")
    rounds = [measure_compute(args.config, shapes, args.batch, args.seq_len, LR,
                           reps=args.compute_reps)]
    runs: dict[str, Any] = {}
    spec = {"config": args.config, "steps": args.steps, "batch": args.batch,
            "seq_len": args.seq_len, "seed": 0, "param_budget": pb, "optim_budget": ob,
            "largest_numel": largest}
    swap = os.path.join(workdir, "memascend")
    os.mkdir(swap)
    log(f"memascend: training {args.steps} steps under {fmt_bytes(args.limit)} "
        f"(budgets {fmt_bytes(pb)} + {fmt_bytes(ob)}) ...")
    runs["memascend"] = run_child("memascend", dict(spec, swap_dir=swap), args.limit, workdir,
                                  args.timeout)
    shutil.rmtree(swap, ignore_errors=True)
    log(f"  memascend: {runs['memascend']['status']}")
    log("compute time, round 2 ...")
    rounds.append(measure_compute(args.config, shapes, args.batch, args.seq_len, LR,
                           reps=args.compute_reps))
    compute = combine_compute(rounds)
    _run_deepspeed(args, spec, workdir, n_params, runs)
    log(f"disk bandwidth again ({fmt_bytes(args.bw_bytes)} O_DIRECT) ...")
    bws.append(measure_bandwidth(workdir, args.bw_bytes))
    bw = {"write": max(x for b in bws for x in b["samples"]["write"]),
          "read": max(x for b in bws for x in b["samples"]["read"]),
          "method": "best of the samples before and after training", "before": bws[0],
          "after": bws[1]}
    for r in runs.values():
        if r.get("steps"):
            r["analysis"] = analyse(r, bw, compute["seconds"])
    doc = {"benchmark": "fit_under_budget", "command": command,
           "machine": machine_info(args.swap_dir), "quick": args.quick,
           "model": {"name": args.model, "config": args.config}, "batch": args.batch,
           "seq_len": args.seq_len, "steps": args.steps, "limit_bytes": args.limit,
           "cgroup_version": f"cgroup v{cgroup_root()[1]}", "state": state,
           "bandwidth": bw, "compute": compute, "results": runs,
           "summary": summarize(runs, state, args.limit, bw, compute)}
    print_report(doc)
    if args.json:
        write_json(args.json, doc)
    return 0 if runs["memascend"]["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
