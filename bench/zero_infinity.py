"""Stock DeepSpeed ZeRO-Infinity vs the memascend drop-in: peak memory, step time, swap bytes.

What it measures: the same model, data, seed and DeepSpeed config (ZeRO-3, parameters and
optimizer state offloaded to ``nvme``) trained once with DeepSpeed's stock swappers (libaio
``async_io`` op, prebuilt and loaded from ``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/memascend-torch-ext``: nothing is JIT-built) and once with
``memascend.integrations.deepspeed.enable()``, for each configuration = model size × buffer
settings. Every run is its own process (bench/_zi_child.py, started by bench/_zi_run.py) so
that ``VmHWM`` and ``VmLck`` start from zero. For each repetition the two systems of a
configuration run back to back, the one going first alternating between configurations and
repetitions; ratios are memascend / stock within a pair, and medians over pairs are reported
(bench/_zi_report.py).

Reported per run: peak RSS (``VmHWM`` at the end), peak locked memory (``VmLck``: the largest
of ~50 ms samples of ``/proc/<pid>/status`` and the child's own readings at the end of each
phase), the mean wall time of the timed steps (forward + backward + ``engine.step()``), and
swap bytes per timed step: the child's ``read_bytes`` / ``write_bytes`` deltas of
``/proc/self/io`` around the timed steps (block-layer bytes, O_DIRECT libaio and io_uring
alike; the same source for both systems). Also the losses (the same seed must give the same
losses on both systems), what the machine did meanwhile, and where the host buffers went.

Workload: transformers ``LlamaForCausalLM`` from a config (random weights, no download),
``134m`` (hidden 768, 12 layers, intermediate 2048, vocab 32000, untied) and ``523m`` (hidden
1536, 15 layers, intermediate 4096, vocab 32000, untied); batch 1 × 64 tokens; 1 warm-up step,
2 timed steps; fp32 (no ``bf16`` section: bf16 matmuls are ~10× slower than fp32 on this CPU,
which would make the runs compute-bound and too long; the offloaded optimizer state is fp32
either way); DeepSpeed's own ``DeepSpeedCPUAdam`` (AdamW mode), which is what DeepSpeed
requires with offload unless ``zero_force_ds_cpu_optimizer`` is false (``--optimizer torch``
uses ``torch.optim.AdamW`` instead). Common to all configurations:
``stage3_max_reuse_distance: 0`` (needed on the CPU accelerator, else "Not enough buffers"),
``pin_memory: true`` in both offload sections (DeepSpeed's default, stated so that memascend
locks too), ``reduce_bucket_size`` = hidden² (what the HF Trainer's ``"auto"`` sets; at
DeepSpeed's default of 5e8 elements the gradient bucket adds up to 2 GB of fp32 to both
systems, and the 523m default stock run, which peaks at about 19.5 GiB without it, would come
within about 2 GiB of this machine's 23.5 GiB), everything else at DeepSpeed's defaults
(``aio`` included).

Buffer settings: ``default`` = DeepSpeed's (offload_param buffer_count 5, buffer_size 1e8,
max_in_cpu 1e9; offload_optimizer buffer_count 4; sub_group_size 1e9). At max_in_cpu 1e9 a
model under 1e9 parameters is kept whole in stage 3's flat CPU buffer after initialisation
(issue #4221): parameters are then not swapped during training at all. ``tuned`` = what a
user short of memory would set: buffer_size = the largest parameter (the embedding),
max_in_cpu 0 (every parameter on NVMe), sub_group_size 1e8; buffer counts unchanged.

Before each configuration the free memory is compared with an estimate of the stock run's
peak (the buffer sizes above, the first step's Adam moments and about 1 B per parameter of
other transients; -5 % to +13 % of the measured peaks, hence a 1 GiB margin); a configuration
that does not fit is skipped for that repetition and said so. Swap folders are fresh
temporary directories under ``--dir`` (default /var/tmp), removed after each run. When
DeepSpeed, libaio or the prebuilt ``async_io`` (or ``cpu_adam``) op is missing, the script
exits 0 and says why (``skipped`` in the JSON).

Usage: ``bench/zero_infinity.py [--json PATH] [--models 134m,523m] [--settings
default,tuned] [--reps N] [--steps N] [--warmup N] [--seq N] [--optimizer cpu_adam|torch]
[--dir DIR] [--timeout S] [--memascend-options JSON]``.
"""
from __future__ import annotations

