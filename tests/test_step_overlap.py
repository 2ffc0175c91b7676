"""The updates step() starts from stored gradients (deferred and clipped windows) overlap the
next forward, and stay exact and atomic.

With clipping on every step (a tiny ``max_grad_norm``) each window's update runs behind
``step()``: a gate held in the worker shows that ``step()`` returns before the updates ran and
that each module's forward waits only for its own parameters; losses and weights stay bitwise
equal to the in-memory reference (``clip_grad_norm_`` + ``AdamW(foreach=False)``), with or
without overlap. A write that fails after ``step()`` returned undoes the whole step (fused
updates of the window too) and the error reaches the next forward; training then goes on
exactly. The smallest parameter budget forward can run with works with overlap too (an update
waits for the forward's holds).
"""
from __future__ import annotations

import threading

import pytest
import torch
from test_fused_step import LR, Reference, assert_same_weights, batch, loss_of, net, run

from memascend.errors import MemAscendError
from memascend.offload import AdamW, offload_model

CLIP = 1e-3  # every window clips


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("declared", [1, None])
def test_clipped_windows_are_exact_with_and_without_overlap(tmp_path, overlap, declared):
    model, ref = net(), Reference(max_norm=CLIP)
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=declared, max_grad_norm=CLIP,
                       overlap_step=overlap) as om:
        windows = [1, 2, 1, 1] if declared is None else [1] * 5
        run(om, model, ref, windows)
        assert om.last_grad_norm == pytest.approx(ref.norms[-1], rel=0, abs=0)
        assert_same_weights(om, ref)  # waits for the last step's updates
        paths = om.stats().paths
        assert paths["updates_in_step"] == len(windows) * len(list(model.parameters()))
        assert paths["steps_undone"] == 0
        keys = om.optim_store.keys() + om.param_store.keys()
        assert not [k for k in keys if "~" in k]  # every step committed


def test_step_returns_before_its_updates_and_forward_waits_per_module(tmp_path):
    model, ref = net(), Reference(max_norm=CLIP)
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=1, max_grad_norm=CLIP) as om:
        run(om, model, ref, [1])
        f = om._fused
        f.settle()  # the first step's updates ran
        gate, done, seen = threading.Event(), [], []
        real = f._do_update

        def gated(job):
            gate.wait(60)
            real(job)
            done.append(job.name)

        f._do_update = gated
        x, y = batch(50)
        want = ref.micro(x, y)
        om.backward(loss_of(model, x, y))
        assert om.step()
        ref.step()
        assert f._running is not None and done == []  # step() did not wait for them
        order = [n for n, _ in model.named_parameters()]
        assert sorted(f._lazy) == sorted(order)
        real_fetch = om._tier.fetch

        def fetch(names, hold):
            if hold == "fwd":
                seen.append((list(names), list(done)))
            return real_fetch(names, hold)

        om._tier.fetch = fetch
        gate.set()
        x, y = batch(51)
        want = ref.micro(x, y)
        loss = loss_of(model, x, y)
        assert loss.item() == want
        # each module's parameters were updated when its forward fetched them, in order
        for names, finished in seen:
            assert set(names) <= set(finished)
        assert done[:len(order)] == order
        om.backward(loss)
        assert om.step()
        ref.step()
        om._tier.fetch = real_fetch
        f._do_update = real
        assert_same_weights(om, ref)


@pytest.mark.parametrize("fused_first", [True, False])
def test_a_failing_update_after_step_undoes_the_whole_step(tmp_path, fused_first):
    """A write failing after step() returned: the next forward raises, parameters, moments
    and step count are as before that step, and training goes on exactly. ``fused_first``:
    the window was fused in backward, then clipping redid it (the fused updates are undone
    by the redo, the redo's by the failure)."""
    model, ref = net(), Reference(max_norm=CLIP)
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=1, max_grad_norm=CLIP) as om:
        run(om, model, ref, [1, 1])
        if fused_first:
            om._fused._clipped_last = False  # predict no clipping: fuse, then redo
        before = om.master_state_dict()
        steps = om.step_count
        real = om.optim_store.write
        calls = []

        def failing(key, src, **kw):
            calls.append(key)
            if key.startswith("v/") and len([k for k in calls if k.startswith("v/")]) == 3:
                raise OSError(28, "No space left on device")
            return real(key, src, **kw)

        x, y = batch(70)
        om.backward(loss_of(model, x, y))
        om.optim_store.write = failing
        assert om.step()  # its updates are still running
        with pytest.raises(MemAscendError, match="undone.*No space left"):
            loss_of(model, *batch(71))
        om.optim_store.write = real
        assert om.step_count == steps
        assert om.stats().paths["steps_undone"] == 1
        got = om.master_state_dict()
        for n, t in before.items():
            assert torch.equal(got[n], t), n
        keys = om.optim_store.keys() + om.param_store.keys()
        assert not [k for k in keys if "~" in k]
        om.zero_grad()
        run(om, model, ref, [1, 1])  # the reference never took the undone step
        assert_same_weights(om, ref)


class Outer(torch.nn.Module):
    """A module with a parameter of its own that it holds while its child runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Parameter(torch.randn(64, 64) * 0.1)
        self.inner = torch.nn.Linear(64, 64, bias=False)

    def forward(self, x):
        return self.inner(x @ self.w)


@pytest.mark.parametrize("budget", ["32KiB", "20KiB"])
def test_the_smallest_budgets_run_with_overlap_as_without(tmp_path, budget):
    """The parameter budget of the forward alone (the outer module's parameter held while the
    inner one is fetched; two parameters): an update then waits for the forward to give
    back what it holds, never fails; with one parameter less neither mode can run forward,
    and both say so."""
    def train(overlap, folder):
        model = Outer()
        losses = []
        with offload_model(model, str(tmp_path / folder), budget=budget,
                           optimizer_budget="256KiB", optimizer=AdamW(lr=LR),
                           accumulation_steps=1, max_grad_norm=CLIP,
                           overlap_step=overlap) as om:
            for i in range(4):
                x = torch.randn(4, 64, generator=torch.Generator().manual_seed(i))
                loss = model(x).square().mean()
                losses.append(loss.item())
                om.backward(loss)
                om.step()
            return losses, om.master_state_dict()

    if budget == "20KiB":
        for overlap in (True, False):
            with pytest.raises(MemAscendError, match="budget"):
                train(overlap, f"small{overlap}")
        return
    a, b = train(True, "a"), train(False, "b")
    assert a[0] == b[0]
    for n in a[1]:
        assert torch.equal(a[1][n], b[1][n]), n
