"""Smoke test of bench/io_throughput.py: a tiny run completes and reports sane numbers."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from memascend.engine import probe_backends

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "io_throughput.py"


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.mark.skipif(not probe_backends()["uring"][0], reason="io_uring backend unavailable")
def test_quick_tiny_run(tmp_path):
    out = tmp_path / "io.json"
    work = tmp_path / "swap"
    work.mkdir()
    with_fio = shutil.which("fio") is not None
    cmd = [sys.executable, str(SCRIPT), "--quick", "--reps", "1", "--total", "64MiB",
           "--no-deepspeed", "--no-thp", "--dir", str(work), "--json", str(out)]
    if not with_fio:
        cmd.append("--no-fio")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert list(work.iterdir()) == []  # the swap file is gone
    doc = json.loads(out.read_text())
    s = doc["summary"]
    for comp in ("uring", "threads"):
        for key in (f"{comp}_read_vs_fio", f"{comp}_write_vs_fio", f"{comp}_cpu_s_per_gib"):
            assert key in s, key
        assert _positive(s[f"{comp}_cpu_s_per_gib"])
        for op in ("read", "write"):
            ratio = s[f"{comp}_{op}_vs_fio"]
            assert _positive(ratio) if with_fio else ratio is None
    # the summary is recomputed from the raw per-repetition numbers, not copied from anywhere
    for op in ("read", "write"):
        ratios = [c["competitors"]["uring"][op]["mib_s"] / c["competitors"]["fio"][op]["mib_s"]
                  for c in doc["raw"]] if with_fio else []
        want = statistics.median(ratios) if ratios else None
        assert s[f"uring_{op}_vs_fio"] == pytest.approx(want) if ratios else \
            s[f"uring_{op}_vs_fio"] is None
        for c in doc["raw"]:  # bandwidth is bytes over wall time
            ph = c["competitors"]["uring"][op]
            assert ph["bytes"] == 64 << 20
            assert ph["mib_s"] == pytest.approx(ph["bytes"] / 2**20 / ph["wall_s"])
    cpu = [sum(c["competitors"]["uring"][op]["cpu_s"] for op in ("read", "write"))
           / (2 * (64 << 20) / 2**30) for c in doc["raw"]]
    assert s["uring_cpu_s_per_gib"] == pytest.approx(statistics.median(cpu))
    assert s["uring_meets_cpu_goal"] is None  # no DeepSpeed numbers to compare with
    assert s["uring_meets_goal"] is None
    assert s["uring_meets_throughput_goal"] is (None if not with_fio else
                                                (s["uring_read_vs_fio"] >= 0.95 and
                                                 s["uring_write_vs_fio"] >= 0.95))
    assert doc["skipped"]["deepspeed"] == "--no-deepspeed"
    assert doc["skipped"]["uring-thp"] == "--no-thp"
    assert doc["total_bytes"] == 64 << 20 and doc["reps"] == 1
    assert len(doc["raw"]) == 4  # 2 request sizes x 2 queue depths
    for cell in doc["raw"]:
        for comp in ("uring", "threads"):
            res = cell["competitors"][comp]
            assert res["verified"] is True
            assert _positive(res["write"]["mib_s"]) and _positive(res["read"]["mib_s"])
            st = res["engine"]["stats"]
            assert st["errors"] == 0 and st["bytes_written"] == st["bytes_read"] == 64 << 20
            assert res["engine"]["backend"] == comp
    assert "uring" in run.stdout and "summary:" in run.stdout and "goal" in run.stdout
    assert "rep 1/1" in run.stderr and "rep 1/1" not in run.stdout


@pytest.mark.parametrize("args, word", [(["--reps", "0"], "--reps"),
                                        (["--total", "3MiB"], "--total"),
                                        (["--dir", "/no/such/dir"], "--dir")])
def test_bad_arguments_exit_nonzero(args, word):
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and word in lines[0], run.stderr


def test_remove_stale_dirs(tmp_path):
    spec = importlib.util.spec_from_file_location("io_throughput_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    dead = tmp_path / "memascend-io-999999999-abc"  # above any pid_max: no such process
    alive = tmp_path / f"memascend-io-{os.getpid()}-abc"
    other = tmp_path / "memascend-io-xyz"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "io_throughput-x.swap").write_bytes(b"x")
    mod.remove_stale_dirs(str(tmp_path))
    assert not dead.exists() and alive.exists() and other.exists()