import argparse
import ctypes.util
import importlib.util
import json
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from memascend.shapes import llama_parameter_shapes, parameter_count  # noqa: E402
from memascend.sysinfo import fmt_bytes  # noqa: E402
from bench._common import (OneLineParser as _Parser, check_json_path, log,  # noqa: E402
                           machine_info, write_json)
from bench._zi_report import print_report, summarize  # noqa: E402
from bench._zi_run import mem_available, run_child  # noqa: E402

DEFAULT_EXT_DIR = os.path.expanduser("~/.cache/memascend-torch-ext")
LLAMA = {"max_position_embeddings": 512, "tie_word_embeddings": False}
MODELS = {
    "134m": dict(LLAMA, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "523m": dict(LLAMA, hidden_size=1536, intermediate_size=4096, num_hidden_layers=15,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "tiny": dict(LLAMA, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=4096),
}
SETTINGS = ("default", "tuned")
TUNED_SUB_GROUP = 100_000_000
# DeepSpeed 0.19.8 defaults (runtime/zero/offload_config.py, runtime/zero/config.py)
DS_PARAM_BUFFERS, DS_BUFFER_SIZE, DS_MAX_IN_CPU = 5, 100_000_000, 1_000_000_000
DS_OPT_BUFFERS, DS_SUB_GROUP = 4, 1_000_000_000
FP32 = 4
BASE_BYTES = 600 << 20           # python + torch + deepspeed + transformers, measured ~360 MiB
# Transients, fitted to the first full run (estimates -5 % to +13 % of the measured stock peaks):
# Adam's moments created unpinned at the first step (2 x fp32 per sub-group element) and
# about 1 B per parameter of autograd gradients, activations and allocator slack.
STATE_TRANSIENT_PER_SUB, TRANSIENT_PER_PARAM = 2 * FP32, 1
MARGIN_BYTES = 1 << 30


def no_nan(x: Any) -> Any:
    """``x`` with every NaN float replaced by None (strict JSON has no NaN)."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [no_nan(v) for v in x]
    return x


def largest_numel(model: dict[str, Any]) -> int:
    """Elements of the model's largest parameter."""
    return max(math.prod(s) for _n, s in llama_parameter_shapes(model))


def settings_for(name: str, model: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed keys a buffer setting adds to the common config."""
    common = {"reduce_bucket_size": model["hidden_size"] ** 2}
    if name == "default":
        return {"param": {}, "optimizer": {}, "zero": common}
    return {"param": {"buffer_size": largest_numel(model), "max_in_cpu": 0}, "optimizer": {},
            "zero": dict(common, sub_group_size=TUNED_SUB_GROUP)}


def stock_estimate(model: dict[str, Any], st: dict[str, Any]) -> int:
    """A rough upper estimate of a stock run's peak RSS (bytes), to skip what cannot fit."""
    n, big = parameter_count(model), largest_numel(model)
    p, z = st["param"], st["zero"]
    pool = DS_PARAM_BUFFERS * max(p.get("buffer_size", DS_BUFFER_SIZE), big) * FP32
    sub = n if z.get("sub_group_size", DS_SUB_GROUP) >= n else z["sub_group_size"] + big
    flat = min(n, p.get("max_in_cpu", DS_MAX_IN_CPU)) * FP32
    writeback = sub * FP32 if flat < n * FP32 else 0
    return (BASE_BYTES + pool + DS_OPT_BUFFERS * sub * FP32 + flat + writeback + n * FP32
            + STATE_TRANSIENT_PER_SUB * sub + TRANSIENT_PER_PARAM * n)


def missing(ext_dir: str, optimizer: str) -> str | None:
    """Why the benchmark cannot run here, or None."""
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed"
    if ctypes.util.find_library("aio") is None:
        return "libaio is not installed (DeepSpeed's async_io op needs it; run `make ds-ops`)"
    ops = ["async_io"] + (["cpu_adam"] if optimizer == "cpu_adam" else [])
    for op in ops:
        path = os.path.join(ext_dir, op, f"{op}.so")
        if not os.path.isfile(path):
            return (f"DeepSpeed's {op} op is not built in {ext_dir} (set TORCH_EXTENSIONS_DIR "
                    f"to where it is cached, or run `make ds-ops`: a JIT build of async_io "
                    f"takes ~9 min on 2 cores)")
    return None


def _positive(p: argparse.ArgumentParser, name: str, v: int, low: int = 1) -> None:
    if v < low:
        p.error(f"--{name} must be >= {low}, got {v}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command-line options; exits 2 with a one-line message on bad arguments."""
    p = _Parser(prog="zero_infinity.py", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", metavar="PATH", help="also write all numbers as JSON to PATH")
    p.add_argument("--models", default="134m,523m",
                   help=f"comma-separated, of {', '.join(MODELS)} (default 134m,523m)")
    p.add_argument("--settings", default="default,tuned",
                   help="comma-separated buffer settings: default, tuned (default both)")
    p.add_argument("--reps", type=int, default=2, help="repetitions (default 2)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (default 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (default 1)")
    p.add_argument("--seq", type=int, default=64, help="tokens per sample (default 64)")
    p.add_argument("--optimizer", choices=("cpu_adam", "torch"), default="cpu_adam",
                   help="DeepSpeedCPUAdam (default) or torch.optim.AdamW")
    p.add_argument("--dir", default="/var/tmp",
                   help="where the temporary swap folders go (default /var/tmp)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run (default 900)")
    p.add_argument("--memascend-options", metavar="JSON", default="{}",
                   help='a "memascend" block for the memascend runs\' DeepSpeed config, e.g. '
                        '\'{"checksum": "none"}\' to see what checksums cost (default: none, '
                        'the drop-in\'s defaults)')
    args = p.parse_args(argv)
    try:
        args.memascend_options = json.loads(args.memascend_options)
    except ValueError as exc:
        p.error(f"--memascend-options: not JSON: {exc}")
    if not isinstance(args.memascend_options, dict):
        p.error("--memascend-options: must be a JSON object")
    args.models = [m for m in args.models.split(",") if m]
    args.settings = [s for s in args.settings.split(",") if s]
    bad = [m for m in args.models if m not in MODELS] or None
    if bad or not args.models:
        p.error(f"--models: unknown {bad} (known: {', '.join(MODELS)})")
    bad = [s for s in args.settings if s not in SETTINGS] or None
    if bad or not args.settings:
        p.error(f"--settings: unknown {bad} (known: {', '.join(SETTINGS)})")
    for name in ("reps", "steps", "batch", "seq"):
        _positive(p, name, getattr(args, name))
    _positive(p, "warmup", args.warmup, 0)
    if args.seq > LLAMA["max_position_embeddings"]:
        p.error(f"--seq must be <= {LLAMA['max_position_embeddings']}, got {args.seq}")
    if not os.path.isdir(args.dir):
        p.error(f"--dir: {args.dir!r} is not a directory")
    check_json_path(p, args.json)
    return args


def build_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Model × settings, with the DeepSpeed keys and the stock estimate of each."""
    out = []
    for m in args.models:
        model = dict(MODELS[m])
        for s in args.settings:
            st = settings_for(s, model)
            out.append({"key": f"{m} {s}", "model_name": m, "setting": s, "model": model,
                        "settings": st, "params": parameter_count(model),
                        "largest_numel": largest_numel(model),
                        "stock_estimate_bytes": stock_estimate(model, st)})
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 on success or skip, 1 when no pair could be measured."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR", DEFAULT_EXT_DIR)
    doc: dict[str, Any] = {"benchmark": "zero_infinity",
                           "command": shlex.join([sys.executable, *sys.argv]),
                           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    why = missing(ext_dir, args.optimizer)
    if why is not None:
        print(f"zero_infinity.py: skipped: {why}")
        if args.json:
            write_json(args.json, dict(doc, skipped=why))
        return 0
    configs = build_configs(args)
    meta = {"dtype": "float32", "optimizer": {"cpu_adam": "DeepSpeedCPUAdam",
                                              "torch": "torch.optim.AdamW"}[args.optimizer],
            "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
            "reps": args.reps, "torch_extensions_dir": ext_dir,
            "memascend_options": args.memascend_options,
            "common": {"stage3_max_reuse_distance": 0, "pin_memory": True,
                       "reduce_bucket_size": "hidden_size ** 2", "aio": "DeepSpeed defaults"},
            "tuned": {"buffer_size": "largest parameter numel", "max_in_cpu": 0,
                      "sub_group_size": TUNED_SUB_GROUP}}
    machine = machine_info(args.dir)
    meta["deepspeed"] = machine["deepspeed"]

    def on_term(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # run the finally blocks: children and swap dirs go

    signal.signal(signal.SIGTERM, on_term)
    log_dir = tempfile.mkdtemp(prefix="memascend-zi-logs-")
    runs: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    try:
        for rep in range(args.reps):
            for ci, c in enumerate(configs):
                order = ("stock", "memascend") if (rep + ci) % 2 == 0 else ("memascend", "stock")
                avail = mem_available()
                need = c["stock_estimate_bytes"] + MARGIN_BYTES
                free_disk = shutil.disk_usage(args.dir).free
                disk_need = 2 * c["params"] * 6 * FP32
                skip = None
                if avail and avail < need:
                    skip = (f"{fmt_bytes(avail)} available, a stock run is estimated at "
                            f"{fmt_bytes(c['stock_estimate_bytes'])} (+1 GiB margin)")
                elif free_disk < disk_need:
                    skip = f"{fmt_bytes(free_disk)} free in {args.dir}, need {fmt_bytes(disk_need)}"
                for system in order:
                    label = f"r{rep}-{c['model_name']}-{c['setting']}-{system}"
                    if skip:
                        log(f"{label}: skipped: {skip}")
                        runs.append({"config": c["key"], "rep": rep, "system": system,
                                     "label": label, "skipped": skip})
                        continue
                    spec = {"label": label, "system": system, "model": c["model"],
                            "settings": c["settings"], "batch": args.batch, "seq": args.seq,
                            "warmup": args.warmup, "steps": args.steps,
                            "optimizer": args.optimizer}
                    if system == "memascend" and args.memascend_options:
                        spec["memascend_options"] = args.memascend_options
                    log(f"{label}: running ({time.perf_counter() - t_all:.0f} s elapsed)")
                    r = run_child(spec, args.dir, ext_dir, args.timeout, log_dir)
                    r.update(config=c["key"], rep=rep, system=system, first=order[0] == system)
                    runs.append(r)
                    if "failed" in r:
                        log(f"{label}: FAILED: {r['failed']}; " + " | ".join(r["stderr_tail"]))
                    else:
                        log(f"{label}: peak RSS {fmt_bytes(r['peak_rss'])}, VmLck "
                            f"{fmt_bytes(r['peak_vmlck'])}, step {r['step_time_s']:.2f} s, swap "
                            f"{fmt_bytes(r['swap_bytes_per_step'])}/step, wall {r['wall_s']:.0f} s")
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    res = summarize(configs, runs)
    meta["total_wall_s"] = time.perf_counter() - t_all
    print_report(meta, configs, res)
    if args.json:
        write_json(args.json, no_nan(dict(doc, machine=machine, config=meta, configs=configs,
                                          runs=runs, by_config=res["by_config"],
                                          summary=res["summary"])), default=str)
    return 0 if res["summary"]["pairs"] else 1


if __name__ == "__main__":
    sys.exit(main())
