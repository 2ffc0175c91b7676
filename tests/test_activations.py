"""The activation tier: saved tensors of forward wait on SSD (or in pinned memory) until
backward, and training gives bitwise the losses and weights of the same run without it.

Through ``offload_model(..., activations=...)`` on a transformers LLaMA, with and without
activation checkpointing (both kinds), and standalone around plain PyTorch code: strides
kept, a tensor saved twice stored once, views with gaps and parameters left alone, stored
tensors deleted when autograd drops them, a second backward over a retained graph, a full
disk raising an error that names the tier, nothing of the tier in a checkpoint.
"""
from __future__ import annotations

import errno
import gc
import os

import pytest
import torch

from memascend.activations import ActivationTier
from memascend.errors import ConfigError, PoolExhaustedError, SwapIOError
from memascend.offload import AdamW, offload_model

from test_offload import llama_steps_match, twin_for_reference


def tiny_llama(seed=0):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("mode", ["ssd", "pinned"])
@pytest.mark.parametrize("checkpointing", ["none", "reentrant", "non-reentrant"])
def test_llama_with_activation_tier_is_bitwise(tmp_path, mode, checkpointing):
    model, ref, opt = twin_for_reference(tiny_llama(), checkpointing)
    budget = "64KiB" if mode == "ssd" else "16MiB"  # ssd: most tensors are read back
    with offload_model(model, str(tmp_path), budget="2MiB", optimizer=AdamW(lr=1e-3),
                       activations=mode, activation_budget=budget) as om:
        om.activations.min_bytes = 0  # the tiny model's tensors are all small
        llama_steps_match(om, model, ref, opt, 3, seq=32)
        st = om.stats().activations
        assert st["saved"] > 0 and st["restored"] >= st["saved"]
        assert st["live_bytes"] == 0  # everything autograd dropped is deleted
        if mode == "ssd":
            assert st["written_bytes"] == st["saved_bytes"]
            assert st["read_bytes"] > 0
            assert om.activations.swapper.stats().pinned_peak <= 64 << 10
            assert om.activations.store.stats().stored_bytes == 0
            assert om.activations.store.keys() == []
        few = 3 * (4 * model.config.num_hidden_layers + 4)  # 3 steps, a few per layer
        if checkpointing == "none":  # every op's saved tensors
            assert st["saved"] > few
        else:  # only the checkpoints' inputs and the loss's tensors
            assert st["saved"] <= few


class SaveTransposed(torch.autograd.Function):
    """y = x @ w, saving x transposed (a dense view with swapped strides)."""

    @staticmethod
    def forward(ctx, x, w):  # noqa: D102
        ctx.save_for_backward(x.t(), w)
        return x @ w

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        xt, w = ctx.saved_tensors
        assert xt.stride() == (1, xt.shape[0])  # the strides came back as saved
        return g @ w.t(), xt @ g


def plain_run(tier, x0, w):
    x = x0.clone().requires_grad_()
    ww = w.clone().requires_grad_()
    ctx = tier.saving() if tier is not None else torch.autograd.graph.saved_tensors_hooks(
        lambda t: t, lambda t: t)
    with ctx:
        h = SaveTransposed.apply(x, ww)
        sq = h * h  # h saved twice (self and other): stored once
        wide = torch.randn(64, 4096, generator=torch.Generator().manual_seed(0))
        part = wide[:, :1024].requires_grad_(False)  # a view with gaps
        loss = (sq.sum() + (part * sq[:, :1].sin()).sum())
    loss.backward()
    return loss.item(), x.grad, ww.grad


def test_standalone_tier_keeps_strides_shares_and_skips_views_with_gaps(tmp_path):
    g = torch.Generator().manual_seed(1)
    x0, w = torch.randn(64, 512, generator=g), torch.randn(512, 512, generator=g)
    want = plain_run(None, x0, w)
    tier = ActivationTier("ssd", str(tmp_path), budget="256KiB", min_bytes=4096)
    try:
        got = plain_run(tier, x0, w)
        assert got[0] == want[0]
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        tier.collect()
        st = tier.stats()
        assert st.shared >= 1
        assert st.kept >= 1  # the view with gaps stayed where it was
        assert st.live_bytes == 0 and tier.store.keys() == []
    finally:
        tier.close()


def test_retained_graph_backward_twice_and_dropped_graph(tmp_path):
    tier = ActivationTier("ssd", str(tmp_path), budget="64KiB", min_bytes=0)
    try:
        x = torch.randn(128, 256, requires_grad=True)
        with tier.saving():
            y = (x.sin() * x.cos()).exp().sum()
        y.backward(retain_graph=True)
        first = x.grad.clone()
        x.grad = None
        y.backward()
        assert torch.equal(first, x.grad)
        del y
        with tier.saving():
            z = x.sin().exp().sum()  # a forward whose graph is dropped without backward
        assert tier.stats().live_bytes > 0
        del z
        tier.collect()
        assert tier.stats().live_bytes == 0 and tier.store.keys() == []
    finally:
        tier.close()


def test_full_disk_names_the_activation_tier(small_ext4):
    tier = ActivationTier("ssd", small_ext4, budget="1MiB", min_bytes=0)
    try:
        x = torch.randn(1024, 1024, requires_grad=True)  # 4 MiB per saved tensor
        with pytest.raises(SwapIOError) as info:
            with tier.saving():
                h = x
                for _ in range(16):  # 64 MiB saved on a 32 MiB filesystem
                    h = h.sin()
        assert info.value.errno == errno.ENOSPC
        assert "activation tier" in str(info.value) and "acts.swp" in str(info.value)
        assert "saved tensor" in str(info.value) and info.value.key is not None
        del info, h  # the traceback holds the failed forward's graph
        gc.collect()
        tier.collect()
        with tier.saving():  # space came back: a smaller forward works
            y = x.sin().sin().sum()
        y.backward()
        with torch.no_grad():
            assert torch.equal(x.grad, x.sin().cos() * x.cos())
        assert tier.stats().restored >= 2
    finally:
        tier.close()


