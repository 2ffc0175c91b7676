"""offload_model with and without the activation tier: peak RSS, step time, bytes moved.

What it measures: for each sequence length, the same LLaMA (transformers, random weights from
one seed, fp32, batch 1, activation checkpointing on unless ``--no-checkpointing``), trained
through :func:`memascend.offload_model` twice, each run in its own process
(``bench/_plain_child.py``): once as is (``activations=None``: the tensors forward saves for
backward stay in RAM) and once with ``activations="ssd"`` (they wait in the scratch store
``acts.swp`` under a pinned budget, ``--activation-budget``, default 64 MiB). Everything else
(parameter and optimizer tiers, budgets, data, AdamW) is the same. Runs are interleaved in
pairs, the one going first alternating, so both see the same machine.

Reported per sequence length: median step time of each (steps after the first) and the median
over pairs of their ratio (with / without); peak RSS of each during training (``VmHWM``
reset after set-up) and the median ratio; the activation bytes the tier wrote and read per
step and how many tensors it took; the most bytes it held for backward at once
(``tier_peak_live_bytes``: what left RAM, at most; the rest of the peak is the model's
working set, the loss's logits and the runtime, which no activation tier moves); whether every
loss is bitwise equal.

The JSON ``summary``: ``peak_rss_ratio_at_longest`` (the longest sequence), ``step_time_ratio``
(max over lengths), ``losses_equal`` (all). Goals (issue 21): peak_rss_ratio_at_longest <= 0.5,
step_time_ratio <= 1.10, losses_equal.

Usage: ``bench/activations.py [--json PATH] [--model 34m|134m|tiny] [--seqs 1024,4096,8192]
[--pairs 2] [--steps 3] [--budget 256MiB] [--activation-budget 64MiB] [--no-checkpointing]
[--swap-dir DIR] [--quick]``. Hold ``flock /tmp/memascend-bench.lock`` around it on a shared
machine.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._common import (OneLineParser, check_json_path, log,  # noqa: E402
                           machine_info, median, write_json)

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
             rms_norm_eps=1e-6, tie_word_embeddings=False)
MODELS = {
    "34m": dict(LLAMA, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8, vocab_size=8192),
    "134m": dict(LLAMA, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "tiny": dict(LLAMA, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, vocab_size=512),
}


def run_child(act: bool, seq: int, args: Any, workdir: str) -> dict[str, Any]:
    """One training run in its own process; its record."""
    cfg = dict(MODELS[args.model], max_position_embeddings=max(seq, 64))
    opts: dict[str, Any] = {"budget": args.budget}
    if act:
        opts.update(activations="ssd", activation_budget=args.activation_budget)
    tag = f"{'ssd' if act else 'none'}-{seq}"
    spec = {"kind": "offload", "config": cfg, "batch": 1, "seq": seq, "steps": args.steps,
            "seed": 0, "lr": 1e-4, "wd": 0.01, "checkpointing": not args.no_checkpointing,
            "swap_dir": os.path.join(workdir, f"swap-{tag}"), "offload_options": opts,
            "out": os.path.join(workdir, f"{tag}.json")}
    spec_path = os.path.join(workdir, f"{tag}.spec.json")
    Path(spec_path).write_text(json.dumps(spec))
    run = subprocess.run([sys.executable, str(REPO / "bench" / "_plain_child.py"), spec_path],
                         capture_output=True, text=True)
    shutil.rmtree(spec["swap_dir"], ignore_errors=True)
    if run.returncode != 0:
        raise RuntimeError(f"{tag} run failed:\n{run.stderr[-3000:]}")
    return json.loads(Path(spec["out"]).read_text())


def tier_per_step(rec: dict[str, Any]) -> dict[str, float]:
    """The activation tier's counters per steady step (differences of the cumulative ones)."""
    acts = [s["offload_stats"]["activations"] for s in rec["steps"]]
    if len(acts) < 2 or acts[0] is None:
        return {}
    n = len(acts) - 1
    per = {k: (acts[-1][k] - acts[0][k]) / n
           for k in ("written_bytes", "read_bytes", "saved", "saved_bytes")}
    per["tier_peak_live_bytes"] = acts[-1]["peak_live_bytes"]
    return per


