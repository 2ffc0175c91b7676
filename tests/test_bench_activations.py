"""Smoke test of bench/activations.py: it runs, and what it must always hold holds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "activations.py"


def test_quick_run(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "acts.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--swap-dir", str(tmp_path),
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    s = doc["summary"]
    for key in ("peak_rss_ratio_at_longest", "step_time_ratio", "losses_equal"):
        assert key in s, key
    assert s["losses_equal"] is True
    for r in doc["results"]:
        # the tier wrote what it took and read it back once (no read amplification)
        assert r["activation_bytes_written_per_step"] > 0
        assert r["activation_bytes_read_per_step"] <= r["activation_bytes_written_per_step"]
        assert r["tensors_per_step"] > 0 and r["tier_peak_live_bytes"] > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("acts-")] == []


def test_bad_arguments_exit_with_usage_error():
    run = subprocess.run([sys.executable, str(SCRIPT), "--seqs", "a,b"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--seqs" in run.stderr
