"""Faults in a store's metadata: nothing acknowledged is lost, damage is a typed error.

Failed and short journal appends (injected, and from a real full filesystem where root can
loop-mount one), an undo that fails too, a process killed afterwards, damaged journals and
manifests, a truncated area, close() on a full disk, and file modes.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import zlib

import pytest
import torch

from memascend import manifest as manifest_mod
from memascend.errors import MetadataError, SwapIOError
from memascend.store import SwapStore

HERE = os.path.dirname(os.path.abspath(__file__))


def value(key: str, version: int) -> torch.Tensor:
    """The tensor stored as ``version`` of ``key`` (version in element 0)."""
    t = torch.arange(2000, dtype=torch.float32) + zlib.crc32(key.encode()) % 1000
    t[0] = version
    return t


def check_versions(path: str, expected: dict[str, int]) -> None:
    with SwapStore(path) as store:
        assert sorted(store.keys()) == sorted(expected)
        for key, version in expected.items():
            assert torch.equal(store.read_tensor(key).wait(30), value(key, version)), key


# The child writes versions of keys through a store whose journal appends fail as the test
# says, prints what was acknowledged, and is killed before it can close the store cleanly.
CHILD = r"""
import errno, json, os, signal, sys
sys.path.insert(0, sys.argv[3])
from test_store_faults import value
from memascend import manifest as manifest_mod
from memascend.store import SwapStore
mode = sys.argv[2]
real_write, real_truncate = os.write, os.ftruncate
calls = {"n": 0}
def write(fd, data):
    calls["n"] += 1
    if calls["n"] == 6:  # the 6th append: 153 bytes land, then the disk is full
        real_write(fd, bytes(data[:min(153, len(data) - 5)]))
        raise OSError(errno.ENOSPC, "No space left on device")
    return real_write(fd, data)
def truncate(fd, size):
    if mode == "no-undo":
        raise OSError(errno.EIO, "Input/output error")
    return real_truncate(fd, size)
manifest_mod._write, manifest_mod._truncate = write, truncate
store = SwapStore(sys.argv[1])
acked, failed = {}, []
for i in range(30):
    key, version = f"k{i % 7}", i + 1
    try:
        store.write(key, value(key, version)).wait(30)
        acked[key] = version
    except OSError as exc:
        failed.append([key, type(exc).__name__, exc.errno, getattr(exc, "key", None)])
