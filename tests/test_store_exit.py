"""Writes still queued when the interpreter exits are started and land when the store is
closed at exit (the store's executor refuses work by then): none hangs, none is lost."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memascend.store import SwapStore

CHILD = r"""
import atexit, sys, time
sys.path.insert(0, sys.argv[3])
from memascend.engine import SwapEngine
from memascend.store import SwapStore
MIB = 1 << 20
def fault(op, path, offset, nbytes, done, res):
    if op == "write":
        time.sleep(0.05)
    return res
eng = SwapEngine(backend="threads", threads=4, fault=fault)
store = SwapStore(sys.argv[1], engine=eng, durable=False, write_window=int(sys.argv[2]),
                  reset=True)
keep = []
for value in (0, 7):
    for i in range(8):
        lease = store.pool.lease(MIB)
        lease.memoryview()[:] = bytes([value]) * MIB
        keep.append(lease)
        h = store.write(f"k{i}", lease)
        if value == 0:
            h.wait(30)
atexit.register(store.close)  # the overwrites are neither waited for nor closed before exit
"""


@pytest.mark.parametrize("window", [0, 1 << 40])
def test_queued_writes_land_when_the_store_closes_at_exit(tmp_path, window):
    path = str(tmp_path / "s")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", CHILD, path, str(window), repo],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    with SwapStore(path, durable=False) as store:
        for i in range(8):
            assert set(store.read_tensor(f"k{i}").wait(30).numpy().tobytes()) == {7}
