"""The optimizer step fused into backward: exact in every path it can take.

Each test trains an offloaded model and an in-memory reference (``torch.optim.AdamW(foreach=
False)``, with ``clip_grad_norm_`` where clipping is on) on the same data and requires every
loss and every final master weight to be bitwise equal, while it checks which path the step
took: fused and committed, fused and undone (clipping redo, fp16 overflow, a longer window,
zero_grad), or deferred (two-phase). Also: a steady-state step maps and locks no new pinned
memory, the SSD traffic of a fused fp32 step, and the errors that keep a broken contract
from training silently wrong.
"""
from __future__ import annotations

import pytest
import torch

from memascend.errors import MemAscendError
from memascend.offload import AdamW, offload_model

LR = 1e-2


def net(seed: int = 0, width: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(32, width), torch.nn.GELU(),
                               torch.nn.Linear(width, width), torch.nn.LayerNorm(width),
                               torch.nn.Linear(width, 10))


def batch(i: int, scale: float = 1.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(100 + i)
    return (torch.randn(8, 32, generator=g) * scale).to(dtype), torch.randint(0, 10, (8,),
                                                                             generator=g)


def loss_of(model, x, y):
    return torch.nn.functional.cross_entropy(model(x).float(), y)


class Reference:
    """In-memory fp32 training: AdamW(foreach=False), optional clip_grad_norm_."""

    def __init__(self, seed=0, max_norm=None, width=64):
        self.model = net(seed, width)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=LR, foreach=False)
        self.max_norm = max_norm
        self.norms = []

    def micro(self, x, y):
        loss = loss_of(self.model, x, y)
        loss.backward()
        return loss.item()

    def step(self):
        if self.max_norm is not None:
            self.norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                    self.max_norm)))
        self.opt.step()
        self.opt.zero_grad()

    def discard(self):
        self.opt.zero_grad()


def assert_same_weights(om, ref):
    got = om.master_state_dict()
    for n, p in ref.model.named_parameters():
        assert torch.equal(got[n], p.detach()), n


def run(om, model, ref, windows, scale=1.0):
    """Train both on ``windows`` (a list of micro-batch counts); compare every loss."""
    i = 0
    for micro in windows:
        for _ in range(micro):
            x, y = batch(i, scale)
            i += 1
            want = ref.micro(x, y)
            loss = loss_of(model, x, y)
            om.backward(loss)
            assert loss.item() == want
        assert om.step()
        ref.step()


def run_scaled(om, model, ref, scales):
    """One single-micro-batch window per gradient scale on both; compare every loss and, with
    clipping, every global gradient norm."""
    for i, s in enumerate(scales):
        x, y = batch(i, s)
        want = ref.micro(x, y)
        loss = loss_of(model, x, y)
        om.backward(loss)
        assert loss.item() == want
        om.step()
        ref.step()
        if ref.max_norm is not None:
            assert om.last_grad_norm == ref.norms[-1]


def test_declared_window_fuses_every_step_and_maps_nothing_new(tmp_path):
    model, ref = net(), Reference()
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer_budget="256KiB",
                       optimizer=AdamW(lr=LR), accumulation_steps=1) as om:
        run(om, model, ref, [1])
        om.synchronize()  # the step's last writes land behind step()
        before = om.stats()
        run(om, model, ref, [1] * 5)
        om.synchronize()
        after = om.stats()
        assert after.arenas_mapped == before.arenas_mapped  # steady state: no new mapping
        assert after.locked_bytes == before.locked_bytes
        assert after.paths["fused_commits"] == 6 and after.paths["deferred_steps"] == 0
        assert after.paths["updates_in_step"] == 0
        # per step: the parameter read in forward and (the budget is small) in backward,
        # m and v read and written, the parameter written; no gradient leaves backward
        n = sum(p.numel() for p in ref.model.parameters())
        per_param = (after.ssd_read + after.ssd_written - before.ssd_read -
                     before.ssd_written) / 5 / n
        assert 20 <= per_param <= 28.5, per_param
        assert_same_weights(om, ref)
        assert not [k for k in om.optim_store.keys() if k.startswith("g/")]
        assert not [k for k in om.optim_store.keys() + om.param_store.keys() if "~" in k]


