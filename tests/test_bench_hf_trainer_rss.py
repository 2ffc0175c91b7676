"""Smoke test of bench/hf_trainer_rss.py: HF Trainer with stock swappers vs ``memascend run``.

The skip path always runs (no prebuilt op: exit 0, ``skipped`` in the JSON, the reason named);
a one-pair run of the tiny LLaMA preset runs when DeepSpeed's prebuilt ``async_io`` op and
libaio are here (``make ds-ops``), and checks the JSON's shape, that the peaks are positive and
that both systems gave the same losses.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "hf_trainer_rss.py"
EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR",
                         os.path.expanduser("~/.cache/memascend-torch-ext"))


def test_skips_cleanly_without_the_prebuilt_op(tmp_path):
    out = tmp_path / "hf.json"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "no-ops"))
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", "llama-tiny", "--json",
                          str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "hf_trainer_rss" and doc["skipped"]
    assert "skipped" in run.stdout


def test_an_unknown_model_is_a_usage_error():
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", "no-such-model"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "no-such-model" in run.stderr


def test_quick_run(tmp_path):
    sys.path.insert(0, str(REPO))
    try:
        from bench.hf_trainer_rss import stock_unavailable
    finally:
        sys.path.remove(str(REPO))
    why = stock_unavailable(EXT_DIR)
    if why:
        pytest.skip(why)
    out = tmp_path / "hf.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", "llama-tiny", "--pairs", "1",
                          "--steps", "3", "--seq", "32", "--dir", str(tmp_path), "--json",
                          str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert s["pairs_ok"] == 1 and s["losses_equal"] is True, doc["runs"]
    assert s["stock_peak_rss_bytes"] > 0 and s["memascend_peak_rss_bytes"] > 0
    assert 0 < s["rss_ratio"] < 10
