"""The training demo: it trains (the loss goes down), reports sizes that follow from the model,
and removes its swap directory on success, on bad input and on SIGINT/SIGTERM."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("transformers")

from memascend.demo import DemoOptions, model_config, run_demo  # noqa: E402
from memascend.errors import ConfigError  # noqa: E402

CLI = [sys.executable, "-m", "memascend.cli"]


def _leftovers(path):
    return [n for n in os.listdir(path) if n.startswith("memascend-demo-")]


def test_demo_trains_and_reports(tmp_path):
    r = run_demo(DemoOptions(model="tiny", steps=30, batch=4, seq_len=64, lr=3e-3,
                             swap_dir=str(tmp_path)))
    assert len(r.losses) == 30 and all(math.isfinite(x) for x in r.losses)
    assert r.losses[0] > 5.0  # ~ln(256) from random weights
    assert r.last_loss < r.first_loss - 1.0, r.losses
    n = r.model["parameters"]
    cfg = model_config("tiny")
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    assert n == 2 * 256 * h + h + layers * (4 * h * h + 3 * h * i + 2 * h)
    # fp32 compute: the parameter is the master (4 B); m and v 4 B each; the step is fused
    # into backward, so no gradient is stored
    assert r.ssd_state_bytes == 12 * n
    assert r.in_memory_state_bytes == 16 * n
    assert r.ssd_allocated_bytes >= r.ssd_state_bytes
    for tier in ("parameters", "optimizer"):
        assert 0 < r.pinned_peak_bytes[tier] <= r.budget_bytes[tier]
    assert r.peak_rss_bytes >= r.rss_before_model_bytes > 0
    assert r.bytes_read >= 29 * 8 * n  # every step after the first reads m and v
    assert _leftovers(tmp_path) == []


def test_demo_rejects_bad_options(tmp_path):
    with pytest.raises(ConfigError):
        DemoOptions(steps=0)
    with pytest.raises(ConfigError, match="no-such-model"):
        run_demo(DemoOptions(model="no-such-model", swap_dir=str(tmp_path)))
    # refused before anything is written, naming the module that could never be resident
    with pytest.raises(ConfigError, match="budget: 4096 bytes cannot hold the parameters of "
                                          "module model.layers.0.mlp.gate_proj"):
        run_demo(DemoOptions(model="tiny", steps=1, budget="4KiB", swap_dir=str(tmp_path)))
    assert _leftovers(tmp_path) == []


def test_cli_json(tmp_path):
    run = subprocess.run([*CLI, "demo", "--json", "--model", "tiny", "--steps", "2",
                          "--seq-len", "32", "--swap-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert len(doc["losses"]) == 2 and doc["ssd_state_bytes"] > 0
    assert doc["first_loss"] == pytest.approx(sum(doc["losses"]) / 2)
    assert _leftovers(tmp_path) == []


def test_cli_bad_input_is_one_line(tmp_path):
    for bad in (["--steps", "0"], ["--model", "no-such-model"], ["--budget", "lots"]):
        run = subprocess.run([*CLI, "demo", "--swap-dir", str(tmp_path), *bad],
                             capture_output=True, text=True, timeout=300, check=False)
        assert run.returncode == 2, (bad, run.stderr)
        assert len(run.stderr.strip().splitlines()) == 1, (bad, run.stderr)
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_removes_swap_files(tmp_path, sig):
    proc = subprocess.Popen([*CLI, "demo", "--model", "tiny", "--steps", "100000",
                             "--seq-len", "32", "--swap-dir", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until the swap files exist
            dirs = _leftovers(tmp_path)
            if dirs and os.path.exists(tmp_path / dirs[0] / "optim.swp"):
                break
            time.sleep(0.2)
        else:
            pytest.fail("the demo never created its swap files")
        time.sleep(1.0)  # into the training loop
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert _leftovers(tmp_path) == []


def test_cli_report_names_the_ssd_wear(tmp_path):
    """The human report says the bytes written per step and per 1,000 steps (endurance)."""
    run = subprocess.run([*CLI, "demo", "--model", "tiny", "--steps", "2", "--seq-len", "32",
                          "--swap-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    wear = [ln for ln in run.stdout.splitlines() if "SSD wear:" in ln]
    assert wear and "written per step" in wear[0] and "TB per 1,000 steps" in wear[0], run.stdout
    assert _leftovers(tmp_path) == []