@pytest.mark.parametrize("declared", [None, 3])
def test_accumulation_windows(tmp_path, declared):
    model, ref = net(), Reference()
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=declared) as om:
        run(om, model, ref, [3, 3, 3])
        c = om.stats().paths
        if declared is None:  # the first window teaches the length, runs two-phase
            assert c["deferred_steps"] == 1 and c["fused_commits"] == 2
        else:
            assert c["deferred_steps"] == 0 and c["fused_commits"] == 3
        assert_same_weights(om, ref)


def test_a_shorter_window_runs_two_phase(tmp_path):
    model, ref = net(), Reference()
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=3) as om:
        run(om, model, ref, [3, 2, 3])  # step() after 2 of 3 micro-batches
        c = om.stats().paths
        assert c["fused_commits"] == 2 and c["deferred_steps"] == 1
        assert_same_weights(om, ref)


def test_a_longer_window_than_learned_is_undone_and_exact(tmp_path):
    model, ref = net(), Reference()
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR)) as om:
        run(om, model, ref, [1, 1, 2, 1, 3])
        c = om.stats().paths
        assert c["rollbacks_extended"] == 2
        assert_same_weights(om, ref)


def test_a_longer_window_than_declared_is_an_error_and_undone(tmp_path):
    model, ref = net(), Reference()
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=1) as om:
        run(om, model, ref, [1, 1])
        x, y = batch(50)
        om.backward(loss_of(model, x, y))
        with pytest.raises(MemAscendError, match="accumulation_steps=1"):
            loss_of(model, x, y)  # the next forward before step()
        assert_same_weights(om, ref)  # the fused update was undone
        run(om, model, ref, [1])  # and training goes on


def test_zero_grad_discards_a_fused_window(tmp_path):
    model, ref = net(), Reference()
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=1) as om:
        run(om, model, ref, [1, 1])
        x, y = batch(77)
        om.backward(loss_of(model, x, y))
        om.zero_grad()
        assert om.stats().paths["rollbacks_discarded"] == 1
        assert_same_weights(om, ref)
        run(om, model, ref, [1, 1])
        assert_same_weights(om, ref)


@pytest.mark.parametrize("declared", [None, 1])
def test_clipping_is_exact_whether_it_triggers_or_not(tmp_path, declared):
    # gradients large in some steps, small in others: clipping triggers in some windows only
    scales = [1.0, 30.0, 1.0, 1.0, 30.0, 30.0, 1.0, 1.0]
    model, ref = net(), Reference(max_norm=4.6)
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=declared, max_grad_norm=4.6) as om:
        run_scaled(om, model, ref, scales)
        clipped = sum(n > 4.6 for n in ref.norms)
        assert 0 < clipped < len(scales)
        c = om.stats().paths
        assert c["rollbacks_clip"] >= 1 and c["fused_commits"] >= 1
        assert c["rollbacks_clip"] + c["fused_commits"] + c["deferred_steps"] == len(scales)
        assert_same_weights(om, ref)


def test_fp16_overflow_in_a_fused_window_is_undone(tmp_path):
    model = net()
    with offload_model(model, str(tmp_path), budget="64KiB", compute_dtype=torch.float16,
                       optimizer=AdamW(lr=LR), accumulation_steps=1) as om:
        for i in range(3):
            x, y = batch(i, dtype=torch.float16)
            om.backward(loss_of(model, x, y))
            assert om.step()
        before = om.master_state_dict()
        om.loss_scale = 1e30  # the scaled gradients overflow fp16
        x, y = batch(9, dtype=torch.float16)
        om.backward(loss_of(model, x, y))
        assert om.step() is False
        assert om.stats().paths["skipped_steps"] == 1
        after = om.master_state_dict()
        assert all(torch.equal(before[n], after[n]) for n in before)


