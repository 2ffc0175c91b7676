"""``memascend tune`` and the tuned file: measured on a small file, saved, and applied by
``SwapEngine()`` / ``PinnedPool()`` below explicit arguments and the environment."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memascend import PinnedPool, SwapEngine, tune
from memascend.errors import ConfigError

CLI = [sys.executable, "-m", "memascend.cli"]


def _tune(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, MEMASCEND_TUNED=str(tmp_path / "tuned.json"))
    return subprocess.run([*CLI, "tune", "--quick", "--size", "16MiB", "--swap-dir",
                           str(tmp_path / "swap"), *extra], capture_output=True, text=True,
                          env=env, timeout=300)


def test_tune_saves_the_best_and_engines_use_it(tmp_path, monkeypatch):
    run = _tune(tmp_path, "--json")
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    best = doc["best"]
    assert best["score"] == max(t["score"] for t in doc["trials"]) > 0
    assert {t["backend"] for t in doc["trials"]} >= {"threads"}
    assert doc["saved_to"] == str(tmp_path / "tuned.json")
    assert not (tmp_path / "swap").exists()  # the scratch file and the folder made for it

    monkeypatch.setenv("MEMASCEND_TUNED", str(tmp_path / "tuned.json"))
    eng = SwapEngine()
    try:
        assert eng.backend == best["backend"]
        assert eng.config.queue_depth == best["queue_depth"]
        assert eng.config.chunk_bytes == best["chunk_bytes"]
    finally:
        eng.close()
    pool = PinnedPool()
    assert pool.config.huge_pages == best["huge_pages"]
    pool.close()
    # precedence: an explicit argument, then the environment, then the tuned file
    eng = SwapEngine(queue_depth=7)
    assert eng.config.queue_depth == 7
    eng.close()
    monkeypatch.setenv("MEMASCEND_ENGINE_QUEUE_DEPTH", "5")
    eng = SwapEngine()
    assert eng.config.queue_depth == 5 and eng.config.chunk_bytes == best["chunk_bytes"]
    eng.close()
    monkeypatch.delenv("MEMASCEND_ENGINE_QUEUE_DEPTH")
    # memascend info names the file in effect
    info = subprocess.run([*CLI, "info", "--json"], capture_output=True, text=True,
                          env=dict(os.environ), timeout=120)
    tuned = json.loads(info.stdout)["tuned"]
    assert tuned["in_effect"] and tuned["path"] == str(tmp_path / "tuned.json")
    assert tuned["settings"]["engine"]["queue_depth"] == best["queue_depth"]
    # off: the built-in defaults
    monkeypatch.setenv("MEMASCEND_TUNED", "off")
    eng = SwapEngine()
    assert eng.config.queue_depth == 32 and eng.config.chunk_bytes == 16 << 20
    eng.close()


def test_table_output_and_dry_run(tmp_path):
    run = _tune(tmp_path, "--dry-run")
    assert run.returncode == 0, run.stderr
    assert "best: backend" in run.stdout and "write MB/s" in run.stdout
    assert not (tmp_path / "tuned.json").exists()


@pytest.mark.parametrize("content, needle", [
    ("{not json", "cannot read the tuned file"),
    (json.dumps({"version": 1, "settings": {"engine": {"queue_dept": 8}}}),
     "unknown setting engine.queue_dept"),
    (json.dumps({"version": 99, "settings": {}}), "not a memascend tuned file"),
])
def test_a_bad_tuned_file_is_a_config_error_naming_it(tmp_path, monkeypatch, content, needle):
    path = tmp_path / "tuned.json"
    path.write_text(content)
    monkeypatch.setenv("MEMASCEND_TUNED", str(path))
    with pytest.raises(ConfigError, match=needle) as err:
        SwapEngine()
    assert str(path) in str(err.value)


def test_bad_sizes_and_a_folder_without_o_direct(tmp_path):
    with pytest.raises(ConfigError, match="at least the largest request"):
        tune.measure(str(tmp_path), 1 << 20)
    run = _tune(tmp_path, "--size", "lots")
    assert run.returncode == 2 and len(run.stderr.strip().splitlines()) == 1
    if os.path.isdir("/dev/shm"):
        try:
            fd = os.open(f"/dev/shm/.memascend-odirect-{os.getpid()}",
                         os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600)
        except OSError:
            run = subprocess.run([*CLI, "tune", "--quick", "--size", "16MiB", "--dry-run",
                                  "--swap-dir", f"/dev/shm/memascend-tune-{os.getpid()}"],
                                 capture_output=True, text=True, timeout=120)
            assert run.returncode == 2 and "does not support O_DIRECT" in run.stderr
        else:
            os.close(fd)
            os.unlink(f"/dev/shm/.memascend-odirect-{os.getpid()}")


def test_the_drop_in_uses_the_tuned_file_unless_the_config_has_an_aio_block(tmp_path,
                                                                              monkeypatch):
    from memascend.integrations.deepspeed.runtime import Options, Runtime

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"version": 1, "settings": {
        "engine": {"backend": "threads", "queue_depth": 12, "chunk_bytes": 2 << 20}}}))
    monkeypatch.setenv("MEMASCEND_TUNED", str(path))
    aio = {"queue_depth": 8, "chunk_bytes": 1 << 20}  # DeepSpeed's defaults, or the user's
    for given, want in ((False, ("threads", 12, 2 << 20)), (True, ("threads", 8, 1 << 20))):
        rt = Runtime(Options(), aio, "off", aio_given=given)
        try:
            got = (rt.engine.backend, rt.engine.config.queue_depth, rt.engine.config.chunk_bytes)
            assert got == want, (given, got)
        finally:
            rt.close()
    rt = Runtime(Options(backend="threads"), aio, "off", aio_given=False)
    try:  # an explicit backend is passed on as such (it would win over the file)
        assert rt.engine.config.backend == "threads" and rt.engine.config.queue_depth == 12
    finally:
        rt.close()