def summarize(seq: int, pairs: list[tuple[dict, dict]]) -> dict[str, Any]:
    """One sequence length's numbers over its pairs (without, with)."""
    def step_med(rec: dict[str, Any]) -> float:
        return median([s["time_s"] for s in rec["steps"][1:]] or
                      [s["time_s"] for s in rec["steps"]])

    def losses(rec: dict[str, Any]) -> list[str]:
        return [v for s in rec["steps"] for v in s["losses"]]

    without, with_ = [p[0] for p in pairs], [p[1] for p in pairs]
    tier = tier_per_step(with_[-1])
    return {
        "seq": seq,
        "step_time_s": {"without": median(step_med(r) for r in without),
                        "with": median(step_med(r) for r in with_)},
        "step_time_ratio": median(step_med(b) / step_med(a) for a, b in pairs),
        "peak_rss": {"without": median(r["peak_rss"] for r in without),
                     "with": median(r["peak_rss"] for r in with_)},
        "peak_rss_ratio": median(b["peak_rss"] / a["peak_rss"] for a, b in pairs),
        "activation_bytes_written_per_step": tier.get("written_bytes"),
        "activation_bytes_read_per_step": tier.get("read_bytes"),
        "tensors_per_step": tier.get("saved"),
        "tier_peak_live_bytes": tier.get("tier_peak_live_bytes"),
        "losses_equal": all(losses(a) == losses(b) for a, b in pairs),
        "losses": [{"without": losses(a), "with": losses(b)} for a, b in pairs],
        "loss_last": with_[-1]["steps"][-1]["loss"],
    }


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--model", choices=sorted(MODELS), default="34m")
    p.add_argument("--seqs", default="1024,4096,8192")
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--budget", default="256MiB", help="pinned budget of the parameter tiers")
    p.add_argument("--activation-budget", default="64MiB")
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--swap-dir", default=None)
    p.add_argument("--quick", action="store_true", help="tiny model, short sequences")
    args = p.parse_args(argv)
    check_json_path(p, args.json)
    if args.quick:
        args.model, args.seqs, args.pairs, args.steps = "tiny", "128,512", 1, 3
        args.activation_budget = "1MiB"
    try:
        seqs = [int(s) for s in args.seqs.split(",")]
    except ValueError:
        p.error(f"--seqs: comma-separated integers, got {args.seqs!r}")
    if args.pairs < 1 or args.steps < 2 or any(s < 1 for s in seqs):
        p.error("--pairs >= 1, --steps >= 2 and sequence lengths >= 1")
    workdir = tempfile.mkdtemp(prefix="acts-", dir=args.swap_dir)
    results = []
    try:
        for seq in seqs:
            pairs = []
            for i in range(args.pairs):
                order = (False, True) if i % 2 == 0 else (True, False)
                recs = {}
                for act in order:
                    log(f"seq {seq} pair {i + 1}/{args.pairs}: "
                        f"{'with' if act else 'without'} the tier")
                    recs[act] = run_child(act, seq, args, workdir)
                pairs.append((recs[False], recs[True]))
            results.append(summarize(seq, pairs))
            r = results[-1]
            log(f"seq {seq}: step {r['step_time_s']['without']:.2f} -> "
                f"{r['step_time_s']['with']:.2f} s (x{r['step_time_ratio']:.3f}), peak RSS "
                f"{r['peak_rss']['without'] / 2**20:.0f} -> {r['peak_rss']['with'] / 2**20:.0f}"
                f" MiB (x{r['peak_rss_ratio']:.3f}), losses equal: {r['losses_equal']}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    longest = max(results, key=lambda r: r["seq"])
    summary = {"peak_rss_ratio_at_longest": longest["peak_rss_ratio"],
               "step_time_ratio": max(r["step_time_ratio"] for r in results),
               "losses_equal": all(r["losses_equal"] for r in results)}
    doc = {"machine": machine_info(args.swap_dir or tempfile.gettempdir()),
           "options": {k: v for k, v in vars(args).items() if k != "json"},
           "results": results, "summary": summary}
    print(json.dumps(summary))
    if args.json:
        write_json(args.json, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
