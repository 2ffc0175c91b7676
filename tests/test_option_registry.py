"""Every user-facing option object goes through memascend.config's registry: the swapper,
offload_model and the DeepSpeed drop-in take a field that was not given from
MEMASCEND_<SECTION>_<FIELD>, an explicit argument wins over it (and the drop-in's config block
over both), and an unknown option or variable is a ConfigError naming it."""
from __future__ import annotations

import pytest
import torch

from memascend import offload_model
from memascend.errors import ConfigError
from memascend.store import SwapStore
from memascend.swapper import TensorSwapper


@pytest.fixture
def store(tmp_path):
    st = SwapStore(str(tmp_path / "s.swp"))
    yield st
    st.close()


def test_swapper_reads_its_environment_and_explicit_wins(store, monkeypatch):
    monkeypatch.setenv("MEMASCEND_SWAPPER_MAX_DEPTH", "7")
    monkeypatch.setenv("MEMASCEND_SWAPPER_PLAN_PREFETCH", "off")
    with TensorSwapper(store, budget_bytes="1MiB") as sw:
        assert sw.config.max_depth == 7 and sw.config.plan_prefetch is False
    with TensorSwapper(store, budget_bytes="1MiB", max_depth=9) as sw:
        assert sw.config.max_depth == 9


def test_swapper_unknown_option_or_variable_is_an_error(store, monkeypatch):
    with pytest.raises(ConfigError, match="max_dept.*unknown option"):
        TensorSwapper(store, budget_bytes="1MiB", max_dept=3)
    monkeypatch.setenv("MEMASCEND_SWAPPER_MAX_DEPT", "3")
    with pytest.raises(ConfigError, match="MEMASCEND_SWAPPER_MAX_DEPT.*unknown option"):
        TensorSwapper(store, budget_bytes="1MiB")


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))


def test_offload_model_reads_its_environment_and_explicit_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMASCEND_OFFLOAD_EXACT_UNDO", "0")
    monkeypatch.setenv("MEMASCEND_OFFLOAD_MAX_GRAD_NORM", "0.5")
    monkeypatch.setenv("MEMASCEND_OFFLOAD_BUDGET", "2MiB")
    with offload_model(_mlp(), str(tmp_path / "a")) as om:
        assert om._fused.undo is False and om._fused.max_grad_norm == 0.5
        assert om.params_sw.config.budget_bytes == 2 << 20
    with offload_model(_mlp(), str(tmp_path / "b"), exact_undo=True, budget="3MiB") as om:
        assert om._fused.undo is True and om.params_sw.config.budget_bytes == 3 << 20


def test_offload_model_bad_or_unknown_option_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="exact_und.*unknown option"):
        offload_model(_mlp(), str(tmp_path / "a"), exact_und=False)
    monkeypatch.setenv("MEMASCEND_OFFLOAD_MAX_GRAD_NORM", "lots")
    with pytest.raises(ConfigError, match="MEMASCEND_OFFLOAD_MAX_GRAD_NORM.*number"):
        offload_model(_mlp(), str(tmp_path / "b"))
    monkeypatch.delenv("MEMASCEND_OFFLOAD_MAX_GRAD_NORM")
    monkeypatch.setenv("MEMASCEND_OFFLOAD_EXACTUNDO", "0")
    with pytest.raises(ConfigError, match="MEMASCEND_OFFLOAD_EXACTUNDO"):
        offload_model(_mlp(), str(tmp_path / "c"))


def test_dropin_reads_its_environment_below_enable_and_the_block(monkeypatch):
    pytest.importorskip("deepspeed")
    import memascend.integrations.deepspeed as ma_ds
    from memascend.dropin_options import Options
    from memascend.integrations.deepspeed import state

    ma_ds.disable()
    try:
        monkeypatch.setenv("MEMASCEND_DROPIN_CHECKSUM", "none")
        monkeypatch.setenv("MEMASCEND_DROPIN_OPTIMIZER_CHUNK", "8MiB")
        ma_ds.enable(optimizer_chunk="4MiB")
        base = state.base_options()
        assert base.checksum == "none" and base.optimizer_chunk == 4 << 20
        assert Options.merged(base, {"checksum": "crc32c"}).checksum == "crc32c"
        ma_ds.disable()
        monkeypatch.setenv("MEMASCEND_DROPIN_CHEKSUM", "none")
        with pytest.raises(ConfigError, match="MEMASCEND_DROPIN_CHEKSUM"):
            ma_ds.enable()
        assert not ma_ds.enabled()
    finally:
        ma_ds.disable()


def test_explicit_none_wins_over_the_environment(tmp_path, monkeypatch, store):
    monkeypatch.setenv("MEMASCEND_OFFLOAD_MAX_GRAD_NORM", "0.5")
    with offload_model(_mlp(), str(tmp_path / "a"), max_grad_norm=None) as om:
        assert om._fused.max_grad_norm is None  # the caller said: no clipping
    monkeypatch.setenv("MEMASCEND_OFFLOAD_OPTIMIZER_BUDGET", "none")  # Optional[Any] field
    monkeypatch.delenv("MEMASCEND_OFFLOAD_MAX_GRAD_NORM")
    with offload_model(_mlp(), str(tmp_path / "b"), budget="2MiB") as om:
        assert om.optim_sw.config.budget_bytes == 2 << 20  # none: the same as budget
    monkeypatch.setenv("MEMASCEND_SWAPPER_BUDGET_BYTES", "1MiB")
    with pytest.raises(ConfigError, match="budget_bytes"):
        TensorSwapper(store, budget_bytes=None)  # a typed error, not the environment's value


def test_a_required_option_missing_is_a_config_error():
    from dataclasses import dataclass

    from memascend.config import from_env

    @dataclass(frozen=True)
    class Opts:
        size: int
        depth: int = 2

    with pytest.raises(ConfigError, match="size.*required"):
        from_env(Opts, "TESTOPTS", {}, environ={})
    assert from_env(Opts, "TESTOPTS", {}, environ={"MEMASCEND_TESTOPTS_SIZE": "4KiB"}).size == 4096


@pytest.mark.parametrize("raw", ["2.5", "0.3KiB", "1.0000001"])
def test_a_fraction_is_not_cut_to_a_whole_count_or_size(monkeypatch, tmp_path, raw):
    from memascend.config import parse_size

    with pytest.raises(ConfigError, match="whole number"):
        parse_size("x", raw)
    monkeypatch.setenv("MEMASCEND_OFFLOAD_ACCUMULATION_STEPS", raw)
    with pytest.raises(ConfigError, match="MEMASCEND_OFFLOAD_ACCUMULATION_STEPS.*whole"):
        offload_model(_mlp(), str(tmp_path / "a"))
    assert parse_size("x", "1.5GB") == 1_500_000_000 and parse_size("x", "2.0") == 2