def test_bf16_declared_window_matches_reference_recipe(tmp_path):
    model = net()
    ref = net().to(torch.bfloat16)
    master = [p.detach().float().clone().requires_grad_(True) for p in net().parameters()]
    opt = torch.optim.AdamW(master, lr=LR, foreach=False)
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       compute_dtype=torch.bfloat16, accumulation_steps=2) as om:
        for s in range(3):
            acc = [None] * len(master)
            for m in range(2):
                x, y = batch(s * 2 + m, dtype=torch.bfloat16)
                want = loss_of(ref, x, y)
                want.backward()
                for i, p in enumerate(ref.parameters()):
                    acc[i] = p.grad.float() if acc[i] is None else acc[i].add_(p.grad)
                    p.grad = None
                loss = loss_of(model, x, y)
                om.backward(loss)
                assert loss.item() == want.item()
            om.step()
            for mp, a in zip(master, acc):
                mp.grad = a
            opt.step()
            opt.zero_grad()
            with torch.no_grad():
                for p, mp in zip(ref.parameters(), master):
                    p.copy_(mp)
        assert om.stats().paths["fused_commits"] == 3
        got = om.master_state_dict()
        for (n, _), mp in zip(net().named_parameters(), master):
            assert torch.equal(got[n], mp.detach()), n


def test_a_layer_used_in_two_reentrant_segments(tmp_path):
    """A shared layer inside two reentrant checkpoint segments gets its gradient in two
    inner backwards: the fused path cannot know the first is not final and says so; with
    fused_step=False it trains exactly."""
    from torch.utils.checkpoint import checkpoint

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.inp = torch.nn.Linear(32, 64)
            self.mid = torch.nn.Linear(64, 64)
            self.out = torch.nn.Linear(64, 10)

        def forward(self, x):
            h = self.inp(x)
            h = checkpoint(lambda t: torch.tanh(self.mid(t)), h, use_reentrant=True)
            h = checkpoint(lambda t: torch.tanh(self.mid(t)), h, use_reentrant=True)
            return self.out(h)

    model, ref = Shared(), Shared()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, foreach=False)
    with offload_model(model, str(tmp_path / "a"), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=1) as om:
        x, y = batch(0)
        with pytest.raises(MemAscendError, match="mid"):
            om.backward(loss_of(model, x, y))
        om.zero_grad()
    model = Shared()
    with offload_model(model, str(tmp_path / "b"), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=1, fused_step=False) as om:
        for i in range(3):
            x, y = batch(i)
            want = loss_of(ref, x, y)
            want.backward()
            opt.step()
            opt.zero_grad()
            loss = loss_of(model, x, y)
            om.backward(loss)
            om.step()
            assert loss.item() == want.item()
        got = om.master_state_dict()
        for n, p in ref.named_parameters():
            assert torch.equal(got[n], p.detach()), n
        assert om.stats().paths["deferred_steps"] == 3


def test_a_failing_write_undoes_the_window(tmp_path):
    """An I/O error in a fused update fails step() with the window undone: the weights are
    those of the last committed step, and training can go on."""
    model, ref = net(), Reference()
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=1) as om:
        run(om, model, ref, [1, 1])
        real = om.optim_store.write
        calls = []

        def failing(key, src, **kw):
            calls.append(key)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
            return real(key, src, **kw)

        om.optim_store.write = failing
        x, y = batch(60)
        try:
            om.backward(loss_of(model, x, y))
        except MemAscendError:
            pass  # the failure may already show in backward
        with pytest.raises(MemAscendError, match="No space left"):
            om.step()
        om.optim_store.write = real
        assert_same_weights(om, ref)
        ref_next = Reference()
        ref_next.model.load_state_dict(ref.model.state_dict())
        ref_next.opt.load_state_dict(ref.opt.state_dict())
        run(om, model, ref_next, [1, 1])
        assert_same_weights(om, ref_next)


