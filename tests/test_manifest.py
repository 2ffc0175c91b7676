"""Manifest replay: completion-order journals, per-key ordering, torn tails, snapshots."""
from __future__ import annotations

import errno
import json
import os
import zlib

import pytest

from memascend import manifest as manifest_mod
from memascend.errors import MetadataError, SwapIOError
from memascend.manifest import Entry, Manifest


def put(m: Manifest, key: str, seq: int, offset: int) -> None:
    m.append({"seq": seq, "op": "put", "entry": Entry(key, offset, 10, None, None, None,
                                                      seq).to_json()})


def test_out_of_order_records_all_apply(tmp_path):
    m = Manifest(str(tmp_path))
    put(m, "a", 11, 4096)
    put(m, "b", 10, 8192)  # completed after a's later-issued write: must still count
    m.append({"seq": 12, "op": "del", "key": "c"})
    put(m, "c", 9, 0)  # a write issued before the delete, completing after it: stays deleted
    m.close()
    entries, _h, seq = Manifest(str(tmp_path)).load()
    assert {k: e.offset for k, e in entries.items()} == {"a": 4096, "b": 8192}
    assert seq == 12


def test_torn_tail_is_dropped_and_cut(tmp_path):
    m = Manifest(str(tmp_path))
    put(m, "a", 1, 0)
    put(m, "b", 2, 4096)
    m.close()
    with open(m.journal_path, "ab") as f:
        f.write(b'{"seq": 3, "op": "put", "entr')  # crash in the middle of an append
    m2 = Manifest(str(tmp_path))
    entries, _h, _s = m2.load()
    assert sorted(entries) == ["a", "b"] and m2.dropped_lines == 1
    with open(m.journal_path, "rb") as f:
        assert f.read().endswith(b"\n")
    put(m2, "c", 3, 8192)
    m2.close()
    assert sorted(Manifest(str(tmp_path)).load()[0]) == ["a", "b", "c"]


def test_a_damaged_complete_line_is_an_error_naming_file_and_offset(tmp_path):
    m = Manifest(str(tmp_path))
    put(m, "a", 1, 0)
    m.close()
    good = os.path.getsize(m.journal_path)
    with open(m.journal_path, "ab") as f:
        f.write(b'{"seq": 2, "op": "del", "key": "a"}\tdeadbeef\n')
    with pytest.raises(MetadataError) as info:
        Manifest(str(tmp_path)).load()
    assert info.value.path == m.journal_path and info.value.offset == good
    assert m.journal_path in str(info.value) and isinstance(info.value, SwapIOError)


def test_snapshot_then_stale_journal(tmp_path):
    m = Manifest(str(tmp_path))
    put(m, "a", 1, 0)
    put(m, "a", 2, 4096)
    journal = open(m.journal_path, "rb").read()
    m.compact([Entry("a", 4096, 10, None, None, None, 2)], {"area_bytes": 8192}, 2)
    # crash between snapshot rename and journal truncation: the old journal is still there
    with open(m.journal_path, "wb") as f:
        f.write(journal)
    entries, header, seq = Manifest(str(tmp_path)).load()
    assert entries["a"].offset == 4096 and seq == 2 and header == {"area_bytes": 8192}


def nine_keys(folder) -> Manifest:
    """A snapshot of four keys, then a journal of five more (the fault suite's shape)."""
    m = Manifest(str(folder))
    m.compact([Entry(f"s{i}", i * 4096, 10, None, None, None, i + 1) for i in range(4)],
              {"area_bytes": 1 << 20}, 4)
    for i in range(5):
        put(m, f"j{i}", 5 + i, (8 + i) * 4096)
    m.close()
    return m


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_bytes_in_any_complete_record_fail_the_load(tmp_path, where):
    m = nine_keys(tmp_path)
    data = bytearray(open(m.journal_path, "rb").read())
    starts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A][:-1]
    start = {"first": starts[0], "middle": starts[2], "last": starts[-1]}[where]
    data[start + 12] ^= 0x41
    open(m.journal_path, "wb").write(bytes(data))
    with pytest.raises(MetadataError) as info:
        Manifest(str(tmp_path)).load()
    assert info.value.offset == start and info.value.path == m.journal_path


@pytest.mark.parametrize("garbage", [b"\x00\xffgarbage\n", b"hello world\n", b"\n",
                                     b"not\ta record\n"])
def test_garbage_inside_the_journal_fails_the_load(tmp_path, garbage):
    m = nine_keys(tmp_path)
    data = open(m.journal_path, "rb").read()
    cut = data.index(b"\n") + 1
    open(m.journal_path, "wb").write(data[:cut] + garbage + data[cut:])
    with pytest.raises(MetadataError) as info:
        Manifest(str(tmp_path)).load()
    assert info.value.offset == cut


@pytest.mark.parametrize("tail", [b"\x00" * 300, b'{"seq": 10, "op": "put"', b"x"])
def test_a_torn_tail_without_newline_is_dropped(tmp_path, tail):
    m = nine_keys(tmp_path)
    size = os.path.getsize(m.journal_path)
    with open(m.journal_path, "ab") as f:
        f.write(tail)
    m2 = Manifest(str(tmp_path))
    entries, _h, seq = m2.load()
    assert len(entries) == 9 and seq == 9 and m2.dropped_lines == 1
    assert os.path.getsize(m.journal_path) == size


def test_a_record_that_is_valid_json_but_not_an_entry_is_damage(tmp_path):
    m = Manifest(str(tmp_path))
    put(m, "a", 1, 0)
    m.append({"seq": 2, "op": "put", "entry": {"key": "b"}})  # CRC fine, shape wrong
    m.close()
    with pytest.raises(MetadataError):
        Manifest(str(tmp_path)).load()