print(json.dumps({"acked": acked, "failed": failed}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def run_child(path: str, mode: str) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD, path, mode, HERE], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_acknowledged_writes_survive_a_failed_append_and_a_kill(tmp_path):
    path = str(tmp_path / "swap")
    out = run_child(path, "undo")
    # exactly the write whose append failed is refused, naming its key; all later ones land
    assert out["failed"] == [["k5", "SwapIOError", errno.ENOSPC, "k5"]]
    assert len(out["acked"]) == 7
    check_versions(path, out["acked"])


def test_an_append_that_cannot_be_undone_stops_all_writes(tmp_path):
    path = str(tmp_path / "swap")
    out = run_child(path, "no-undo")
    # the failed write and every later one is refused with the typed error: nothing is
    # acknowledged that a reopen would lose
    assert out["failed"][0] == ["k5", "MetadataError", errno.ENOSPC, "k5"]
    assert len(out["failed"]) == 25 and {f[1] for f in out["failed"]} == {"MetadataError"}
    assert out["acked"] == {f"k{i}": i + 1 for i in range(5)}
    check_versions(path, out["acked"])


def test_a_broken_store_still_reads_and_refuses_deletes(tmp_path, monkeypatch):
    def torn(fd, data):
        os.write(fd, bytes(data[:20]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_truncate(fd, size):
        raise OSError(errno.EROFS, "Read-only file system")

    with SwapStore(str(tmp_path / "swap")) as store:
        store.write("a", value("a", 1)).wait(30)
        monkeypatch.setattr(manifest_mod, "_write", torn)
        monkeypatch.setattr(manifest_mod, "_truncate", no_truncate)
        with pytest.raises(MetadataError) as info:
            store.write("b", value("b", 1)).wait(30)
        assert info.value.key == "b" and "journal.log" in str(info.value)
        monkeypatch.undo()
        with pytest.raises(MetadataError, match="takes no more writes"):
            store.write("c", value("c", 1))
        with pytest.raises(MetadataError):
            store.delete("a")
        assert torch.equal(store.read_tensor("a").wait(30), value("a", 1))
        assert store.stats().write_errors == 1
    check_versions(str(tmp_path / "swap"), {"a": 1})  # close() compacted the good state


def test_a_failed_delete_append_keeps_the_key(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    path = str(tmp_path / "swap")
    with SwapStore(path) as store:
        store.write("a", value("a", 1)).wait(30)
        monkeypatch.setattr(manifest_mod, "_write", full)
        with pytest.raises(SwapIOError) as info:
            store.delete("a")
        assert info.value.errno == errno.ENOSPC and info.value.key == "a"
        monkeypatch.undo()
        assert "a" in store
        store.write("b", value("b", 2)).wait(30)
    check_versions(path, {"a": 1, "b": 2})


def _stored(tmp_path, n=9) -> str:
    path = str(tmp_path / "swap")
    with SwapStore(path) as store:
        for i in range(4):
            store.write(f"s{i}", value(f"s{i}", 1)).wait(30)
    with SwapStore(path) as store:  # a snapshot of 4, then a journal of n - 4 more
        for i in range(n - 4):
            store.write(f"j{i}", value(f"j{i}", 1)).wait(30)
        journal = open(os.path.join(path + ".meta", "journal.log"), "rb").read()
    with open(os.path.join(path + ".meta", "journal.log"), "wb") as f:
        f.write(journal)  # as if killed before close() compacted it
    return path


@pytest.mark.parametrize("damage", ["flip-first", "garbage-middle", "overwrite-all"])
def test_a_damaged_journal_does_not_open(tmp_path, damage):
    path = _stored(tmp_path)
    journal = os.path.join(path + ".meta", "journal.log")
    data = bytearray(open(journal, "rb").read())
    if damage == "flip-first":
        data[10] ^= 0x20
    elif damage == "garbage-middle":
        cut = data.index(b"\n") + 1
        data[cut:cut] = b"\x13\x37 garbage \xff\n"
    else:
        data = bytearray(b"\xa5" * 200 + b"\n" + b"\x5a" * 100)
    open(journal, "wb").write(bytes(data))
    with pytest.raises(MetadataError) as info:
        SwapStore(path)
    assert info.value.path == journal and info.value.offset is not None
    SwapStore(path + "2").close()  # the failed open released its lock and descriptors
    with pytest.raises(MetadataError):
        SwapStore(path)  # still refused: nothing was cut or rewritten by the failed open


@pytest.mark.parametrize("doc", ["[]", "null", "{}", "", "42"])
def test_a_manifest_of_the_wrong_shape_does_not_open(tmp_path, doc):
    path = _stored(tmp_path)
    snap = os.path.join(path + ".meta", "manifest.json")
    open(snap, "w").write(doc)
    with pytest.raises(MetadataError) as info:
        SwapStore(path)
    assert info.value.path == snap


def test_a_truncated_area_does_not_open_smaller(tmp_path):
    path = _stored(tmp_path)
    os.truncate(path, 4096)
    with pytest.raises(MetadataError) as info:
        SwapStore(path)
    assert info.value.key is not None and info.value.path == path


def test_close_on_a_full_disk_is_typed_and_reopens_from_the_journal(tmp_path, monkeypatch):
    path = str(tmp_path / "swap")
    store = SwapStore(path)
    for i in range(5):
        store.write(f"k{i}", value(f"k{i}", i)).wait(30)

    def full(p, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest_mod, "write_atomic", full)
    with pytest.raises(SwapIOError) as info:
        store.close()
    assert info.value.errno == errno.ENOSPC
    assert info.value.path == os.path.join(path + ".meta", "manifest.json")
    monkeypatch.undo()
    store.close()  # idempotent
    assert not os.path.exists(os.path.join(path + ".meta", "manifest.json.tmp"))
    check_versions(path, {f"k{i}": i for i in range(5)})


def test_store_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        path = str(tmp_path / "new" / "swap")
        os.makedirs(os.path.dirname(path))
        with SwapStore(path) as store:
            store.write("a", value("a", 1)).wait(30)
            store.export(str(tmp_path / "new" / "copy"))
    finally:
        os.umask(old)
    for d in (path + ".meta", str(tmp_path / "new" / "copy.meta")):
        assert os.stat(d).st_mode & 0o777 == 0o700, d
        for name in os.listdir(d):
            assert os.stat(os.path.join(d, name)).st_mode & 0o777 == 0o600, (d, name)
    for f in (path, str(tmp_path / "new" / "copy")):
        assert os.stat(f).st_mode & 0o777 == 0o600, f


def test_import_of_a_damaged_export_changes_nothing(tmp_path):
    path = str(tmp_path / "swap")
    with SwapStore(path) as store:
        store.write("a", value("a", 1)).wait(30)
        store.export(str(tmp_path / "copy"))
        store.write("a", value("a", 2)).wait(30)
        open(str(tmp_path / "copy.meta" / "manifest.json"), "w").write("[]")
        with pytest.raises(MetadataError):
            store.import_from(str(tmp_path / "copy"))
        with pytest.raises(MetadataError, match="no metadata folder"):
            store.import_from(str(tmp_path / "nothing"))
        assert torch.equal(store.read_tensor("a").wait(30), value("a", 2))


def test_export_is_as_large_as_its_data_and_round_trips(tmp_path):
    """The export packs the stored extents (a plain copy of it, as DeepSpeed's checkpoint
    copytree makes, holds no area-sized holes) and imports back to the same tensors."""
    path = str(tmp_path / "swap")
    with SwapStore(path, grow_bytes="64MiB") as store:
        for k in ("a", "b", "c"):
            store.write(k, value(k, 1)).wait(30)
        store.delete("b")
        store.write("d", torch.arange(5000, dtype=torch.float32)).wait(30)
        store.export(str(tmp_path / "copy"))
        used = sum(-(-store.info(k).nbytes // 4096) * 4096 for k in store.keys())
        assert os.path.getsize(str(tmp_path / "copy")) == used < 64 << 20
        store.write("a", value("a", 2)).wait(30)
        store.import_from(str(tmp_path / "copy"))
        assert sorted(store.keys()) == ["a", "c", "d"]
        assert torch.equal(store.read_tensor("a").wait(30), value("a", 1))
        assert torch.equal(store.read_tensor("c").wait(30), value("c", 1))
        assert torch.equal(store.read_tensor("d").wait(30), torch.arange(5000.0))
        store.export(str(tmp_path / "some"), include=lambda k: k != "c")
        store.import_from(str(tmp_path / "some"))
        assert sorted(store.keys()) == ["a", "d"]


# A real full filesystem: the area is grown first, then another file takes every free block,
# so the journal's appends fail for real while data writes still fit in the area. Later, the
# other file shrinks, writes are acknowledged again, and a kill follows. (On this kernel a
# full ext4 refuses such an append whole; torn appends are injected in the tests above.)
FULL_CHILD = r"""
import errno, json, os, signal, sys
sys.path.insert(0, sys.argv[3])
from test_store_faults import value
from memascend.store import SwapStore
path, filler = sys.argv[1], sys.argv[2]
store = SwapStore(path, grow_bytes="8MiB")
import torch
store.write("ballast", torch.zeros((6 << 20) // 4)).wait(30)
store.delete("ballast"); store.sync()
with open(filler, "wb") as f:  # take every free block
    block = b"\0" * (1 << 20)
    try:
        while True:
            f.write(block); f.flush()
    except OSError:
        pass
    try:
        while True:
            f.write(b"\0" * 4096); f.flush()
    except OSError:
        pass
acked, failed, i = {}, [], 0
while len(failed) < 3 and i < 5000:  # until appends have failed for real a few times
    i += 1
    key = f"k{i % 7}"
    try:
        store.write(key, value(key, i)).wait(30)
        acked[key] = i
    except OSError as exc:
        failed.append([key, type(exc).__name__, exc.errno, getattr(exc, "key", None)])
os.truncate(filler, 0)  # the other writer gives space back
for j in range(20):
    i += 1
    key = f"k{i % 7}"
    store.write(key, value(key, i)).wait(30)
    acked[key] = i
print(json.dumps({"acked": acked, "failed": failed}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_real_full_filesystem_journal_loses_nothing(small_ext4):
    path = os.path.join(small_ext4, "swap")
    r = subprocess.run([sys.executable, "-c", FULL_CHILD, path,
                        os.path.join(small_ext4, "filler"), HERE], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == -signal.SIGKILL, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["failed"], "the journal never hit a full disk"
    for key, kind, code, named in out["failed"]:
        assert kind == "SwapIOError" and code == errno.ENOSPC and named == key
    check_versions(path, out["acked"])


def test_an_interrupted_import_opens_with_an_error_not_half_replaced(tmp_path, monkeypatch):
    from memascend import store_exchange as store_mod

    path, copy = str(tmp_path / "swap"), str(tmp_path / "copy")
    with SwapStore(path) as store:
        for i in range(3):
            store.write(f"k{i}", value(f"k{i}", 1)).wait(30)
        store.export(copy)
        store.write("k0", value("k0", 2)).wait(30)
        calls = []

        def failing_copy(src, dst, offset, nbytes):
            calls.append(offset)
            if len(calls) == 2:
                raise OSError(errno.EIO, "Input/output error")
            return real_copy(src, dst, offset, nbytes)

        real_copy = store_mod._copy_range
        monkeypatch.setattr(store_mod, "_copy_range", failing_copy)
        with pytest.raises(SwapIOError, match="empty until an import succeeds"):
            store.import_from(copy)
        assert store.keys() == []  # nothing half-replaced is served
    monkeypatch.undo()
    # as if the process had died in the middle: the marker is still in the snapshot
    snap = os.path.join(path + ".meta", "manifest.json")
    doc = json.load(open(snap))
    doc["header"]["importing"] = copy
    open(snap, "w").write(json.dumps(doc))
    with pytest.raises(MetadataError, match="interrupted"):
        SwapStore(path)
    with SwapStore(path, reset=True) as store:  # scratch users start over
        assert store.keys() == []
        store.import_from(copy)
    check_versions(path, {f"k{i}": 1 for i in range(3)})


def test_reset_discards_damaged_metadata(tmp_path):
    path = _stored(tmp_path)
    open(os.path.join(path + ".meta", "journal.log"), "ab").write(b"garbage\n")
    with pytest.raises(MetadataError):
        SwapStore(path)
    with SwapStore(path, reset=True) as store:
        assert len(store) == 0 and store.stats().area_bytes == 0
        store.write("a", value("a", 1)).wait(30)
    check_versions(path, {"a": 1})
