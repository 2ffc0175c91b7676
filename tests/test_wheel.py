"""The package as users get it: a wheel built from this tree, installed into a fresh virtual
environment outside the source tree, runs ``memascend info`` and ``memascend profile estimate
--model llama2-7b --json`` (the model presets are package data, the native core is inside).

The fresh environment gets the wheel only; its dependencies (torch, numpy, cffi, psutil) come
from the test's own environment through a path entry, so nothing is downloaded. The test
checks that the ``memascend`` it runs is the installed one, not this checkout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-2000:]}\n"
                             f"{r.stderr[-3000:]}")
    return r.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict[str, str], Path]:
    for mod in ("setuptools", "wheel", "cffi"):
        pytest.importorskip(mod, reason=f"building the wheel needs {mod} (make install has it)")
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "MEMASCEND_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # a copy of the sources, as a clean clone has them: no build/ left over from an earlier
    # build (setuptools would pack what is there), no compiled library, no virtualenv
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "_lib*.so", "_lib.c", "_lib.o",
        ".hypothesis", ".pytest_cache", "out", "*.swp"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
          "-w", str(tmp / "dist"), str(src)], cwd=tmp, env=env)
    wheels = list((tmp / "dist").glob("memascend-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp, env=env)
    vpy = venv / "bin" / "python"
    site = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp, env=env).strip())
    # install the wheel with this environment's pip into the fresh one, no index, no deps
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
          "--target", str(site), str(wheels[0])], cwd=tmp, env=env)
    # dependencies from here (a plain path entry: this environment's .pth files, such as an
    # editable install of this checkout, are not processed through it)
    (site / "zz_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return vpy, env, site


def test_installed_wheel_is_what_runs(installed, tmp_path):
    vpy, env, site = installed
    where = _run([str(vpy), "-c", "import memascend, memascend._native._lib as n; "
                  "print(memascend.__file__); print(n.__file__)"], cwd=tmp_path, env=env)
    for line in where.split():
        assert line.startswith(str(site)), where
        assert str(REPO) not in line


def test_installed_wheel_runs_info_and_estimate(installed, tmp_path):
    vpy, env, site = installed
    info = _run([str(vpy), "-m", "memascend.cli", "info"], cwd=tmp_path, env=env)
    assert "memascend" in info.lower()
    out = _run([str(vpy), "-m", "memascend.cli", "profile", "estimate", "--model", "llama2-7b",
                "--json"], cwd=tmp_path, env=env)
    report = json.loads(out)
    assert report  # a non-empty estimate for the preset shipped inside the wheel
    script = site / "bin" / "memascend"  # where pip --target puts the console script
    if script.exists():  # it runs the same entry point
        _run([str(vpy), str(script), "info"], cwd=tmp_path, env=env)
