"""Smoke test of bench/swapper.py: a quick run works, its headline numbers are sane and follow
from its raw per-pass records, and it cleans up its swap directory."""
from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "swapper.py"


def test_quick_run_reports_summary(tmp_path):
    out = tmp_path / "swapper.json"
    swap_parent = tmp_path / "swap"
    swap_parent.mkdir()
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out),
                          "--dir", str(swap_parent)],
                         capture_output=True, text=True, timeout=90, check=False)
    assert run.returncode == 0, run.stderr
    assert list(swap_parent.iterdir()) == []  # the swap directory was removed
    doc = json.loads(out.read_text())
    s, cfg, main = doc["summary"], doc["config"], doc["results"]["main"]
    for key in ("overlap_efficiency", "pinned_peak_vs_deepspeed", "hit_rate_steady",
                "pinned_peak_bytes", "budget_bytes"):
        assert key in s, key
    assert doc["command"] and doc["machine"]["cores"]
    assert "summary:" in run.stdout
    assert "skipped" in doc["deepspeed_measured"]  # --quick does not import DeepSpeed

    # the swapper's accounting stays within its budget; the headline peak is what existed
    assert 0 < s["swapper_pinned_peak_bytes"] <= s["budget_bytes"]
    assert s["pinned_peak_bytes"] == max(s["swapper_pinned_peak_bytes"],
                                         s["pool_in_use_peak_bytes"],
                                         s["pool_locked_peak_bytes"])
    # DeepSpeed's default parameter pool for llama-1b: 5 × ⌈1e8⌉ (100,000,256) × 2 B
    assert s["deepspeed_default_locked_bytes"] == 5 * 100_000_256 * 2
    assert math.isclose(s["pinned_peak_vs_deepspeed"],
                        s["pinned_peak_bytes"] / s["deepspeed_default_locked_bytes"])
    assert 0 < s["pinned_peak_vs_deepspeed"] < 1
    assert 0 <= s["hit_rate_steady"] <= 1
    assert s["budget_bytes"] >= 3 * cfg["largest_bytes"]

    # the overlap efficiency follows from the per-pass records
    passes = {p["index"]: p for p in main["passes"]}
    reps = [r for r in main["repetitions"] if r["ratio"] == 1.0]
    assert len(reps) == cfg["passes"]
    effs = []
    for r in reps:
        io = passes[r["io_pass"]]
        cs = [passes[i] for i in r["compute_passes"]]
        assert io["kind"] == "io" and io["compute_s"] == 0
        assert all(c["kind"] == "compute" for c in cs) and len(cs) == 2
        t_c = statistics.fmean(c["compute_s"] for c in cs)
        wall = statistics.fmean(c["wall_s"] for c in cs)
        # the simulated compute hit its target (T_c = ratio × T_io) and fits in the wall time
        assert math.isclose(t_c, io["wall_s"], rel_tol=0.1), (t_c, io["wall_s"])
        assert all(c["compute_s"] < c["wall_s"] for c in cs)
        # every counted pass touched every tensor once, each access classified once
        assert all(c["accesses"] == cfg["tensors"] for c in cs)
        assert all(c["hits"] + c["reuse_hits"] + c["late"] + c["misses"] == c["accesses"]
                   for c in cs)
        effs.append(max(t_c, io["wall_s"]) / wall)
    assert math.isclose(s["overlap_efficiency"], statistics.median(effs))
    st = main["swapper_stats"]  # every access not served from residency needed a read
    assert st["reads"] >= st["hits"] + st["late"] + st["misses"]
    assert st["accesses"] == sum(p["accesses"] for p in main["passes"])
    assert 0 < s["overlap_efficiency"] <= 1.2
    assert s["overlap_goal_met"] == (s["overlap_efficiency"] >= 0.9)


def test_bad_arguments_exit_nonzero_with_one_line():
    for bad in (["--layers", "-1"], ["--budget-frac", "0"], ["--model", "no-such-model"],
                ["--ratios", "0.5"], ["--passes", "x"], ["--sweep", "0.5"],
                ["--dir", "/no/such/dir"]):
        run = subprocess.run([sys.executable, str(SCRIPT), *bad], capture_output=True,
                             text=True, timeout=60, check=False)
        assert run.returncode == 2, (bad, run.returncode, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, (bad, run.stderr)
        assert "error" in run.stderr
