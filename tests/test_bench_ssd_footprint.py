"""Smoke test of bench/ssd_footprint.py: the offload_model part on a tiny LLaMA, and the
drop-in part's skip without DeepSpeed's prebuilt ops. The headline numbers (134m) are in
bench/RESULTS.md; here only the JSON's shape and that the footprint was measured."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "ssd_footprint.py"


def test_plain_run_and_skipped_dropin(tmp_path):
    out = tmp_path / "ssd.json"
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "no-ops"))
    run = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny", "--steps", "2",
                          "--seq", "32", "--dir", str(tmp_path), "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "ssd_footprint" and "not built" in doc["dropin_skipped"]
    plain = doc["plain"]
    assert plain["swap_stored_max"] > 0 and plain["write_bytes_per_step"] > 0
    assert plain["swap_area_max"] >= plain["swap_stored_max"]
    per = plain["per_area"]
    assert set(per) == {"params", "optim"} and all(v["area"] >= v["stored"] > 0
                                                    for v in per.values())
    assert sum(v["area"] for v in per.values()) == plain["swap_area_max"]
    commit = doc["plain_commit"]
    assert commit["options"] == {"exact_undo": False, "accumulation_steps": 1}
    s = doc["summary"]
    assert s["swap_area_ratio"] == max(plain["swap_area_ratio"], commit["swap_area_ratio"])
    assert s["plain_losses_equal"] is True
    assert s["pairs_ok"] == 0 and s["dropin_write_ratio"] is None
    assert not list(tmp_path.glob("memascend-ssd-plain-*"))  # work folders removed


def test_bad_arguments_are_usage_errors():
    run = subprocess.run([sys.executable, str(SCRIPT), "--pairs", "0"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 2 and "--pairs" in run.stderr
