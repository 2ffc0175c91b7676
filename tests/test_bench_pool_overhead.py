"""Smoke test of bench/pool_overhead.py: it runs, and its headline numbers hold."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "pool_overhead.py"


def test_quick_run_reports_overheads(tmp_path):
    out = tmp_path / "pool_overhead.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    summary = doc["summary"]
    for key in ("memascend_max_overhead", "pow2_max_overhead", "deepspeed_fixed_max_overhead"):
        assert key in summary
    assert 1.0 <= summary["memascend_max_overhead"] <= 1.01
    assert summary["pow2_max_overhead"] >= 1.0
    assert summary["deepspeed_fixed_max_overhead"] >= 1.0
    assert [m["model"] for m in doc["models"]] == ["llama-tiny", "llama-1b"]
    for m in doc["models"]:
        ma = m["allocators"]["memascend"]
        assert ma["requested_peak"] == m["trace"]["requested_peak"]
        assert ma["reserved_after"] == 0
    assert len(doc["timing"]["results"]) == 4
    assert "memascend" in run.stdout and "summary" in run.stdout


def test_bad_arguments_exit_nonzero():
    run = subprocess.run([sys.executable, str(SCRIPT), "--models", "no-such-model"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "no-such-model" in run.stderr
