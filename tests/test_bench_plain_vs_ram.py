"""Smoke test of bench/plain_vs_ram.py: it runs, and what it must always hold holds."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "plain_vs_ram.py"


def test_quick_run(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "plain.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--swap-dir", str(tmp_path),
                          "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    s = doc["summary"]
    for key in ("step_time_ratio", "ssd_bytes_per_param", "steady_state_new_mappings",
                "losses_equal", "crc32c_bytes_per_s_per_core", "disk"):
        assert key in s, key
    assert s["losses_equal"] is True
    assert s["steady_state_new_mappings"] == 0
    # fp32, declared accumulation 1: p read (forward; backward when evicted), m and v read;
    # p, m and v written: no gradient leaves backward
    assert 12 <= s["ssd_bytes_per_param"] <= 28.5
    cfg = doc["results"][0]["summary"]
    assert cfg["offload_stats_last"]["paths"]["fused_commits"] == 3
    assert cfg["io_bound_s"] > 0 and cfg["bound_ratio"] >= 1.0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("plain-")] == []


def test_bad_configuration_exits_with_usage_error():
    run = subprocess.run([sys.executable, str(SCRIPT), "--configs", "99b-1x1"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "99b-1x1" in run.stderr
