"""Smoke test of bench/subblock_writes.py on a few writes: the JSON's shape and the counter
of /proc/self/io (the requested lengths, give or take a page the process writes meanwhile).
The device-side figure is device-wide and noisy, so only its presence is checked; the
headline is in bench/RESULTS.md."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "subblock_writes.py"


def test_counts_and_json(tmp_path):
    out = tmp_path / "sub.json"
    run = subprocess.run([sys.executable, str(SCRIPT), "--dir", str(tmp_path), "--writes", "64",
                          "--reps", "1", "--sizes", "1024,4096", "--json", str(out)],
                         capture_output=True, text=True, timeout=120)
    if run.returncode and ("block device" in run.stderr or "O_DIRECT" in run.stderr):
        pytest.skip(run.stderr.strip().splitlines()[-1])
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "subblock_writes" and len(doc["runs"]) == 2
    # the counter is the whole process's: a stray page written meanwhile (a clean clone's
    # first run writes bytecode caches) adds 4096 / 64 = 64 B per write
    for size in (1024, 4096):
        assert size <= doc["summary"][str(size)]["counted_per_write"] < size + 256
    assert all(r["device_per_write"] >= 0 for r in doc["runs"])


def test_bad_sizes_are_usage_errors():
    run = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "1000"], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 2 and "multiple of 512" in run.stderr