def test_pinned_tier_over_its_budget_is_a_clear_error(tmp_path):
    tier = ActivationTier("pinned", budget="1MiB", min_bytes=0)
    try:
        x = torch.randn(512, 512, requires_grad=True)  # 1 MiB per saved tensor
        with pytest.raises(PoolExhaustedError, match="activation tier .*raise activation_budget"):
            with tier.saving():
                x.sin().sin().sin()
    finally:
        tier.close()


def test_bad_options_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="activations"):
        ActivationTier("disk", str(tmp_path))
    with pytest.raises(ConfigError, match="activation_budget"):
        ActivationTier("ssd", str(tmp_path), budget=1024)
    with pytest.raises(ConfigError, match="swap_dir"):
        ActivationTier("ssd", None)


def test_checkpoint_holds_nothing_of_the_activation_tier(tmp_path):
    model = tiny_llama()
    model.gradient_checkpointing_enable({"use_reentrant": False})
    model.train()
    with offload_model(model, str(tmp_path / "swap"), budget="2MiB",
                       optimizer=AdamW(lr=1e-3), activations="ssd",
                       activation_budget="64KiB") as om:
        om.activations.min_bytes = 0
        x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
        om.backward(model(input_ids=x, labels=x).loss)
        om.step()
        om.save(str(tmp_path / "ckpt"))
    names = [f for _, _, files in os.walk(tmp_path / "ckpt") for f in files]
    assert names and not any("acts" in n for n in names)
    other = tiny_llama(seed=5)
    with offload_model(other, str(tmp_path / "swap2"), budget="2MiB",
                       optimizer=AdamW(lr=1e-3)) as om2:
        om2.load(str(tmp_path / "ckpt"))  # loads without an activation tier
        assert om2.step_count == 1


@pytest.mark.parametrize("checkpointing", [None, True, False])
def test_profiler_model_of_the_tier_matches_what_it_holds(tmp_path, checkpointing):
    """``memascend.sizing.llama_activation_tier_bytes`` (what ``profile estimate
    --activations ssd`` uses) against the bytes the tier actually held for a forward."""
    from memascend.sizing import llama_activation_tier_bytes

    model = tiny_llama()
    if checkpointing is not None:
        model.gradient_checkpointing_enable({"use_reentrant": checkpointing})
    model.train()
    tier = ActivationTier("ssd", str(tmp_path), budget="1MiB", min_bytes=0)
    try:
        x = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
        with tier.saving():
            loss = model(input_ids=x, labels=x).loss
        held = tier.stats().peak_live_bytes
        loss.backward()
    finally:
        tier.close()
    moved = llama_activation_tier_bytes(model.config.to_dict(), 2, 64, 4,
                                        checkpointing is not None)[1]
    assert abs(held - moved) <= 0.1 * moved, (held, moved)


def test_drop_in_attaches_a_tier_under_the_nvme_folder_or_refuses(tmp_path):
    """The DeepSpeed drop-in's ``"memascend": {"activations": ...}`` (no DeepSpeed needed
    here: the engine is a stand-in; tests/test_deepspeed.py trains a real one)."""
    from types import SimpleNamespace

    from memascend.dropin_options import Options
    from memascend.integrations.deepspeed.activations import attach_activations

    engine = SimpleNamespace(module=torch.nn.Linear(256, 256), global_rank=3)
    with pytest.raises(ConfigError, match="memascend.activations"):
        attach_activations(engine, {"zero_optimization": {"offload_param": {"device": "cpu"}}},
                           Options(activations="ssd"))
    with pytest.raises(ConfigError, match="memascend.activations"):
        Options(activations="disk")
    cfg = {"zero_optimization": {"offload_optimizer": {"device": "nvme",
                                                       "nvme_path": str(tmp_path)}}}
    tier = attach_activations(engine, cfg, Options(activations="ssd",
                                                   activation_budget="1MiB"))
    try:
        assert tier.path == str(tmp_path / "memascend_activations" / "rank3" / "acts.swp")
        tier.min_bytes = 0
        x = torch.randn(64, 256, requires_grad=True)
        engine.module(x).sin().sum().backward()
        assert tier.stats().saved >= 1 and x.grad is not None
    finally:
        tier.close()


def test_a_dropped_save_is_never_shared_by_a_later_one(tmp_path):
    """A holder autograd dropped sits in the deletion queue until collect(); a later save of
    the same memory in between (e.g. the cyclic GC dropped a graph mid-forward) must not
    share it: its bytes are about to be deleted."""
    tier = ActivationTier("ssd", str(tmp_path), budget="1MiB", min_bytes=0)
    try:
        x = torch.randn(256, 256, requires_grad=True)
        h = x * 2
        with tier.saving():
            y = h.sin().sum()  # saves h
        del y  # its holder dies: queued for deletion, not deleted yet
        collect, tier.collect = tier.collect, lambda: None  # the death lands mid-save
        try:
            with tier.saving():
                z = h.cos().sum()  # saves h again: same memory, same version
        finally:
            tier.collect = collect
        tier.collect()  # the dropped holder's bytes go
        z.backward()
        with torch.no_grad():
            assert torch.equal(x.grad, -h.sin() * 2)
        assert tier.stats().shared == 0
    finally:
        tier.close()