def test_a_write_failing_after_step_returned_undoes_that_step(tmp_path):
    """step() returns once a fused window's updates ran; their writes may land behind it,
    overlapping the next forward. One that fails then is reported by the next call that
    settles the step (here the next backward): the step is undone, the weights are those of
    the step before, and training goes on."""
    from memascend.engine import SwapEngine

    armed = {"on": False, "n": 0}

    def fault(op, path, offset, nbytes, done, res):
        if op == "write" and armed["on"] and path.endswith("optim.swp"):
            armed["n"] += 1
            if armed["n"] == 2:
                return -5  # EIO, after the write was issued
        return res

    model, ref = net(), Reference()
    with SwapEngine(backend="threads", fault=fault) as eng, \
            offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                          accumulation_steps=1, engine=eng) as om:
        run(om, model, ref, [1, 1])
        om.synchronize()  # the last step's writes have landed: the fault hits the next one
        armed["on"] = True
        x, y = batch(60)
        where = None
        with pytest.raises(MemAscendError, match="failed") as ei:
            where = "backward"
            om.backward(loss_of(model, x, y))
            where = "step"
            om.step()  # the failure shows here or at the next backward
            where = "next backward"
            x, y = batch(61)
            om.backward(loss_of(model, x, y))
        assert where in ("step", "next backward") and "undone" in str(ei.value), where
        armed["on"] = False
        assert armed["n"] >= 2
        om.zero_grad()
        assert_same_weights(om, ref)
        run(om, model, ref, [1, 1])
        assert_same_weights(om, ref)


def test_synchronize_commits_the_step_with_its_writes(tmp_path):
    """om.synchronize() waits for the writes a fused window left landing behind step() and
    commits it: the old versions kept aside for the undo are gone and the counters hold the
    step's writes."""
    model, ref = net(), Reference()
    with offload_model(model, str(tmp_path), budget="64KiB", optimizer=AdamW(lr=LR),
                       accumulation_steps=1) as om:
        run(om, model, ref, [1, 1])
        om.synchronize()
        written = om.stats().ssd_written
        x, y = batch(70)
        om.backward(loss_of(model, x, y))
        om.step()
        om.synchronize()
        keys = om.param_store.keys() + om.optim_store.keys()
        assert not [k for k in keys if k.endswith("~")]
        n = sum(p.numel() for p in model.parameters())
        assert om.stats().ssd_written - written >= 3 * 4 * n  # weights, m and v
        om.synchronize()  # nothing running: a no-op


@pytest.mark.parametrize("declared", [1, None])
def test_torch_fused_adamw_kernel_is_bitwise_too(tmp_path, declared):
    """AdamW(fused=True): bitwise torch.optim.AdamW(fused=True) in memory, also through a
    clipping redo and a deferred first window."""
    model, ref = net(), net()
    opt = torch.optim.AdamW(ref.parameters(), lr=LR, fused=True)
    with offload_model(model, str(tmp_path), budget="64KiB", max_grad_norm=4.6,
                       optimizer=AdamW(lr=LR, fused=True), accumulation_steps=declared) as om:
        for i, s in enumerate([1.0, 30.0, 1.0, 1.0, 30.0]):
            x, y = batch(i, s)
            want = loss_of(ref, x, y)
            want.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), 4.6)
            opt.step()
            opt.zero_grad()
            loss = loss_of(model, x, y)
            om.backward(loss)
            om.step()
            assert loss.item() == want.item()
        got = om.master_state_dict()
        for n, p in ref.named_parameters():
            assert torch.equal(got[n], p.detach()), n
    # and the two kernels do differ, so the test above can tell them apart
    a, b = net(), net()
    for m, fused in ((a, True), (b, False)):
        o = torch.optim.AdamW(m.parameters(), lr=LR, fused=fused)
        for i in range(3):
            x, y = batch(i)
            loss_of(m, x, y).backward()
            o.step()
            o.zero_grad()
    assert any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
