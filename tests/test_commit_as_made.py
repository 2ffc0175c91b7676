"""``offload_model(..., exact_undo=False)``: each update committed as it is made.

The swap areas then hold the state once during a step instead of keeping every updated
tensor's old version aside until ``step()``. Training stays bitwise equal to in-memory AdamW
(the reference of tests/test_fused_step.py); what cannot be undone any more is refused
(clipped and fp16 windows run two-phase) or is an error (``zero_grad()`` or another
micro-batch after a fused window, before ``step()``).
"""
from __future__ import annotations

import pytest
import torch

from memascend.errors import MemAscendError
from memascend.offload import AdamW, offload_model

from test_fused_step import (LR, Reference, assert_same_weights, batch, loss_of, net, run,
                             run_scaled)


def areas(om) -> int:
    return om.param_store.stats().area_bytes + om.optim_store.stats().area_bytes


def no_aside_keys(om) -> bool:
    return not [k for k in om.optim_store.keys() + om.param_store.keys() if "~" in k]


@pytest.mark.parametrize("declared, windows", [(1, [1] * 6), (3, [3, 3]), (None, [2, 2, 2])])
def test_bitwise_and_fused_without_old_versions(tmp_path, declared, windows):
    model, ref = net(width=256), Reference(width=256)
    with offload_model(model, str(tmp_path), budget="1MiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=declared, exact_undo=False) as om:
        run(om, model, ref, windows)
        c = om.stats().paths
        assert c["fused_commits"] == len(windows) - (declared is None)  # learned: 1st deferred
        assert no_aside_keys(om)
        assert_same_weights(om, ref)


def deep(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(*[torch.nn.Linear(512, 512) for _ in range(16)])


def test_the_areas_hold_the_state_once(tmp_path):
    """Same model and budgets (small against the state): with exact undo the areas grow to
    hold the old versions of a step's updates beside the new ones; without, about the
    state."""
    sizes = {}
    for undo in (True, False):
        model = deep()
        with offload_model(model, str(tmp_path / str(undo)), budget="2MiB",
                           optimizer_budget="5MiB", optimizer=AdamW(lr=LR),
                           accumulation_steps=1, exact_undo=undo) as om:
            for i in range(4):
                g = torch.Generator().manual_seed(i)
                om.backward(model(torch.randn(4, 512, generator=g)).square().mean())
                om.step()
            om.master_state_dict()  # settles the step's updates
            stored = om.param_store.stats().stored_bytes + om.optim_store.stats().stored_bytes
            sizes[undo] = (areas(om), stored, om.master_state_dict())
    (a_undo, s_undo, w_undo), (a_plain, s_plain, w_plain) = sizes[True], sizes[False]
    assert all(torch.equal(w_undo[n], w_plain[n]) for n in w_undo)  # the same training
    assert s_undo == s_plain
    assert a_plain <= 1.25 * s_plain, (a_plain, s_plain)  # the state, overwrites in flight
    assert a_undo >= 1.6 * s_undo, (a_undo, s_undo)  # two versions during a step


def test_clipping_runs_two_phase_and_is_exact(tmp_path):
    scales = [1.0, 30.0, 1.0, 30.0, 1.0]
    model, ref = net(), Reference(max_norm=4.6)
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=1, max_grad_norm=4.6, exact_undo=False) as om:
        run_scaled(om, model, ref, scales)
        c = om.stats().paths
        assert c["deferred_steps"] == len(scales) and c["fused_commits"] == 0
        assert c["rollbacks_clip"] == 0
        assert 0 < sum(n > 4.6 for n in ref.norms) < len(scales)
        om.master_state_dict()  # settles the step's updates
        assert no_aside_keys(om)
        assert_same_weights(om, ref)


def test_fp16_overflow_is_skipped_without_an_update(tmp_path):
    model = net()
    with offload_model(model, str(tmp_path), budget="64KiB", compute_dtype=torch.float16,
                       optimizer=AdamW(lr=LR), accumulation_steps=1, exact_undo=False) as om:
        for i in range(2):
            x, y = batch(i, dtype=torch.float16)
            om.backward(loss_of(model, x, y))
            assert om.step()
        om.master_state_dict()  # settles the step's updates
        before = om.master_state_dict()
        om.loss_scale = 1e30
        x, y = batch(9, dtype=torch.float16)
        om.backward(loss_of(model, x, y))
        assert om.step() is False
        after = om.master_state_dict()
        assert all(torch.equal(before[n], after[n]) for n in before)
        assert om.stats().paths["fused_commits"] == 0


def test_what_cannot_be_undone_is_an_error(tmp_path):
    model, ref = net(), Reference()
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=1, exact_undo=False) as om:
        run(om, model, ref, [1])
        x, y = batch(40)
        ref.micro(x, y)
        om.backward(loss_of(model, x, y))
        with pytest.raises(MemAscendError, match="cannot be discarded; the step counts"):
            om.zero_grad()
        ref.step()  # the update was committed: the reference takes the step too
        assert_same_weights(om, ref)
        x, y = batch(41)
        ref.micro(x, y)
        om.backward(loss_of(model, x, y))
        with pytest.raises(MemAscendError, match="committed as they were made"):
            loss_of(model, x, y)  # another forward before step()
        ref.step()
        assert_same_weights(om, ref)
        om.zero_grad()
        run(om, model, ref, [1, 1])  # training goes on
        assert_same_weights(om, ref)


def test_large_tensors_are_overwritten_in_pieces(tmp_path, monkeypatch):
    """A tensor larger than a piece (8 MiB) is overwritten in pieces by the tiers of
    exact_undo=False, so neither area needs room for its old and new version at once; the
    training is the same as with exact undo. (No write window: the model is smaller than
    the 32 MiB the stores would otherwise keep in flight before waiting for room.)"""
    monkeypatch.setenv("MEMASCEND_STORE_WRITE_WINDOW", "0")
    out = {}
    for undo in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(20000, 512), torch.nn.Linear(512, 64))
        with offload_model(model, str(tmp_path / str(undo)), budget="48MiB",
                           optimizer_budget="192MiB", optimizer=AdamW(lr=LR),
                           accumulation_steps=1, exact_undo=undo) as om:
            for i in range(3):
                g = torch.Generator().manual_seed(i)
                ids = torch.randint(0, 20000, (8, 16), generator=g)
                om.backward(model(ids).square().mean())
                om.step()
            weights = om.master_state_dict()
            stats = [om.param_store.stats(), om.optim_store.stats()]
            out[undo] = (weights, stats)
    (w_undo, s_undo), (w_plain, s_plain) = out[True], out[False]
    assert all(torch.equal(w_undo[n], w_plain[n]) for n in w_undo)
    assert all(s.writes_pieced == 0 for s in s_undo)
    assert all(s.writes_pieced >= 3 for s in s_plain), s_plain  # the embedding, each step
    embedding = 20000 * 512 * 4  # 41 MB, five pieces
    for s in s_plain:  # beyond the state: a piece and what grew ahead, not a 2nd version
        assert s.area_bytes - s.stored_bytes < embedding // 3, s
