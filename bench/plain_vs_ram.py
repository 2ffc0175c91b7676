"""offload_model vs the same training in RAM: step time, SSD bytes, CPU, mappings, peak RSS.

What it measures: for each configuration (model x batch), the same LLaMA (transformers,
random weights from one seed, fp32), the same token batches and the same AdamW settings,
trained once in memory (``torch.optim.AdamW(foreach=False)``) and once through
:func:`memascend.offload_model`, each run in its own process (``bench/_plain_child.py``).
Runs are interleaved in pairs, the one going first alternating from pair to pair, so that
both see the same machine; the step-time ratio of a configuration is the median over pairs
of (offloaded median step time / in-RAM median step time), steps after the warm-up only.

Reported per configuration: median step times and their ratio; SSD bytes read and written
per parameter per step (the two swap tiers' store counters: exact tensor bytes); host CPU
seconds per step of each run; new pinned mappings and newly locked bytes per steady-state
step (pool counters); peak RSS during training (``VmHWM`` reset after set-up); whether every
loss of every offloaded run equals the in-RAM run's bit for bit; the offloaded optimizer's
own counters (fused / two-phase / rolled-back steps) when it has them; CRC32C throughput of
this machine's cores and what it costs per step. The disk's O_DIRECT bandwidth is measured
after the runs (``bench/_fit_bounds.py``, 1 GiB each way) to give each configuration's I/O
bound (its SSD bytes at that bandwidth, reads and writes one after the other), the
``bound_ratio`` no overlap can beat (max(in-RAM step, I/O bound) / in-RAM step) and the
``overlap_efficiency`` reached (max(in-RAM step, I/O bound) / offloaded step). Without a GPU
the compute runs on the same cores as the host work (AdamW, CRC32C, I/O completions), so the
CPU seconds bound the step too: ``cpu_ratio`` is offloaded over in-RAM CPU seconds per step.

The JSON ``summary``: ``step_time_ratio`` (max over configurations), ``ssd_bytes_per_param``
(the first configuration: fp32, accumulation 1, no activation checkpointing),
``steady_state_new_mappings`` (max over steady steps of all offloaded runs),
``losses_equal`` (all configurations). Goals (issue 16): step_time_ratio <= 1.3 (stretch
1.1), ssd_bytes_per_param <= 28, steady_state_new_mappings == 0, losses_equal.

Usage: ``bench/plain_vs_ram.py [--json PATH] [--configs 134m-1x128,134m-4x128,523m-1x128]
[--pairs 2] [--steps 4] [--swap-dir DIR] [--offload-options JSON] [--quick]``. Hold
``flock /tmp/memascend-bench.lock`` around it on a shared machine.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import check_json_path, cpu_model, median as med, write_json  # noqa: E402
from bench._fit_bounds import measure_bandwidth  # noqa: E402

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
             max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False)
MODELS = {
    "134m": dict(LLAMA, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "523m": dict(LLAMA, hidden_size=1536, intermediate_size=4096, num_hidden_layers=15,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "tiny": dict(LLAMA, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
}
DEFAULT_CONFIGS = "134m-1x128,134m-4x128,523m-1x128"
# Pinned budgets per tier when --offload-options gives none: 512 MiB (issue 16's setting), or
# what the model's largest tensor needs (the optimizer tier holds four fp32 tensors of it).
BUDGETS = {"523m": "1GiB"}


def parse_config(name: str) -> dict[str, Any]:
    """``MODEL-BxS[-ckpt][-accN][-clipX][-fusedadam][-nooverlap]`` -> a configuration dict
    (fusedadam: torch's fused AdamW kernel in both runs; nooverlap: the offloaded run with
    ``overlap_step=False``, its step's updates done before step() returns)."""
    parts = name.split("-")
    if parts[0] not in MODELS or len(parts) < 2 or "x" not in parts[1]:
        raise ValueError(f"bad configuration {name!r}: MODEL-BATCHxSEQ[-ckpt][-accN][-clipX]"
                         f"[-fusedadam][-nooverlap], MODEL one of {sorted(MODELS)}")
    b, s = parts[1].split("x")
    cfg = {"name": name, "model": parts[0], "batch": int(b), "seq": int(s),
           "checkpointing": False, "accumulation": 1, "max_grad_norm": None,
           "fused_adam": False, "overlap_step": True}
    for extra in parts[2:]:
        if extra == "ckpt":
            cfg["checkpointing"] = True
        elif extra.startswith("acc"):
            cfg["accumulation"] = int(extra[3:])
        elif extra.startswith("clip"):
            cfg["max_grad_norm"] = float(extra[4:])
        elif extra == "fusedadam":
            cfg["fused_adam"] = True
        elif extra == "nooverlap":
            cfg["overlap_step"] = False
        else:
            raise ValueError(f"bad configuration suffix {extra!r} in {name!r}")
    return cfg


def _offload_takes(option: str) -> bool:
    """Whether the offload_model of this checkout takes ``option`` (its OffloadOptions
    fields; before those existed, OffloadedModel's keyword arguments)."""
    try:
        import dataclasses

        from memascend.offload_types import OffloadOptions
        return option in {f.name for f in dataclasses.fields(OffloadOptions)}
    except ImportError:
        import inspect

        from memascend.offload import OffloadedModel
        return option in inspect.signature(OffloadedModel.__init__).parameters


def run_child(kind: str, cfg: dict[str, Any], args: Any, workdir: str) -> dict[str, Any]:
    """One training run in a fresh process; its record."""
    out = os.path.join(workdir, f"{kind}.json")
    swap = os.path.join(workdir, "swap")
    spec = {"kind": kind, "config": MODELS[cfg["model"]], "batch": cfg["batch"],
            "seq": cfg["seq"], "steps": args.steps, "seed": 1234, "lr": 1e-4, "wd": 0.01,
            "checkpointing": cfg["checkpointing"], "accumulation": cfg["accumulation"],
            "swap_dir": swap, "out": out,
            "offload_options": dict({"budget": BUDGETS.get(cfg["model"], "512MiB")},
                                    **args.offload_options),
            "max_grad_norm": cfg["max_grad_norm"], "fused_adam": cfg["fused_adam"]}
    if cfg["max_grad_norm"] is not None:
        spec["offload_options"]["max_grad_norm"] = cfg["max_grad_norm"]
    if not cfg.get("overlap_step", True):
        spec["offload_options"]["overlap_step"] = False
    if cfg["accumulation"] > 1 and "accumulation_steps" in spec["offload_options"]:
        spec["offload_options"]["accumulation_steps"] = cfg["accumulation"]
    spec_path = os.path.join(workdir, f"{kind}.spec.json")
    Path(spec_path).write_text(json.dumps(spec))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(REPO / "bench" / "_plain_child.py"), spec_path],
                       capture_output=True, text=True)
    shutil.rmtree(swap, ignore_errors=True)
    if r.returncode != 0:
        raise RuntimeError(f"{kind} child failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rec = json.loads(Path(out).read_text())
    rec["wall_s"] = time.perf_counter() - t0
    return rec


def steady(rec: dict[str, Any], warmup: int) -> list[dict[str, Any]]:
    return rec["steps"][warmup:]


def crc_throughput() -> dict[str, float]:
    """CRC32C bytes per second of one core (native, over a 256 MiB buffer, best of 3)."""
    import torch

    from memascend.store import crc32c

    t = torch.ones(64 << 20, dtype=torch.float32)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        crc32c(t.data_ptr(), t.numel() * 4)
        best = min(best, time.perf_counter() - t0)
    return {"bytes_per_s": t.numel() * 4 / best}


def io_bound(s: dict[str, Any], bw: dict[str, Any]) -> float:
    """Seconds a step's SSD traffic takes at the measured bandwidths, reads and writes one
    after the other (what no overlap can beat when the disk does one at a time)."""
    n = s["n_params"]
    return (s["ssd_read_per_param"] * n / bw["read_bytes_per_s"] +
            s["ssd_written_per_param"] * n / bw["write_bytes_per_s"])


def summarize(cfg: dict[str, Any], pairs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    ratios, ram_t, off_t, equal = [], [], [], True
    off_steps, ram_steps = [], []
    for p in pairs:
        r, o = p["ram"], p["offload"]
        rt = med([s["time_s"] for s in steady(r, warmup)])
        ot = med([s["time_s"] for s in steady(o, warmup)])
        ratios.append(ot / rt)
        ram_t.append(rt)
        off_t.append(ot)
        equal &= [s["losses"] for s in r["steps"]] == [s["losses"] for s in o["steps"]]
        off_steps += steady(o, warmup)
        ram_steps += steady(r, warmup)
    n = pairs[0]["offload"]["n_params"]
    return {
        "name": cfg["name"], "config": cfg, "n_params": n, "pair_ratios": ratios,
        "step_time_ratio": med(ratios), "ram_step_s": med(ram_t), "offload_step_s": med(off_t),
        "ssd_read_per_param": med([s["ssd_read"] / n for s in off_steps]),
        "ssd_written_per_param": med([s["ssd_written"] / n for s in off_steps]),
        "ssd_bytes_per_param": med([(s["ssd_read"] + s["ssd_written"]) / n for s in off_steps]),
        "ram_cpu_s_per_step": med([s["own_cpu_s"] for s in ram_steps]),
        "offload_cpu_s_per_step": med([s["own_cpu_s"] for s in off_steps]),
        "other_cpu_s_per_step": med([s["other_cpu_s"] for s in off_steps + ram_steps]),
        "new_mappings_per_step": max((s["new_mappings"] for s in off_steps), default=0),
        "newly_locked_per_step": max((s["newly_locked"] for s in off_steps), default=0),
        "ram_peak_rss": max(p["ram"]["peak_rss"] for p in pairs),
        "offload_peak_rss": max(p["offload"]["peak_rss"] for p in pairs),
        "losses_equal": equal,
        "offload_stats_last": pairs[-1]["offload"]["steps"][-1].get("offload_stats"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH", help="write the results here")
    p.add_argument("--configs", default=DEFAULT_CONFIGS,
                   help="comma-separated MODEL-BxS[-ckpt][-accN][-clipX][-fusedadam]"
                        "[-nooverlap] (clipX: max_grad_norm X in both runs; fusedadam: "
                        "torch's fused AdamW kernel in both; nooverlap: overlap_step=False "
                        f"offloaded; default {DEFAULT_CONFIGS})")
    p.add_argument("--pairs", type=int, default=2, help="interleaved pairs per configuration")
    p.add_argument("--steps", type=int, default=4, help="steps per run, the first a warm-up")
    p.add_argument("--warmup", type=int, default=1, help="steps left out of the medians")
    p.add_argument("--swap-dir", default=None, help="folder for swap tiers (default: a "
                   "temporary folder under the repository's filesystem)")
    p.add_argument("--offload-options", type=json.loads, default={},
                   help="JSON of extra offload_model options (e.g. '{\"budget\": \"1GiB\"}')")
    p.add_argument("--quick", action="store_true", help="a tiny model, 1 pair, 3 steps "
                   "(the smoke test)")
    args = p.parse_args(argv)
    check_json_path(p, args.json)
    if args.quick:
        args.configs, args.pairs, args.steps = "tiny-2x32", 1, 3
    try:
        configs = [parse_config(c) for c in args.configs.split(",") if c]
    except ValueError as exc:
        p.error(str(exc))
    if args.pairs < 1 or args.steps <= args.warmup:
        p.error("--pairs must be >= 1 and --steps > --warmup")
    if _offload_takes("accumulation_steps"):
        args.offload_options.setdefault("accumulation_steps", 1)  # declared: see docs/offload.md
    base = args.swap_dir or str(REPO / "bench" / "out")
    os.makedirs(base, exist_ok=True)
    results = []
    started = time.time()
    for ci, cfg in enumerate(configs):
        pairs = []
        for i in range(args.pairs):
            order = ("ram", "offload") if (i + ci) % 2 == 0 else ("offload", "ram")
            pair = {}
            for kind in order:
                with tempfile.TemporaryDirectory(dir=base, prefix="plain-") as wd:
                    pair[kind] = run_child(kind, cfg, args, wd)
                print(f"{cfg['name']} pair {i + 1} {kind}: median step "
                      f"{med([s['time_s'] for s in steady(pair[kind], args.warmup)]):.2f} s",
                      file=sys.stderr, flush=True)
            pair["order"] = list(order)
            pairs.append(pair)
        results.append({"summary": summarize(cfg, pairs, args.warmup), "pairs": pairs})
    crc = crc_throughput()
    bw = measure_bandwidth(base, 1 << 30)
    first = results[0]["summary"]
    for r in results:
        s = r["summary"]
        s["crc_cpu_s_per_step"] = ((s["ssd_read_per_param"] + s["ssd_written_per_param"]) *
                                   s["n_params"] / crc["bytes_per_s"])
        s["io_bound_s"] = io_bound(s, bw)
        # the best a step can do here: compute (the in-RAM step) and I/O perfectly overlapped
        s["bound_ratio"] = max(s["ram_step_s"], s["io_bound_s"]) / s["ram_step_s"]
        s["overlap_efficiency"] = max(s["ram_step_s"], s["io_bound_s"]) / s["offload_step_s"]
        # with the compute on the same cores as the host work (no GPU), CPU seconds bound too
        s["cpu_ratio"] = s["offload_cpu_s_per_step"] / s["ram_cpu_s_per_step"]
    summary = {
        "step_time_ratio": max(r["summary"]["step_time_ratio"] for r in results),
        "ssd_bytes_per_param": first["ssd_bytes_per_param"],
        "steady_state_new_mappings": max(r["summary"]["new_mappings_per_step"] for r in results),
        "losses_equal": all(r["summary"]["losses_equal"] for r in results),
        "configs": {r["summary"]["name"]: {k: r["summary"][k] for k in (
            "step_time_ratio", "ram_step_s", "offload_step_s", "io_bound_s", "bound_ratio",
            "overlap_efficiency", "cpu_ratio", "ssd_bytes_per_param", "ram_cpu_s_per_step",
            "offload_cpu_s_per_step", "crc_cpu_s_per_step", "ram_peak_rss",
            "offload_peak_rss", "losses_equal")} for r in results},
        "crc32c_bytes_per_s_per_core": crc["bytes_per_s"],
        "disk": {k: bw[k] for k in ("read_bytes_per_s", "write_bytes_per_s", "backend")},
    }
    doc = {"benchmark": "plain_vs_ram", "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
           "args": {k: v for k, v in vars(args).items()}, "elapsed_s": time.time() - started,
           "summary": summary, "results": results}
    print(json.dumps(summary, indent=1))
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
