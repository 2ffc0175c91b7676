"""Smoke test of bench/fit_under_budget.py: a --quick run under a real memory cgroup (root),
the skip path for a user who cannot create cgroups, and one-line errors for bad arguments."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "fit_under_budget.py"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from bench._cgroup import CgroupUnavailable, cgroup_root  # noqa: E402
from bench._fit_report import analyse  # noqa: E402

SUMMARY_KEYS = ("state_to_ram_limit", "overlap_efficiency", "peak_rss_bytes", "goal_met",
                "cgroup_peak_bytes", "limit_bytes", "step_seconds", "bytes_moved_per_step",
                "io_bound_seconds", "compute_seconds", "disk_read_bytes_per_s",
                "disk_write_bytes_per_s")


def _cgroup_or_skip() -> str:
    try:
        return cgroup_root()[0]
    except CgroupUnavailable as exc:
        pytest.skip(f"no memory cgroup here: {exc}")
    except OSError as exc:
        pytest.skip(f"cannot probe cgroups: {exc}")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_run_under_a_memory_cgroup(tmp_path):
    cg_root = _cgroup_or_skip()
    # On disk, not /tmp: tmpfs pages would be charged to the cgroup, and swap files need
    # O_DIRECT.
    if shutil.disk_usage("/var/tmp").free < 6 << 30:
        pytest.skip("needs ~6 GiB free in /var/tmp for the quick model's swap files")
    swap = Path(tempfile.mkdtemp(prefix="fit-test-", dir="/var/tmp"))
    out = tmp_path / "fit.json"
    try:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "--quick", "--no-deepspeed",
                                 "--swap-dir", str(swap), "--json", str(out)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            stdout, stderr = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode == 0, stderr[-3000:]
        assert list(swap.iterdir()) == []  # the swap folder and its files are gone
    finally:
        shutil.rmtree(swap, ignore_errors=True)
    left = [n for n in os.listdir(cg_root) if n.startswith(f"memascend-fit-{proc.pid}-")]
    assert left == []  # every cgroup the run created is removed
    doc = json.loads(out.read_text())
    s = doc["summary"]
    for key in SUMMARY_KEYS:
        assert key in s, key
    limit = 1152 << 20
    assert s["limit_bytes"] == limit == doc["limit_bytes"]
    assert s["state_to_ram_limit"] >= 3
    assert s["state_to_ram_limit"] == pytest.approx(doc["state"]["in_memory_bytes"] / limit)
    assert doc["state"]["in_memory_bytes"] == 16 * doc["state"]["parameters"]
    assert _positive(s["peak_rss_bytes"]) and s["peak_rss_bytes"] < limit
    assert s["cgroup_peak_bytes"] is None or s["cgroup_peak_bytes"] <= limit
    for key in ("overlap_efficiency", "step_seconds", "bytes_moved_per_step", "io_bound_seconds",
                "compute_seconds", "disk_read_bytes_per_s", "disk_write_bytes_per_s"):
        assert _positive(s[key]), (key, s[key])
    # the compute estimate and the bandwidths are consistent with the run: no step beat its bound
    assert s["anomalies"] == [] and s["overlap_efficiency"] <= 1
    c = doc["compute"]
    assert c["serial_seconds"] == pytest.approx(c["forward_backward_s"] + c["adamw_s"])
    assert c["seconds"] == pytest.approx(max(c["forward_backward_s"], c["adamw_s"],
                                             c["cpu_seconds"] / c["cores"]))
    assert len(c["rounds"]) == 2 and all(len(r["forward_backward"]) == 1 for r in c["rounds"])
    assert c["forward_backward_s"] == min(x["seconds"] for r in c["rounds"]
                                          for x in r["forward_backward"])
    assert s["goal_met"] is (s["overlap_efficiency"] >= 0.8)
    run = doc["results"]["memascend"]
    assert run["status"] == "ok" and run["cgroup"]["oom_kills"] == 0
    assert run["peak_rss_bytes"] == s["peak_rss_bytes"]
    assert len(run["steps"]) == 2 and run["analysis"]["measured_steps"] == [2]
    step = run["steps"][1]
    # the summary is derived from the measured step, the bandwidths and the compute time
    bw = doc["bandwidth"]
    io = step["bytes_read"] / bw["read"] + step["bytes_written"] / bw["write"]
    assert s["io_bound_seconds"] == pytest.approx(io)
    assert s["overlap_efficiency"] == pytest.approx(max(io, s["compute_seconds"]) /
                                                    step["seconds"])
    assert s["bytes_moved_per_step"] == step["bytes_read"] + step["bytes_written"]
    # one step reads each parameter at least once (forward; recompute and backward may find
    # it resident; in fp32 it is its own master) and m and v once, and writes the new
    # weights and moments (the step is fused into backward: no gradient is read back)
    n = doc["state"]["parameters"]
    assert step["bytes_read"] >= n * 4 * (1 + 2)
    assert step["bytes_written"] >= n * 4 * 3
    assert doc["results"]["deepspeed"] == {"skipped": "--no-deepspeed"}
    assert doc["command"] and doc["machine"]["cores"] >= 1
    assert "memascend" in stdout and "goal" in stdout


BW = {"read": 1e9, "write": 1e9}


def _step(i, seconds, read=1e9, written=1e9):
    return {"step": i, "seconds": seconds, "bytes_read": read, "bytes_written": written}


def test_efficiency_is_bound_over_step_time():
    run = {"steps": [_step(1, 9.0), _step(2, 4.0), _step(3, 5.0)]}
    a = analyse(run, BW, compute_s=3.0)  # I/O bound 2 s, compute 3 s
    assert a["measured_steps"] == [2, 3] and a["anomalies"] == []
    assert [s["overlap_efficiency"] for s in run["steps"]] == [pytest.approx(3 / 9),
                                                               pytest.approx(3 / 4),
                                                               pytest.approx(3 / 5)]
    assert a["median_overlap_efficiency"] == pytest.approx((3 / 4 + 3 / 5) / 2)


@pytest.mark.parametrize("compute_s, read, needle", [
    (6.0, 1e9, "compute estimate 6.00 s exceeds the step time 4.00 s"),
    (1.0, 4e9, "I/O bound 5.00 s exceeds the step time 4.00 s"),
])
def test_a_step_faster_than_its_bound_is_an_anomaly_not_an_efficiency_above_1(
        compute_s, read, needle):
    run = {"steps": [_step(1, 9.0), _step(2, 4.0, read=read), _step(3, 8.0)]}
    a = analyse(run, BW, compute_s=compute_s)
    step = run["steps"][1]
    assert step["overlap_efficiency"] is None and step["bound_to_step"] > 1
    assert any(needle in x for x in step["anomalies"])
    assert a["median_overlap_efficiency"] is None
    assert a["anomalies"] and a["anomalies"][0].startswith("step 2: ")
    # the warm-up step is not judged
    run = {"steps": [_step(1, 1.0), _step(2, 9.0)]}
    assert analyse(run, BW, compute_s=3.0)["anomalies"] == []


@pytest.fixture
def open_dir():
    """A world-writable folder under /var/tmp (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="fit-test-", dir="/var/tmp"))
    d.chmod(0o777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_skips_with_a_reason_when_not_root(open_dir):
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or not setpriv:
        pytest.skip("needs root and setpriv to run the script as uid 65534")
    tmp_path = open_dir
    out = tmp_path / "skip.json"
    prefix = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
    probe = subprocess.run(prefix + [sys.executable, "-c", "import torch, memascend"],
                           capture_output=True, text=True, timeout=120, cwd="/")
    if probe.returncode != 0:
        pytest.skip(f"uid 65534 cannot run {sys.executable} with torch and memascend")
    run = subprocess.run(prefix + [sys.executable, str(SCRIPT), "--quick", "--swap-dir",
                                   str(tmp_path), "--json", str(out)],
                         capture_output=True, text=True, timeout=120, cwd="/")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("skipped: not root")
    doc = json.loads(out.read_text())
    assert doc["skipped"].startswith("not root")
    assert doc["summary"]["overlap_efficiency"] is None
    assert list(tmp_path.iterdir()) == [out]  # no swap folder was created


@pytest.mark.parametrize("args, needle", [
    (["--steps", "1"], "--steps: expected an integer >= 2"),
    (["--steps", "x"], "--steps: expected an integer >= 2"),
    (["--batch", "0"], "--batch: expected an integer >= 1"),
    (["--limit", "lots"], "--limit"),
    (["--limit", "1MiB"], "--limit: at least 256 MiB"),
    (["--budget", "-1"], "--budget"),
    (["--model", "no-such-model"], "--model"),
    (["--seq-len", "100000"], "--seq-len"),
    (["--swap-dir", "/nonexistent/dir"], "--swap-dir"),
    (["--json", "/nonexistent/dir/out.json"], "--json"),
    (["--timeout", "0"], "--timeout"),
    (["--bogus"], "unrecognized arguments"),
])
def test_bad_arguments_fail_with_one_line(args, needle):
    run = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("fit_under_budget.py: error: ") and needle in lines[0], lines[0]
    assert run.stdout == ""
