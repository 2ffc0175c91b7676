"""The DeepSpeed drop-in: ZeRO-3 with NVMe offload through memascend trains like CPU offload.

Each run is a separate process (tests/_ds_worker.py) on DeepSpeed's CPU accelerator with
gloo. Reference: the same model, data and config with ``offload_param`` and
``offload_optimizer`` on ``cpu`` (stock DeepSpeed, no aio op needed). Tolerance: losses agree
to 1e-6 relative — the update math is the same (a torch AdamW client optimizer on the same
fp32 partitions) and only where the partitions rest differs, so they are expected to be
equal; the tolerance only allows for reduction-order noise. Covered: a transformers LLaMA and
an MLP, the streamed optimizer step (bitwise, also in small pieces), DeepSpeed's own
whole-sub-group swappers (partitioned, pipelined), checkpoint save → load → continue (exact
resume), world size 2, the
config block (an unknown key is an error), and ``pin_memory: false`` locking nothing.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

WORKER = os.path.join(os.path.dirname(__file__), "_ds_worker.py")
REL = 1e-6


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, world: int = 1, timeout: float = 600, **spec):
    """Run the worker on ``world`` ranks; return rank 0's result (or raise with its log)."""
    spec.setdefault("swap", str(tmp_path / f"swap-{spec['device']}"))
    spec_path = tmp_path / f"spec-{os.getpid()}-{len(os.listdir(tmp_path))}.json"
    spec_path.write_text(json.dumps(spec))
    port = str(_port())
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, WORKER, str(spec_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise AssertionError(f"worker failed ({p.returncode}):\n{out[-4000:]}")
        line = [x for x in out.splitlines() if x.startswith("RESULT ")]
        results.append(json.loads(line[-1][len("RESULT "):]))
    return sorted(results, key=lambda r: r["rank"])


def close(a, b):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert abs(x - y) <= REL * max(abs(x), abs(y)), (a, b)


@pytest.mark.parametrize("model", ["llama", "mlp"])
def test_nvme_through_memascend_matches_cpu_offload(tmp_path, model):
    ref = run(tmp_path, model=model, device="cpu", steps=4)[0]
    got = run(tmp_path, model=model, device="nvme", steps=4)[0]
    close(got["losses"], ref["losses"])
    assert got["param_swapper"] == "MemAscendParamSwapper"
    # the optimizer steps each sub-group in pieces under its own small budget
    assert got["optimizer_swapper"] == "StreamingOptimizerSwapper"
    os_ = got["optim_stats"]
    # (16 pieces of 16 MiB, or half the streamed state when that is less)
    assert os_["pinned_peak"] <= os_["budget_bytes"] <= 16 * (16 << 20)
    assert os_["bytes_read"] > 0 and os_["bytes_written"] > 0
    eng = got["stats"]["engine"]
    assert eng["bytes_read"] > 0 and eng["bytes_written"] > 0 and eng["errors"] == 0
    ps = got["param_stats"]
    assert ps["overdraft_bytes"] == 0
    assert ps["peak_in_use_bytes"] <= ps["budget_bytes"]
    # everything it locked is in its pool's stats
    assert got["vm_lck_kb"] * 1024 >= got["stats"]["pool"]["locked"]
    # the swap folders hold one swap area per tier, not one file per tensor
    base = os.path.join(str(tmp_path / "swap-nvme"), "zero_stage_3")
    files = [f for d, _, fs in os.walk(base) for f in fs if not d.endswith(".meta")]
    assert sorted(files) == ["memascend.swp", "memascend.swp"], files


def test_pipelined_optimizer_swapper_and_fast_init(tmp_path):
    ref = run(tmp_path, model="mlp", device="cpu", steps=3)[0]
    whole = {"stream_optimizer": False}  # DeepSpeed's whole-sub-group swapping
    got = run(tmp_path, model="mlp", device="nvme", steps=3, pipeline=True,
              memascend=whole)[0]
    close(got["losses"], ref["losses"])
    assert got["optimizer_swapper"] == "MemAscendPipelinedOptimizerSwapper"
    part = run(tmp_path, model="mlp", device="nvme", steps=3, memascend=whole,
               swap=str(tmp_path / "swap-part"))[0]
    assert part["optimizer_swapper"] == "MemAscendPartitionedOptimizerSwapper"
    close(part["losses"], ref["losses"])
    # fast_init builds the fp32 state from the swapped parameters through the parameter
    # swapper's reserved buffers
    fast = run(tmp_path, model="mlp", device="nvme", steps=3, fast_init=True,
               swap=str(tmp_path / "swap-fast"))[0]
    close(fast["losses"], ref["losses"])


def test_streamed_step_in_small_pieces_is_bitwise(tmp_path):
    """64 KiB pieces: every sub-group is stepped in many pieces and parameters span piece
    boundaries; the losses are bit for bit those of the whole-sub-group step on CPU."""
    ref = run(tmp_path, model="llama", device="cpu", steps=4)[0]
    got = run(tmp_path, model="llama", device="nvme", steps=4,
              memascend={"optimizer_chunk": "64KiB"})[0]
    assert got["optimizer_swapper"] == "StreamingOptimizerSwapper"
    assert got["losses"] == ref["losses"]
    assert got["heap_mmap_threshold"] == 1 << 20  # the default, applied at zero.Init
    assert ref["heap_mmap_threshold"] is None  # stock DeepSpeed: glibc left alone
    assert got["optim_stats"]["pinned_peak"] <= 16 * (64 << 10)
    # gradients went through the swap area as pieces, not stage 3's flat buffer
    gp = got["optim_stats"]["grad_pieces"]
    assert gp["pieces_written"] > 0 and gp["partitions"] > 0
    # and with stream_grads off the step reads them from stage 3's flat buffer, same bits
    flat = run(tmp_path, model="llama", device="nvme", steps=4, swap=str(tmp_path / "s2"),
               memascend={"optimizer_chunk": "64KiB", "stream_grads": False})[0]
    assert flat["losses"] == ref["losses"]
    assert "grad_pieces" not in flat["optim_stats"]


def test_streamed_gradients_with_clipping_are_bitwise(tmp_path):
    """Gradient clipping at 0.05 (active every step): the norm memascend takes of each
    streamed partition in its float64 scratch gives the same losses, bit for bit, as stock
    CPU offload; with 64 KiB pieces some partitions are written straight into one piece and
    the others go through the temporary."""
    ref = run(tmp_path, model="llama", device="cpu", steps=3, clip=0.05)[0]
    got = run(tmp_path, model="llama", device="nvme", steps=3, clip=0.05,
              memascend={"optimizer_chunk": "64KiB"})[0]
    assert got["losses"] == ref["losses"]
    unclipped = run(tmp_path, model="llama", device="cpu", steps=3,
                    swap=str(tmp_path / "s2"))[0]
    assert unclipped["losses"][1:] != ref["losses"][1:]  # the clip did change the updates
    gp = got["optim_stats"]["grad_pieces"]
    assert 0 < gp["partitions_in_piece"] < gp["partitions"], gp


def test_streamed_gradients_accumulate_and_survive_incomplete_pieces(tmp_path):
    """Gradient accumulation over 2 micro-steps (later micro-steps add to the stored pieces),
    with one open piece at a time (pieces shared by two parameters are written incomplete
    and read back): bit for bit the losses of CPU offload."""
    ref = run(tmp_path, model="llama", device="cpu", steps=3, gas=2)[0]
    got = run(tmp_path, model="llama", device="nvme", steps=3, gas=2, grad_max_open=1,
              memascend={"optimizer_chunk": "64KiB"})[0]
    assert len(got["losses"]) == 6
    assert got["losses"] == ref["losses"]
    gp = got["optim_stats"]["grad_pieces"]
    assert gp["partial_writes"] > 0 and gp["base_reads"] > 0


@pytest.mark.parametrize("kernel", ["fused", "foreach"])
def test_fused_and_foreach_adamw_are_streamed_bitwise(tmp_path, kernel):
    """HF Trainer's default optimizer (``adamw_torch_fused``) and the ``foreach`` form are
    streamed too, each through torch's own kernel, piece by piece: the same losses bit for
    bit as DeepSpeed's whole-sub-group step with that optimizer on CPU."""
    ref = run(tmp_path, model="llama", device="cpu", steps=3, adamw={kernel: True})[0]
    got = run(tmp_path, model="llama", device="nvme", steps=3, adamw={kernel: True},
              memascend={"optimizer_chunk": "64KiB"})[0]
    assert got["optimizer_swapper"] == "StreamingOptimizerSwapper"
    assert got["losses"] == ref["losses"]


def test_an_optimizer_that_cannot_stream_says_so(tmp_path):
    got = run(tmp_path, model="mlp", device="nvme", steps=1, adamw={"amsgrad": True},
              warnings=True)[0]
    assert got["optimizer_swapper"] == "MemAscendPartitionedOptimizerSwapper"
    assert any("not streamed (torch AdamW with amsgrad=True)" in w for w in got["warnings"])


def test_checkpoint_save_load_continue(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    full = run(tmp_path, model="llama", device="nvme", steps=5, save=ckpt, save_step=3)[0]
    off = os.path.join(ckpt, "ckpt", "offloaded_tensors")
    held = sum(os.path.getsize(os.path.join(r, f)) for r, _d, fs in os.walk(off) for f in fs)
    # the export holds the state in use (fp32 master, m, v: 12 B per parameter at most, less
    # the small sub-groups kept in memory), not the swap area or gradients
    assert 0 < held <= 1.1 * 12 * full["numel"], (held, full["numel"])
    resumed = run(tmp_path, model="llama", device="nvme", steps=5, load=ckpt, load_step=3,
                  swap=str(tmp_path / "swap-resume"))[0]
    # The resumed run continues exactly: the fp32 masters, the AdamW moments and the step
    # counts went into the checkpoint with the streamed optimizer's swap area and came back
    # through the store. (DeepSpeed 0.19.8 itself does not restore the moments and step
    # counts of NVMe-offloaded state: stock resumes to 8.382914… here against 8.378934…
    # uninterrupted, checked with the async_io op built.)
    assert resumed["losses"] == full["losses"][3:]


@pytest.mark.parametrize("content", ["stock", "empty", "no-zero-file"])
def test_a_checkpoint_without_memascends_export_is_refused(tmp_path, content):
    """A checkpoint whose offloaded optimizer folder holds stock DeepSpeed's files (or
    nothing) is a MetadataError naming the missing export, never a silent start from the
    state the process had; so is one without its ZeRO file (the in-memory sub-groups'
    masters)."""
    ckpt = str(tmp_path / "ckpt")
    run(tmp_path, model="mlp", device="nvme", steps=2, save=ckpt, save_step=2)
    rank_dir = os.path.join(ckpt, "ckpt", "offloaded_tensors", "rank00")
    if content == "no-zero-file":
        for name in os.listdir(os.path.join(ckpt, "ckpt")):
            if name.endswith("optim_states.pt"):
                os.remove(os.path.join(ckpt, "ckpt", name))
        with pytest.raises(AssertionError, match="MetadataError.*ZeRO state"):
            run(tmp_path, model="mlp", device="nvme", steps=3, load=ckpt, load_step=2,
                swap=str(tmp_path / "swap-resume"))
        return
    for name in os.listdir(rank_dir):
        path = os.path.join(rank_dir, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    if content == "stock":
        with open(os.path.join(rank_dir, "optimizer_state.tensor.swp"), "wb") as f:
            f.write(b"\0" * 4096)
    with pytest.raises(AssertionError) as info:
        run(tmp_path, model="mlp", device="nvme", steps=3, load=ckpt, load_step=2,
            swap=str(tmp_path / "swap-resume"))
    log = str(info.value)
    assert "MetadataError" in log and "no memascend export" in log, log[-2000:]
    assert ("stock optimizer swapper" if content == "stock" else "incomplete") in log


EXT_DIR = os.environ.get("TORCH_EXTENSIONS_DIR",
                         os.path.expanduser("~/.cache/memascend-torch-ext"))


def test_stock_deepspeed_refuses_memascends_checkpoint(tmp_path, monkeypatch):
    """Stock DeepSpeed's NVMe load of a drop-in checkpoint would copy the export beside its
    own files and train on from the process's state; the model-states record makes it a
    MetadataError naming both swappers (needs stock's async_io op: ``make ds-ops``)."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    try:
        from bench.hf_trainer_rss import stock_unavailable
    finally:
        sys.path.pop(0)
    why = stock_unavailable(EXT_DIR)
    if why:
        pytest.skip(why)
    ckpt = str(tmp_path / "ckpt")
    run(tmp_path, model="mlp", device="nvme", steps=2, save=ckpt, save_step=2)
    with open(os.path.join(ckpt, "ckpt", "offloaded_tensors", "rank00",
                           "memascend-layout.json")) as f:
        assert json.load(f)["swapper"] == "StreamingOptimizerSwapper"
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", EXT_DIR)
    with pytest.raises(AssertionError) as info:
        run(tmp_path, model="mlp", device="nvme", enable=False, steps=3, load=ckpt,
            load_step=2, swap=str(tmp_path / "swap-stock"))
    log = str(info.value)
    assert "MetadataError" in log and "saved by memascend's DeepSpeed drop-in" in log, log[-3000:]
    assert "stock PartitionedOptimizerSwapper" in log, log[-3000:]


@pytest.mark.parametrize("change", [{"stream_optimizer": False}, {"optimizer_chunk": 8192}])
def test_a_checkpoint_of_another_layout_is_refused(tmp_path, change):
    """Saved with the streamed step in 16 MiB pieces; loaded with DeepSpeed's whole-sub-group
    swapper, or with smaller pieces: a MetadataError naming both, not a misread."""
    ckpt = str(tmp_path / "ckpt")
    run(tmp_path, model="mlp", device="nvme", steps=2, save=ckpt, save_step=2)
    with pytest.raises(AssertionError) as info:
        run(tmp_path, model="mlp", device="nvme", steps=3, load=ckpt, load_step=2,
            swap=str(tmp_path / "swap-resume"), memascend=change)
    log = str(info.value)
    assert "MetadataError" in log and "written by StreamingOptimizerSwapper" in log, log[-3000:]
    assert ("another layout" if "stream_optimizer" in change
            else '"optimizer_chunk" option to 16777216') in log, log[-3000:]


def test_the_writer_record_refuses_only_a_stock_engines_load():
    """Unpickling the model-states record inside ``DeepSpeedEngine._load_checkpoint`` of an
    engine without memascend's optimizer swapper raises; elsewhere (another engine's load
    with ``load_module_only``, a plain ``torch.load``) it is the plain record."""
    import pickle
    from types import SimpleNamespace

    from deepspeed.runtime.engine import DeepSpeedEngine

    from memascend.errors import MetadataError
    from memascend.integrations.deepspeed.marker import WrittenBy

    info = {"writer": "memascend", "version": "0", "swapper": "StreamingOptimizerSwapper",
            "layout": "pieces", "piece_numel": 1024, "sub_groups": {"0": 10}}
    blob = pickle.dumps({"module": None, "memascend": WrittenBy(info)})
    assert pickle.loads(blob)["memascend"] == info

    class Engine(DeepSpeedEngine):
        def __init__(self, swapper):  # no DeepSpeed set-up: only what the check reads
            self.optimizer = SimpleNamespace(optimizer_swapper=swapper)

        def _load_checkpoint(self, load_dir, tag, load_module_only=False):
            return pickle.loads(blob)

    class StockSwapper:
        pass

    with pytest.raises(MetadataError, match="stock StockSwapper") as err:
        Engine(StockSwapper())._load_checkpoint("/ck", "t1")
    assert err.value.path == "/ck/t1"
    with pytest.raises(MetadataError, match="not offloaded to NVMe"):
        Engine(None)._load_checkpoint("/ck", "t1")
    assert Engine(None)._load_checkpoint("/ck", "t1", load_module_only=True)["memascend"] == info


def test_checkpoint_export_leaves_gradients_out():
    from memascend.integrations.deepspeed.optim import _not_a_gradient

    assert _not_a_gradient("7/master/0") and _not_a_gradient("7/m/3")
    assert _not_a_gradient("7/step")
    assert not _not_a_gradient("7/g/0")
    assert not _not_a_gradient("optimizer/rank0/12_gradient.tensor.swp")


def test_locked_memory_stays_within_the_state_at_small_sizes(tmp_path):
    """A model whose whole state is smaller than the default budgets: the pinned memory
    locked at its peak stays below the state it stages (fp32 parameters, masters, m, v and
    gradients: 20 B per parameter). It was 103 MB for this 54 MB state: gradient pieces
    leased at the full 16 MiB piece size, and a streamed tier holding all of the optimizer
    state."""
    got = run(tmp_path, model="llama", device="nvme", steps=3)[0]
    state = 20 * got["numel"]
    pool = got["stats"]["pool"]
    assert pool["locked_peak"] <= state, (pool["locked_peak"], state)
    assert got["vm_lck_kb"] * 1024 <= state
    assert pool["locked_peak"] > 0


def test_world_size_two(tmp_path):
    ref = run(tmp_path, world=2, model="mlp", device="cpu", steps=3)
    got = run(tmp_path, world=2, model="mlp", device="nvme", steps=3)
    for r, g in zip(ref, got):
        close(g["losses"], r["losses"])
    swap = os.path.join(str(tmp_path / "swap-nvme"), "zero_stage_3")
    ranks = sorted(d for _, ds, _ in os.walk(swap) for d in ds if d.startswith("rank"))
    assert ranks == ["rank0", "rank0", "rank1", "rank1"]  # a folder per rank and tier


def test_unknown_key_in_config_block_is_an_error(tmp_path):
    with pytest.raises(AssertionError, match=r"memascend\.bogus.*unknown key"):
        run(tmp_path, model="mlp", device="nvme", steps=1, memascend={"bogus": 1})


def test_config_block_and_pin_memory_off(tmp_path):
    got = run(tmp_path, model="mlp", device="nvme", steps=2, pin=False,
              memascend={"param_budget": "64MiB", "checksum": "none",
                         "heap_mmap_threshold": 0})[0]
    assert got["param_stats"]["budget_bytes"] == 64 << 20
    assert got["heap_mmap_threshold"] is None  # the block's 0 was honoured: glibc untouched
    assert got["stats"]["pool"]["locked_peak"] == 0
    assert got["stats"]["pool"]["reserved_peak"] > 0


def test_fused_overflow_check_replaces_stage3_has_overflow(monkeypatch):
    """fp16 is not supported by DeepSpeed's CPU accelerator here, so the replacement is
    checked on its own: same answer as stage 3 for clean, inf and nan gradients, both
    branches, with the all-reduces DeepSpeed makes; and enable()/disable() swap it in/out."""
    import torch
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    import memascend.integrations.deepspeed as ma_ds
    from memascend.integrations.deepspeed import overflow

    reduces = []
    monkeypatch.setattr(overflow.dist, "all_reduce",
                        lambda t, op=None, group=None: reduces.append(("dp", group)))

    class Fake:
        dp_process_group = "dp-group"

        def __init__(self, flat):
            self.grad_partitions_flat_buffer = flat
            p = torch.nn.Parameter(torch.zeros(3, dtype=flat.dtype))
            p.grad = flat[:3].clone()
            self.fp16_groups = [[p]]

        def _model_parallel_all_reduce(self, tensor, op):
            reduces.append(("mp", None))

    n = 3 * (1 << 20) + 5  # more than one chunk
    for value, want in ((0.0, False), (float("inf"), True), (float("nan"), True)):
        flat = torch.ones(n, dtype=torch.float16)
        flat[-1] = value
        assert overflow.has_overflow(Fake(flat), True) is want
    flat = torch.ones(n, dtype=torch.float16)
    flat[1] = float("inf")
    assert overflow.has_overflow(Fake(flat), False) is True
    # streamed gradients were checked as they arrived: their flag counts too
    from types import SimpleNamespace

    for flag in (False, True):
        fake = Fake(torch.ones(8, dtype=torch.float16))
        fake._ma_grads = SimpleNamespace(overflow=flag)
        assert overflow.has_overflow(fake, True) is flag
    assert reduces[:2] == [("dp", "dp-group"), ("mp", None)]

    original = Stage3.has_overflow
    ma_ds.enable()
    try:
        assert Stage3.has_overflow is not original
        assert Stage3.has_overflow.__wrapped__ is original
    finally:
        ma_ds.disable()
    assert Stage3.has_overflow is original


def test_full_swap_disk_fails_with_a_clear_error(tmp_path, small_ext4):
    """A swap folder on a 32 MiB filesystem cannot hold the LLaMA's ~55 MB of state: the run
    stops with SwapIOError naming ENOSPC, the tensor and the file (stock DeepSpeed ignores
    the failed writes' results)."""
    with pytest.raises(AssertionError) as info:
        run(tmp_path, model="llama", device="nvme", steps=2, swap=small_ext4, timeout=300)
    log = str(info.value)
    assert "SwapIOError" in log and "No space left on device" in log, log[-2000:]
    # the file, and the tensor: a parameter's ``….tensor.swp`` or an optimizer piece
    # or gradient piece ``{sub-group}/{master|m|v|g}/{piece}``
    assert "memascend.swp" in log, log[-2000:]
    assert re.search(r"key=(\S+\.tensor\.swp|\d+_\d+/(master|m|v|g)/\d+)", log), log[-2000:]


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_tier_in_the_drop_in_is_bitwise(tmp_path, reentrant):
    """``"memascend": {"activations": "ssd"}`` with transformers' gradient checkpointing:
    the checkpoints' inputs (and the loss's tensors) wait in the activation tier's store
    under the NVMe folder, and the losses are bit for bit those without it."""
    ref = run(tmp_path, model="llama", device="nvme", steps=3, hf_checkpointing=reentrant,
              swap=str(tmp_path / "s1"))[0]
    got = run(tmp_path, model="llama", device="nvme", steps=3, hf_checkpointing=reentrant,
              memascend={"activations": "ssd", "activation_budget": "64KiB"},
              act_min_bytes=0, swap=str(tmp_path / "s2"))[0]
    assert got["losses"] == ref["losses"]
    st = got["activations"]
    assert st["saved"] > 0 and st["written_bytes"] == st["saved_bytes"]
    assert st["read_bytes"] > 0 and st["live_bytes"] == 0
    assert got["activation_dir"].startswith(str(tmp_path / "s2"))
    assert "activations" not in ref

