"""A writer killed with SIGKILL in the middle of writes loses nothing that was stored.

The child overwrites a set of keys with numbered versions as fast as it can; every version's
bytes are a function of (key, version), and the version is in its first 8 bytes. The parent
kills it at several moments, reopens the store, and checks that every key reads back (checksum
verified) as one complete version — old or new, never torn.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest

from memascend.store import SwapStore

HERE = os.path.dirname(os.path.abspath(__file__))


def content(key: str, version: int) -> bytes:
    """The bytes of ``version`` of ``key`` (shared with the child through this file)."""
    rng = np.random.default_rng(zlib.crc32(f"{key}:{version}".encode()))
    n = 100_000 + (int(key[1:]) * 37_337) % 300_000
    a = rng.integers(0, 256, n, dtype=np.uint8)
    a[:8] = np.frombuffer(np.int64(version).tobytes(), dtype=np.uint8)
    return a.tobytes()


CHILD = r"""
import sys
sys.path.insert(0, sys.argv[2])
from test_store_crash import content
import memascend.store_space
if sys.argv[5] == "1":  # split keys over small holes too (these keys are under 1 MiB)
    memascend.store_space.SPAN_MIN = 4096
from memascend.store import SwapStore
store = SwapStore(sys.argv[1], grow_bytes="4MiB", durable=sys.argv[3] == "1",
                  write_window=int(sys.argv[4]))
v = 0
while True:
    v += 1
    hs = [store.write(f"k{i}", content(f"k{i}", v)) for i in range(8)]
    for h in hs:
        h.wait(30)
    if v == 1:
        print("ready", flush=True)
"""


@pytest.mark.parametrize("durable,window,split", [(True, 32 << 20, False), (False, 32 << 20, False),
                                                  (False, 0, False), (False, 0, True)])
@pytest.mark.parametrize("delay", [0.02, 0.3, 0.9])
def test_sigkill_mid_write(tmp_path, delay, durable, window, split):
    """Durable stores reuse an old extent after a sync; non-durable ones as soon as the
    record of its replacement is appended (with ``write_window=0`` writes also wait in the
    store's queue for that room, and with ``split`` keys are also placed over several
    holes): all survive a kill with every key whole."""
    path = str(tmp_path / "swap")
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, HERE, "1" if durable else "0",
                              str(window), "1" if split else "0"],
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "ready", child.stderr.read()[-2000:]
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    with SwapStore(path) as store:
        assert sorted(store.keys()) == [f"k{i}" for i in range(8)]
        versions = []
        for key in store.keys():
            data = store.read_tensor(key).wait(30).numpy().tobytes()
            version = int(np.frombuffer(data[:8], dtype=np.int64)[0])
            assert version >= 1
            assert data == content(key, version), f"{key} version {version} is torn"
            versions.append(version)
    # and the store is healthy after the crash: it takes new writes and reopens again
    with SwapStore(path) as store:
        store.write("k0", content("k0", 10_000)).wait(30)
    with SwapStore(path) as store:
        assert store.read_tensor("k0").wait(30).numpy().tobytes() == content("k0", 10_000)
