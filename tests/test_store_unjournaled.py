"""A scratch store without a journal (``journal=False``): no record per write, the table
written at close, and a store that was not closed refuses to reopen except with reset."""
from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from memascend.errors import ConfigError, MetadataError
from memascend.store import SwapStore

MIB = 1 << 20


def journal_bytes(path):
    j = os.path.join(path + ".meta", "journal.log")
    return os.path.getsize(j) if os.path.exists(j) else 0


def test_no_record_per_write_and_the_table_survives_a_close(tmp_path):
    path = str(tmp_path / "s")
    with SwapStore(path, durable=False, journal=False, reset=True) as store:
        for rnd in range(3):
            for i in range(8):
                store.write(f"k{i}", torch.full((MIB // 4,), float(rnd + i))).wait(30)
        store.delete("k7")
        store.rename("k6", "six")
        assert journal_bytes(path) == 0
    with SwapStore(path, durable=False, journal=False) as store:  # closed: trusted
        assert sorted(store.keys()) == sorted([f"k{i}" for i in range(6)] + ["six"])
        assert torch.equal(store.read_tensor("k3").wait(30), torch.full((MIB // 4,), 5.0))
        assert torch.equal(store.read_tensor("six").wait(30), torch.full((MIB // 4,), 8.0))
    with SwapStore(path) as store:  # and a journaled store opens it too
        assert torch.equal(store.read_tensor("k0").wait(30), torch.full((MIB // 4,), 2.0))
        store.write("k0", torch.zeros(4)).wait(30)
        assert journal_bytes(path) > 0


CHILD = r"""
import sys, time, torch
sys.path.insert(0, sys.argv[2])
from memascend.store import SwapStore
store = SwapStore(sys.argv[1], durable=False, journal=False, reset=True)
store.write("k", torch.ones(1024)).wait(30)
print("ready", flush=True)
time.sleep(60)
"""


def test_a_store_killed_open_refuses_to_reopen_but_with_reset(tmp_path):
    path = str(tmp_path / "s")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen([sys.executable, "-c", CHILD, path, repo], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read()[-2000:]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    with pytest.raises(MetadataError, match="journal=False.*reset=True"):
        SwapStore(path, durable=False)
    with SwapStore(path, durable=False, journal=False, reset=True) as store:
        assert len(store) == 0


def test_without_a_journal_the_store_cannot_be_durable():
    with pytest.raises(ConfigError, match="journal"):
        SwapStore("/nonexistent/x", journal=False)


def test_a_copy_of_an_open_unjournaled_store_is_not_imported(tmp_path):
    import shutil

    path = str(tmp_path / "s")
    with SwapStore(path, durable=False, journal=False, reset=True) as store:
        store.write("k", torch.ones(1024)).wait(30)
        shutil.copy(path, str(tmp_path / "copy"))  # a live copy: its snapshot is from open
        shutil.copytree(path + ".meta", str(tmp_path / "copy.meta"))
        os.remove(str(tmp_path / "copy.meta" / "lock"))
        with SwapStore(str(tmp_path / "t"), durable=False) as other:
            with pytest.raises(MetadataError, match="not an export"):
                other.import_from(str(tmp_path / "copy"))
