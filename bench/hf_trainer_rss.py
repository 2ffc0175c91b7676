"""HF Trainer with ZeRO-Infinity: stock DeepSpeed vs the same script under ``memascend run``.

What it measures: one unmodified HF Trainer script (bench/_hf_child.py: ``TrainingArguments(
deepspeed=...)`` with ZeRO-3, parameters and optimizer state on ``nvme``, the model built by
``from_config`` under ``zero.Init``, ``adamw_torch``) trained with DeepSpeed's stock swappers
(libaio ``async_io`` op, prebuilt in ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/memascend-torch-ext``: ``make ds-ops``) and started as ``memascend run -- python
bench/_hf_child.py`` (the drop-in enabled by the start-up hook, no line of the script
changed). Each run is one process tree sampled by ``memascend profile run --json``: the peak
RSS is the larger of the tree's sampled memory and the process's own ``VmHWM``; also peak
``VmLck``, wall time, the mean step time after the first step and the losses (the same seed
must give the same losses). Pairs run back to back, the one going first alternating; the
ratio of a pair is memascend / stock, and the median over pairs is reported.

Workload: a LLaMA from ``configs/models/<model>.json`` (default ``llama-34m``), batch 1 x
``--seq`` tokens (default 128), ``--steps`` steps (default 4), fp32, DeepSpeed's defaults for
buffers except ``stage3_max_reuse_distance: 0`` (needed on the CPU accelerator) and
``--ds JSON`` merged into ``zero_optimization``. When DeepSpeed, libaio or the prebuilt op is
missing, the script exits 0 and says why (``skipped`` in the JSON).

Usage: ``bench/hf_trainer_rss.py [--json PATH] [--model llama-34m] [--pairs 2] [--steps 4]
[--seq 128] [--ds JSON] [--dir DIR]``. Hold ``flock /tmp/memascend-bench.lock``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
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

DEFAULT_EXT_DIR = os.path.expanduser("~/.cache/memascend-torch-ext")
CHILD = REPO / "bench" / "_hf_child.py"


def stock_unavailable(ext_dir: str) -> Optional[str]:
    """Why stock DeepSpeed's NVMe offload cannot run here, or None."""
    import ctypes.util

    try:
        import deepspeed  # noqa: F401
        import transformers  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed"
    if ctypes.util.find_library("aio") is None:
        return "libaio is not installed (DeepSpeed's async_io op needs it; run `make ds-ops`)"
    if not os.path.isdir(os.path.join(ext_dir, "async_io")):
        return f"DeepSpeed's async_io op is not built in {ext_dir} (run `make ds-ops`)"
    return None


def run_one(system: str, spec: dict[str, Any], workdir: str, ext_dir: str,
            timeout: float) -> dict[str, Any]:
    """One training process tree, profiled; its record."""
    spec = dict(spec, swap=os.path.join(workdir, "swap"), out=os.path.join(workdir, "out"))
    os.makedirs(spec["swap"], exist_ok=True)
    path = os.path.join(workdir, "spec.json")
    Path(path).write_text(json.dumps(spec))
    cmd = [sys.executable, CHILD.as_posix(), path]
    if system == "memascend":
        cmd = [sys.executable, "-m", "memascend.cli", "run", "--", *cmd]
    prof = [sys.executable, "-m", "memascend.cli", "profile", "run", "--json", "--", *cmd]
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=ext_dir, RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 500))
    env.pop("MEMASCEND_DEEPSPEED_OPTIONS", None)
    t0 = time.perf_counter()
    p = subprocess.run(prof, capture_output=True, text=True, env=env, timeout=timeout)
    rec: dict[str, Any] = {"system": system, "wall_s": time.perf_counter() - t0}
    lines = p.stdout.splitlines()  # the child's own output, then the profiler's JSON
    starts = [i for i, line in enumerate(lines) if line == "{"]
    try:
        report = json.loads("\n".join(lines[starts[-1]:])) if starts else {}
    except ValueError:
        report = {}
    line = [x for x in (p.stderr + p.stdout).splitlines() if x.startswith("RESULT ")]
    if p.returncode != 0 or not line or not report:
        rec["error"] = (p.stderr or p.stdout)[-3000:]
        return rec
    child = json.loads(line[-1][len("RESULT "):])
    rec.update(peak_rss_bytes=report["peak_rss_bytes"],
               peak_vm_lck_bytes=report["peak_vm_lck_bytes"], losses=child["losses"],
               step_s=child["step_s"])
    return rec


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--model", default="llama-34m", help="a configs/models preset")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--ds", type=json.loads, default={}, help="merged into zero_optimization")
    p.add_argument("--dir", default="/var/tmp", help="folder for the swap folders")
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    check_json_path(p, args.json)
    cfg_path = REPO / "configs" / "models" / f"{args.model}.json"
    if not cfg_path.exists():
        p.error(f"no model preset {args.model!r} in configs/models")
    config = {k: v for k, v in json.loads(cfg_path.read_text()).items()
              if k not in ("architectures", "model_type", "torch_dtype", "transformers_version")}
    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR", DEFAULT_EXT_DIR)
    doc: dict[str, Any] = {"benchmark": "hf_trainer_rss",
                           "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
                           "args": vars(args)}
    why = stock_unavailable(ext_dir)
    if why:
        print(f"hf_trainer_rss.py: skipped: {why}")
        if args.json:
            write_json(args.json, dict(doc, skipped=why))
        return 0
    spec = {"config": config, "steps": args.steps, "seq": args.seq, "batch": 1, "ds": args.ds}
    runs, pairs = [], []
    for i in range(args.pairs):
        order = ["stock", "memascend"] if i % 2 == 0 else ["memascend", "stock"]
        pair = {}
        for system in order:
            work = tempfile.mkdtemp(prefix=f"hf-{system}-", dir=args.dir)
            try:
                rec = run_one(system, spec, work, ext_dir, args.timeout)
            finally:
                shutil.rmtree(work, ignore_errors=True)
            rec["pair"] = i
            runs.append(rec)
            pair[system] = rec
            print(f"pair {i + 1} {system}: " + (f"FAILED {rec['error'][-300:]}" if "error" in rec
                  else f"peak RSS {rec['peak_rss_bytes'] / 2**20:.0f} MiB, VmLck "
                       f"{rec['peak_vm_lck_bytes'] / 2**20:.0f} MiB, step {rec['step_s']:.2f} s"),
                  flush=True)
        if all("error" not in r for r in pair.values()):
            pairs.append(pair)
    summary: dict[str, Any] = {"pairs_ok": len(pairs)}
    if pairs:
        summary.update(
            rss_ratio=statistics.median(q["memascend"]["peak_rss_bytes"] /
                                        q["stock"]["peak_rss_bytes"] for q in pairs),
            stock_peak_rss_bytes=statistics.median(q["stock"]["peak_rss_bytes"] for q in pairs),
            memascend_peak_rss_bytes=statistics.median(q["memascend"]["peak_rss_bytes"]
                                                       for q in pairs),
            step_ratio=statistics.median(q["memascend"]["step_s"] / q["stock"]["step_s"]
                                         for q in pairs),
            losses_equal=all(q["memascend"]["losses"] == q["stock"]["losses"] for q in pairs))
    doc.update(runs=runs, summary=summary)
    print(json.dumps(summary, indent=1))
    if args.json:
        write_json(args.json, doc)
    return 0 if pairs or not runs else 1


if __name__ == "__main__":
    sys.exit(main())
