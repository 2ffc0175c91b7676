"""Manifest replay: completion-order journals, per-key ordering, torn tails, snapshots."""
from __future__ import annotations

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


def test_corrupt_line_stops_replay(tmp_path):
    m = Manifest(str(tmp_path))
    put(m, "a", 1, 0)
    m.close()
    with open(m.journal_path, "ab") as f:
        f.write(b'{"seq": 2, "op": "del", "key": "a"}\tdeadbeef\n')
    entries, _h, _s = Manifest(str(tmp_path)).load()
    assert "a" in entries


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
