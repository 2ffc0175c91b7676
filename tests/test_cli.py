"""The ``memascend`` command: info and demo, human and --json output, exit codes."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memascend.cli import main


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memascend.cli", *args], capture_output=True,
                          text=True, timeout=120)


def test_info_json_reports_the_machine():
    proc = _run("info", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["native"]["built"] is True
    assert info["memlock"]["mlock_works"] in (True, False)
    assert isinstance(info["memory"]["physical_bytes"], int) and info["memory"]["physical_bytes"] > 0
    with open("/proc/sys/kernel/io_uring_disabled") as f:
        assert info["io_uring"]["sysctl_io_uring_disabled"] == int(f.read())
    from memascend.engine import SwapEngine

    with SwapEngine() as eng:
        assert info["engine"]["auto_backend"] == eng.backend
    assert info["engine"]["backends"]["threads"]["available"] is True


def test_info_human(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "memlock limit" in out and "native core" in out


def test_demo_selfcheck_json():
    proc = _run("demo", "--selfcheck", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)["pool_selfcheck"]
    assert res["ok"] is True
    assert all(res["checks"].values())
    assert res["overhead"] < 1.02


def test_bad_arguments_exit_2():
    proc = _run("info", "--frobnicate")
    assert proc.returncode == 2
    proc = _run("nosuchcommand")
    assert proc.returncode == 2


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "memascend")
    if not os.path.exists(exe):
        pytest.skip("console script not installed in this environment")
    proc = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "memascend" in proc.stdout


def test_presets_are_package_data_and_help_is_plain_text():
    """The model presets ship inside the package (``pip install`` then ``profile estimate
    --model llama2-7b`` works outside the source tree); ``--help`` has no RST markup."""
    import importlib.resources
    import subprocess
    import sys
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    from memascend.shapes import PRESET_DIR, available_presets

    pkg = importlib.resources.files("memascend")
    assert (pkg / "presets" / "llama2-7b.json").is_file()
    assert Path(str(pkg)) in PRESET_DIR.parents and "llama2-7b" in available_presets()
    root = Path(__file__).resolve().parent.parent
    with open(root / "pyproject.toml", "rb") as f:
        data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["memascend"]
    assert "presets/*.json" in data
    out = subprocess.run([sys.executable, "-m", "memascend.cli", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "``" not in out.stdout