def _snapshot(doc) -> bytes:
    return json.dumps(doc).encode() if not isinstance(doc, bytes) else doc


def _valid_body():
    return [Entry("a", 0, 10, None, None, None, 1).to_json()]


@pytest.mark.parametrize("doc", [
    [], None, "manifest", 3, {}, b"", b"{\"format\": 1, \"ent",
    {"format": 99, "seq": 1, "header": {}, "entries": [], "crc": zlib.crc32(b"[]")},
    {"format": 1, "seq": 1, "header": {}, "entries": _valid_body(), "crc": 1},
    {"format": 1, "seq": 1, "header": [], "entries": _valid_body(),
     "crc": zlib.crc32(json.dumps(_valid_body(), sort_keys=True).encode())},
    {"format": 1, "seq": 1, "header": {}, "entries": [{"key": "a"}],
     "crc": zlib.crc32(json.dumps([{"key": "a"}], sort_keys=True).encode())},
    {"format": 1, "seq": 1, "header": {}, "entries": [None],
     "crc": zlib.crc32(json.dumps([None], sort_keys=True).encode())},
], ids=["list", "null", "string", "number", "empty-object", "empty-file", "truncated",
        "format", "crc", "header", "entry-fields", "entry-null"])
def test_a_snapshot_of_the_wrong_shape_is_a_typed_error(tmp_path, doc):
    m = Manifest(str(tmp_path))
    with open(m.snapshot_path, "wb") as f:
        f.write(_snapshot(doc))
    with pytest.raises(MetadataError) as info:
        Manifest(str(tmp_path)).load()
    assert info.value.path == m.snapshot_path and m.snapshot_path in str(info.value)


def test_a_short_append_is_continued(tmp_path, monkeypatch):
    m = Manifest(str(tmp_path))
    real = os.write
    calls = []

    def short(fd, data):
        calls.append(len(data))
        return real(fd, bytes(data[:7]) if len(calls) == 1 else data)

    monkeypatch.setattr(manifest_mod, "_write", short)
    put(m, "a", 1, 0)
    m.close()
    assert len(calls) == 2
    assert sorted(Manifest(str(tmp_path)).load()[0]) == ["a"]


@pytest.mark.parametrize("written", [0, 5, 153])
def test_a_failed_append_is_cut_back_and_later_appends_replay(tmp_path, monkeypatch, written):
    m = Manifest(str(tmp_path))
    put(m, "a", 1, 0)
    good = os.path.getsize(m.journal_path)
    real = os.write
    state = {"fail": True}

    def full(fd, data):
        if state["fail"]:
            state["fail"] = False
            if written:
                real(fd, bytes(data[:written]))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(manifest_mod, "_write", full)
    with pytest.raises(OSError) as info:
        put(m, "b", 2, 4096)
    assert info.value.errno == errno.ENOSPC and not isinstance(info.value, MetadataError)
    assert os.path.getsize(m.journal_path) == good
    for i in range(20):  # acknowledged after the failure: all must replay
        put(m, f"k{i}", 3 + i, (2 + i) * 4096)
    m.close()
    entries, _h, _s = Manifest(str(tmp_path)).load()
    assert sorted(entries) == sorted(["a"] + [f"k{i}" for i in range(20)])


def test_an_append_that_cannot_be_cut_back_breaks_the_manifest(tmp_path, monkeypatch):
    m = Manifest(str(tmp_path))
    put(m, "a", 1, 0)
    real = os.write

    def torn(fd, data):
        real(fd, bytes(data[:9]))
        raise OSError(errno.ENOSPC, "No space left on device")

    def no_truncate(fd, size):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(manifest_mod, "_write", torn)
    monkeypatch.setattr(manifest_mod, "_truncate", no_truncate)
    with pytest.raises(MetadataError) as info:
        put(m, "b", 2, 4096)
    assert info.value.errno == errno.ENOSPC and m.broken is info.value
    monkeypatch.setattr(manifest_mod, "_write", real)
    with pytest.raises(MetadataError):  # nothing more is acknowledged
        put(m, "c", 3, 8192)
    m.close()
    m2 = Manifest(str(tmp_path))
    entries, _h, _s = m2.load()  # the torn record is the tail: dropped
    assert sorted(entries) == ["a"] and m2.dropped_lines == 1


def test_files_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        folder = tmp_path / "a" / "meta"
        m = Manifest(str(folder))
        put(m, "a", 1, 0)
        m.compact([Entry("a", 0, 10, None, None, None, 1)], {}, 1)
        put(m, "b", 2, 4096)
        m.close()
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "a").st_mode & 0o777 == 0o700
    assert os.stat(folder).st_mode & 0o777 == 0o700
    for name in ("manifest.json", "journal.log"):
        assert os.stat(folder / name).st_mode & 0o777 == 0o600, name


def test_a_snapshot_of_format_1_still_loads(tmp_path):
    """Stores written before entries could list several extents (format 1) open as before."""
    m = Manifest(str(tmp_path / "meta"))
    m.compact([Entry("a", 0, 10, None, None, None, 1)], {"area_bytes": 4096}, 1)
    m.close()
    snap = tmp_path / "meta" / "manifest.json"
    doc = json.loads(snap.read_text())
    assert doc["format"] == 2
    doc["format"] = 1
    snap.write_text(json.dumps(doc))
    m = Manifest(str(tmp_path / "meta"))
    entries, _header, seq = m.load()
    m.close()
    assert list(entries) == ["a"] and seq == 1
