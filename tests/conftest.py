"""Shared fixtures: pools that are always closed; small loop-mounted filesystems; no tuned file.

Swap stores grow with the default step (256 MiB, bounded by the free space) as users' do;
tests that want a small step say so with ``grow_bytes=``.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess

import pytest

# A tuned file of this machine (``memascend tune``) must not change what tests measure: every
# test, and every process a test starts, runs with the built-in defaults unless it says
# otherwise (tests/test_tune.py points MEMASCEND_TUNED at files of its own).
os.environ["MEMASCEND_TUNED"] = "off"

from memascend import PinnedPool  # noqa: E402


@pytest.fixture
def make_pool():
    """Factory for pools that the test tears down (releasing stragglers first)."""
    pools: list[PinnedPool] = []

    def make(**kw):
        pool = PinnedPool(**kw)
        pools.append(pool)
        return pool

    yield make
    import gc

    gc.collect()
    for pool in pools:
        pool.close()


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60)


def need_root(*tools: str) -> None:
    """Skip unless running as root with ``tools`` installed."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount / losetup)")
    for t in tools:
        if not shutil.which(t):
            pytest.skip(f"{t} not installed")


@contextlib.contextmanager
def loop_ext4(folder, size: int):
    """An ext4 filesystem of ``size`` bytes loop-mounted under ``folder`` (skips unless root
    can make and mount one here)."""
    need_root("mkfs.ext4", "mount", "umount")
    img, mnt = folder / "fs.img", folder / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(size)
    r = _run("mkfs.ext4", "-q", "-F", str(img))
    if r.returncode:
        pytest.skip(f"mkfs.ext4 failed: {r.stderr.strip()}")
    r = _run("mount", "-o", "loop", str(img), str(mnt))
    if r.returncode:
        pytest.skip(f"cannot loop-mount here: {r.stderr.strip()}")
    try:
        yield str(mnt)
    finally:
        _umount(str(mnt))


@pytest.fixture
def small_ext4(tmp_path):
    """A 32 MiB ext4 filesystem on a loop mount."""
    with loop_ext4(tmp_path, 32 << 20) as mnt:
        yield mnt


def _umount(mnt: str) -> None:
    """Unmount, waiting for the kernel to drop files of a killed process (an io_uring
    instance is torn down asynchronously after its process dies); lazily as a last resort."""
    import time

    for _ in range(50):
        if _run("umount", mnt).returncode == 0:
            return
        time.sleep(0.1)
    _run("umount", "-l", mnt)


