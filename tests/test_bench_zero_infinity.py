"""Smoke test of bench/zero_infinity.py: a tiny LLaMA, one repetition, one timed step.

Runs the benchmark as a script (two child trainings: stock DeepSpeed with its prebuilt libaio
``async_io`` op, and memascend) and checks the shape of the JSON and that the numbers are
positive. Skipped, with the reason, when DeepSpeed, transformers, libaio or the prebuilt ops
are missing (the benchmark itself would skip; a JIT build takes ~9 min).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "zero_infinity.py"
EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR",
                         os.path.expanduser("~/.cache/memascend-torch-ext"))


def _why_not() -> str | None:
    sys.path.insert(0, str(REPO))
    try:
        from bench.zero_infinity import missing
    finally:
        sys.path.remove(str(REPO))
    return missing(EXT_DIR, "cpu_adam")


def test_skips_cleanly_without_the_prebuilt_op(tmp_path):
    out = tmp_path / "zi.json"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "no-ops"))
    run = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=60, check=False)
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "zero_infinity"
    assert doc["skipped"]
    assert "skipped" in run.stdout


def test_bad_arguments_exit_2(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--models", "nope"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert "--models" in run.stderr
    for bad in ("{x", "[1]"):
        run = subprocess.run([sys.executable, str(SCRIPT), "--memascend-options", bad],
                             capture_output=True, text=True, timeout=60, check=False)
        assert run.returncode == 2, bad
        assert "--memascend-options" in run.stderr


def test_tiny_run_json_shape(tmp_path):
    why = _why_not()
    if why is not None:
        pytest.skip(why)
    out = tmp_path / "zi.json"
    swap_parent = tmp_path / "swap"
    swap_parent.mkdir()
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=EXT_DIR)
    run = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--settings", "tuned",
                          "--reps", "1", "--steps", "1", "--warmup", "1", "--dir",
                          str(swap_parent), "--json", str(out),
                          "--memascend-options", '{"checksum": "none"}'],
                         capture_output=True, text=True, env=env, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert "skipped" not in doc
    for key in ("command", "date", "machine", "config", "configs", "runs", "by_config",
                "summary"):
        assert key in doc, key
    assert doc["config"]["memascend_options"] == {"checksum": "none"}
    s = doc["summary"]
    assert s["pairs"] == 1
    for key in ("peak_rss_ratio", "step_time_ratio", "peak_vmlck_ratio", "swap_bytes_ratio"):
        assert s[key] > 0, key
    assert s["losses_equal"] is True  # same seed, same data: same losses on both systems
    assert {r["system"] for r in doc["runs"]} == {"stock", "memascend"}
    for r in doc["runs"]:
        assert "failed" not in r, r.get("stderr_tail")
        assert r["swap_dir_removed"]
        for key in ("peak_rss", "peak_vmlck", "step_time_s", "read_bytes_per_step",
                    "write_bytes_per_step", "swap_bytes_per_step", "wall_s"):
            assert r[key] > 0, (r["system"], key)
        assert len(r["steps"]) == 1
    entry = doc["by_config"]["tiny tuned"]
    assert entry["stock"]["breakdown"]["param_swapper"] == "AsyncPartitionedParameterSwapper"
    assert entry["memascend"]["breakdown"]["param_swapper"] == "MemAscendParamSwapper"
    assert list(swap_parent.iterdir()) == []  # every swap folder removed
    assert "summary" in run.stdout
