"""The one table of DeepSpeed patches (memascend.integrations.deepspeed.patches).

The table is checked against the installed DeepSpeed (so an upgrade fails here first); every
name it lists is replaced by enable() and restored by disable(); an unsupported version, a
missing internal or a changed upstream body is a one-line ConfigError at enable() with
nothing patched; a failure part-way through installing puts everything back.
"""
from __future__ import annotations

import sys
import types

import pytest

pytest.importorskip("deepspeed")

import memascend.integrations.deepspeed as ma_ds  # noqa: E402
from memascend.errors import ConfigError  # noqa: E402
from memascend.integrations.deepspeed import patches  # noqa: E402


def current():
    return [getattr(patches._owner(p.owner), p.name) for p in patches.PATCHES]


@pytest.fixture(autouse=True)
def _disabled():
    ma_ds.disable()
    yield
    ma_ds.disable()


def test_the_table_matches_the_installed_deepspeed():
    assert ma_ds.check() == []


def test_enable_replaces_every_listed_name_and_disable_restores_it():
    before = current()
    ma_ds.enable()
    after = current()
    for p, old, new in zip(patches.PATCHES, before, after):
        assert new is not old, f"{p.owner}.{p.name} not replaced"
    assert ma_ds.check() == []  # fingerprints are of DeepSpeed's originals while patched
    ma_ds.enable(checksum="none")  # idempotent: options only
    assert current() == after
    ma_ds.disable()
    assert all(a is b for a, b in zip(current(), before))
    assert not ma_ds.enabled()


def test_every_stage3_wrapper_is_in_the_table():
    from memascend.integrations.deepspeed import stage3

    factories = {p.factory.split(":")[1] for p in patches.PATCHES
                 if p.factory.startswith(".stage3:")}
    wrappers = {n for n, f in vars(stage3).items() if callable(f) and n.startswith("_")
                and getattr(f, "__module__", "") == stage3.__name__ and n != "_streamed"}
    assert wrappers == factories


def _refused(match):
    before = current()
    with pytest.raises(ConfigError, match=match) as info:
        ma_ds.enable()
    assert "\n" not in str(info.value)
    assert "0.19.8" in str(info.value)  # names the supported versions
    assert all(a is b for a, b in zip(current(), before))  # nothing patched
    assert not ma_ds.enabled()


def test_a_changed_upstream_body_is_refused_with_nothing_patched(monkeypatch):
    name = next(iter(patches.COPIED))
    monkeypatch.setitem(patches.COPIED, name, ("0" * 16, "stage3.py"))
    _refused(r"_setup_for_real_optimizer changed upstream")


def test_an_unsupported_version_is_refused(monkeypatch):
    import deepspeed

    monkeypatch.setattr(deepspeed, "__version__", "0.20.1")
    _refused(r"DeepSpeed 0\.20\.1 is outside the supported range")


def test_a_missing_internal_is_refused(monkeypatch):
    monkeypatch.setattr(patches, "RELIED", patches.RELIED + ((patches.S3, "ipg_bucketz"),))
    _refused(r"DeepSpeedZeroOptimizer_Stage3\.ipg_bucketz, which memascend relies on, is "
             r"missing")
    monkeypatch.setattr(patches, "RELIED", patches.RELIED[:-1] +
                        (("deepspeed.runtime.zero.no_such_module", "x"),))
    assert any("no_such_module is missing" in p for p in ma_ds.check())


def test_a_failure_part_way_through_install_puts_everything_back(monkeypatch):
    class ReadOnly(types.ModuleType):
        def __setattr__(self, key, value):
            raise AttributeError(f"{key} is read-only")

    mod = ReadOnly("memascend_readonly_probe")
    types.ModuleType.__setattr__(mod, "func", lambda: None)
    monkeypatch.setitem(sys.modules, "memascend_readonly_probe", mod)
    monkeypatch.setattr(patches, "PATCHES", patches.PATCHES + (
        patches.Patch("memascend_readonly_probe", "func", ".wrappers:overflow_check"),))
    before = current()
    with pytest.raises(AttributeError, match="read-only"):
        ma_ds.enable()
    assert all(a is b for a, b in zip(current(), before))
    assert not patches.installed() and not ma_ds.enabled()


def test_disable_leaves_a_name_someone_else_replaced_since(monkeypatch):
    import deepspeed

    original = deepspeed.initialize
    ma_ds.enable()
    theirs = lambda *a, **k: None  # noqa: E731
    deepspeed.initialize = theirs
    try:
        assert patches.uninstall() == ["deepspeed.initialize"]
        assert deepspeed.initialize is theirs
    finally:
        deepspeed.initialize = original
