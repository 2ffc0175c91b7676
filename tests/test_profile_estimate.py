"""``memascend profile estimate`` and the footprint model behind it: the components add up,
stock vs drop-in differ where the rules say, warnings, JSON, and bad input (one line, exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from memascend import sizing as sz
from memascend.errors import ConfigError
from memascend.profile import Workload, estimate_deepspeed, estimate_offload, machine_warnings
from memascend.shapes import load_model_config

MIB = 1 << 20
ZERO_INF = {"bf16": {"enabled": True},
            "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"},
                                  "offload_optimizer": {"device": "nvme"}}}


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "memascend.cli", "profile", "estimate", *args],
                          capture_output=True, text=True, timeout=60)


def test_stock_default_components_follow_deepspeed_rules():
    model = load_model_config("llama-34m")
    w = Workload(model, batch=1, seq=64, gpus=1)
    est = estimate_deepspeed(w, sz.parse_deepspeed_config(ZERO_INF))
    n = 33_694_208
    c = {x.name: x for x in est.components}
    assert c["param_pool"].nbytes == 5 * 100_000_256 * 2 and c["param_pool"].kind == "locked"
    assert c["param_pool_unpinned_copy"].kind == "virtual"
    assert c["partitioned_reserve"].nbytes == 0  # max_in_cpu 1e9 holds the whole model
    assert c["fp16_flat_cpu"].nbytes == n * 2
    assert c["optimizer_pool"].nbytes == 4 * sz.ds_align(n, 256) * 4
    assert c["gradient_buffer"].nbytes == n * 2
    assert c["adam_first_step"].nbytes == 2 * n * 4
    assert "activations" not in c  # on the GPU
    assert est.locked_bytes == c["param_pool"].nbytes + c["optimizer_pool"].nbytes
    assert est.peak_phase == "step"
    assert est.peak_bytes == est.persistent_bytes + c["adam_first_step"].nbytes
    assert any("#4221" in note for note in est.notes)


def test_drop_in_uses_exact_budgets_and_no_reserve():
    model = load_model_config("llama-34m")
    cfg = sz.parse_deepspeed_config({**ZERO_INF, "zero_optimization": {
        "stage": 3, "sub_group_size": 10_000_000,
        "offload_param": {"device": "nvme", "max_in_cpu": 0, "buffer_size": 5_000_000},
        "offload_optimizer": {"device": "nvme"}}})
    w = Workload(model, gpus=1)
    stock = estimate_deepspeed(w, cfg, flavor="stock")
    ma = estimate_deepspeed(w, cfg, flavor="memascend")
    largest = 8192 * 512  # embeddings
    assert stock.component("partitioned_reserve").nbytes > 0
    assert ma.component("partitioned_reserve").nbytes == 0
    # the tier holds at most buffer_count partitions, each leased exactly: the 5 largest
    # (embeddings and LM head, 4 Mi elements; then three MLP matrices of 512 x 1376)
    mlp = sz.round_up(512 * 1376 * 2)
    assert ma.component("param_pool").nbytes == 2 * largest * 2 + 3 * mlp
    assert ma.component("param_pool").nbytes < sz.ds_param_budget_bytes(5, largest * 2)
    assert stock.component("param_pool").nbytes == 5 * sz.ds_align(5_000_000, 512) * 2
    # the streamed step: one budget of pieces, no whole-sub-group buffers, no Adam state
    # created whole, no flat gradient buffer (gradients are pieces too)
    groups = sz.ds_sub_groups([x for x in _numels(model)], 10_000_000)
    largest_group = max(sum(g) for g in groups)
    streamed = sum(sum(g) for g in groups if sum(g) * 4 >= 1 << 20)
    # exact leases: the four fp32 tensors of the largest sub-group, under the 16-piece budget
    # and within half the streamed state (master, m, v), plus one gradient piece
    assert ma.component("optimizer_pool").nbytes == \
        min(16 * (16 << 20), 4 * sz.round_up(largest_group * 4),
            max(3 * (16 << 20), sz.round_up(6 * streamed))) + (16 << 20)
    assert ma.component("adam_first_step") is None
    assert ma.component("init_gradient_buffer") is None
    assert ma.component("gradient_buffer").nbytes == 0
    assert ma.component("grad_pieces").kind == "locked"  # pinned leases, kept after backward
    assert ma.component("fp16_flat_cpu").nbytes == stock.component("fp16_flat_cpu").nbytes
    assert ma.component("ipg_bucket").nbytes == stock.component("ipg_bucket").nbytes == 0  # GPU
    assert ma.peak_bytes < stock.peak_bytes
    # the overwrites in flight (at most the pinned tiers, and per area the write window and
    # the largest tensor) and 1/64 grown ahead
    staging = sum(c.nbytes for c in ma.components
                  if c.name in ("param_pool", "optimizer_pool", "grad_pieces"))
    assert ma.ssd.capacity < ma.ssd.capacity_peak < \
        ma.ssd.capacity + sz.store_slack_bytes(ma.ssd.capacity, staging)
    assert stock.ssd.capacity_peak == stock.ssd.capacity
    # fp32 gradient copies: stock keeps a bucket's in glibc's heap; the drop-in makes one
    # partition's at a time (streamed gradients) and returns it (fixed mmap threshold)
    assert stock.component("fp32_gradient_copies") is None  # every copy below 32 MiB
    copies = stock.component("fp32_gradient_copies_heap")
    assert copies.kind == "resident"
    assert copies.nbytes == 4 * sum(_numels(model))  # one bucket holds the whole model
    copies = ma.component("fp32_gradient_copies")
    assert (copies.kind, copies.phase, copies.nbytes) == ("transient", "backward", largest * 4)
    kept = estimate_deepspeed(w, sz.parse_deepspeed_config(
        {**ZERO_INF, "memascend": {"heap_mmap_threshold": 0, "stream_grads": False},
         "zero_optimization": {"stage": 3, "sub_group_size": 10_000_000,
                               "offload_param": {"device": "nvme", "max_in_cpu": 0,
                                                 "buffer_size": 5_000_000},
                               "offload_optimizer": {"device": "nvme"}}}), flavor="memascend")
    assert kept.component("fp32_gradient_copies_heap") == \
        stock.component("fp32_gradient_copies_heap")
    # streaming off: DeepSpeed-sized buffers, exact leases
    whole = estimate_deepspeed(w, sz.parse_deepspeed_config(
        {**ZERO_INF, "memascend": {"stream_optimizer": False},
         "zero_optimization": {"stage": 3, "sub_group_size": 10_000_000,
                               "offload_param": {"device": "nvme", "max_in_cpu": 0,
                                                 "buffer_size": 5_000_000},
                               "offload_optimizer": {"device": "nvme"}}}), flavor="memascend")
    groups = sz.ds_sub_groups([x for x in _numels(model)], 10_000_000)
    assert whole.component("optimizer_pool").nbytes == sz.ds_optimizer_budget_bytes(
        4, max(sum(g) for g in groups))
    assert whole.component("gradient_buffer").nbytes == \
        stock.component("gradient_buffer").nbytes
    assert whole.component("adam_first_step").nbytes == \
        stock.component("adam_first_step").nbytes


def test_cpu_run_heap_model_reduce_scatter_copy_and_idle_param_tier():
    """On a CPU run (gpus=0): stock's freed allocations below glibc's 32 MiB ceiling count as
    held (its heap keeps them), larger ones as transients; reduce-scatter's flat copy of the
    bucket is a backward transient of stock but not of the drop-in at world size 1; with
    max_in_cpu covering the model the drop-in's parameter tier leases nothing."""
    model = load_model_config("llama-134m")
    numels = _numels(model)
    big = [n for n in numels if n * 4 >= sz.GLIBC_MMAP_THRESHOLD_MAX]
    small = [n for n in numels if n * 4 < sz.GLIBC_MMAP_THRESHOLD_MAX]
    assert len(big) == 2 and small  # embeddings and LM head: 32000 x 768 fp32 = 94 MiB each
    cfg = sz.parse_deepspeed_config(ZERO_INF)
    w = Workload(model, batch=1, seq=64, gpus=0)
    stock = estimate_deepspeed(w, cfg)
    ma = estimate_deepspeed(w, cfg, flavor="memascend")
    c = {x.name: x for x in stock.components}
    assert (c["fp32_gradient_copies"].kind, c["fp32_gradient_copies"].nbytes) == \
        ("transient", 4 * sum(big))
    assert (c["fp32_gradient_copies_heap"].kind, c["fp32_gradient_copies_heap"].nbytes) == \
        ("resident", 4 * sum(small))
    assert c["init_materialize_heap"].nbytes == 4 * sum(small)
    assert c["reduce_scatter_copy"].nbytes == sum(numels) * 2
    assert c["reduce_scatter_copy"].phase == "backward"
    assert c["ipg_bucket"].nbytes == sum(numels) * 2  # on the CPU this time
    assert ma.component("reduce_scatter_copy") is None
    # the drop-in's 1 MiB threshold: its one fp32 partition copy at a time is returned
    assert ma.component("fp32_gradient_copies").kind == "transient"
    assert ma.component("fp32_gradient_copies_heap") is None
    assert ma.component("param_pool").nbytes == 0
    assert "no partition is read" in ma.component("param_pool").note
    # the heap-kept parts are held from their phase on: persistent + the largest phase
    assert stock.peak_bytes == stock.persistent_bytes + max(stock.phase_bytes().values())
    # without the fixed threshold the drop-in is under glibc's defaults like stock
    loose = estimate_deepspeed(w, sz.parse_deepspeed_config(
        {**ZERO_INF, "memascend": {"heap_mmap_threshold": 0}}), flavor="memascend")
    assert loose.component("init_materialize_heap") == c["init_materialize_heap"]
    # a run with MALLOC_MMAP_THRESHOLD_=131072: the copies are mmapped and returned
    fixed = estimate_deepspeed(w, cfg, mmap_threshold=128 << 10)
    assert fixed.component("fp32_gradient_copies").nbytes == \
        4 * sum(n for n in numels if n * 4 >= 128 << 10)
    assert fixed.component("fp32_gradient_copies_heap").nbytes == \
        4 * sum(n for n in numels if n * 4 < 128 << 10)  # the norms' weights
    assert fixed.peak_bytes < stock.peak_bytes
    with pytest.raises(ConfigError, match="mmap_threshold"):
        estimate_deepspeed(w, cfg, mmap_threshold=0)


def test_heap_and_tier_sizing_rules():
    t = sz.GLIBC_MMAP_THRESHOLD_MAX
    assert sz.heap_bytes([t - 1, t, t + 1, 5], t) == t - 1 + 5
    assert sz.heap_bytes([], t) == 0
    assert sz.ma_param_tier_bytes(2, [10, 9000, 4096, 5000]) == 12288 + 8192
    assert sz.ma_param_tier_bytes(5, []) == 0
    assert sz.ds_reduce_scatter_copy_bytes(10, 5_000_000, 2, 4) == 12 * 2  # padded to ranks
    assert sz.ds_reduce_scatter_copy_bytes(10_000_000, 5_000_000, 2, 1) == 5_000_000 * 2
    # backward fills buckets from the last parameter; one that does not fit flushes first
    assert sz.ds_reduce_buckets([5, 3, 4, 2], 6) == [[3, 2], [1], [0]]
    assert sz.ds_fp32_gradient_copy_allocations([5, 3, 4, 2], [5, 3, 4, 2], 6) == [8, 16]
    assert sz.ds_init_fp32_buffer_allocations([3, 9, 7, 8], [False, True, False, False],
                                              False) == [32, 28]
    assert sz.ds_init_fp32_buffer_allocations([3, 9], [False, False], True) == []
    assert sz.backward_transient_allocations(10, 2, 4, 100) == [1600, 1600, 20]


def test_memascend_block_is_validated_like_the_drop_in():
    with pytest.raises(ConfigError, match="memascend.optimizer_chunk"):
        sz.parse_deepspeed_config({"memascend": {"optimizer_chunk": 1000}})
    with pytest.raises(ConfigError, match="memascend.bogus"):
        sz.parse_deepspeed_config({"memascend": {"bogus": 1}})
    cfg = sz.parse_deepspeed_config({"memascend": {"optimizer_chunk": "1MiB",
                                                   "stream_grads": False}})
    assert (cfg.optimizer_chunk, cfg.stream_grads, cfg.stream_optimizer) == (1 << 20, False,
                                                                             True)


def _numels(model):
    import math

    from memascend.shapes import llama_parameter_shapes

    return [math.prod(s) for _n, s in llama_parameter_shapes(model)]


def test_fp16_overflow_check_stock_vs_chunked():
    model = load_model_config("llama-34m")
    cfg = sz.parse_deepspeed_config({**ZERO_INF, "bf16": {"enabled": False},
                                     "fp16": {"enabled": True}})
    n = 33_694_208
    stock = estimate_deepspeed(Workload(model), cfg)
    ma = estimate_deepspeed(Workload(model), cfg, flavor="memascend")
    assert stock.component("overflow_check").nbytes == n * 3
    assert ma.component("overflow_check").nbytes == (1 << 20) * 3
    assert stock.phase_bytes()["overflow_check"] == n * 3


def test_world_size_partitions_and_per_node_peak():
    model = load_model_config("llama-34m")
    one = estimate_deepspeed(Workload(model, gpus=1), sz.parse_deepspeed_config(ZERO_INF))
    four = estimate_deepspeed(Workload(model, gpus=4), sz.parse_deepspeed_config(ZERO_INF))
    assert four.ranks == 4 and four.node_peak_bytes == 4 * four.peak_bytes
    assert four.component("gradient_buffer").nbytes < one.component("gradient_buffer").nbytes / 3
    assert four.component("param_pool").nbytes == one.component("param_pool").nbytes


def test_plain_path_components_and_activations():
    model = load_model_config("llama-34m")
    w = Workload(model, batch=4, seq=256, gpus=0)
    est = estimate_offload(w, budget=64 * MIB, optimizer_budget=128 * MIB)
    c = {x.name: x for x in est.components}
    largest = sz.round_up(max(_numels(model)) * 4)
    # each tier's arena: its budget plus its largest tensor, reserved whole
    assert c["param_pool"].nbytes == 64 * MIB + largest
    assert c["optimizer_pool"].nbytes == 128 * MIB + largest
    assert c["activations"].nbytes == sz.llama_activation_bytes(model, 4, 256, 4)
    assert c["step_temporaries"].phase == "backward"  # the step is fused into backward
    assert c["gradient_queue"].nbytes == sz.offload_queue_bytes(_numels(model), 128 * MIB)
    assert est.peak_phase == "backward"
    # budgets larger than the tiers: each arena is what its tier can use, plus the slack
    big = estimate_offload(Workload(model, gpus=0), budget=8 << 30)
    numels = _numels(model)
    p = sum(sz.round_up(n * 4) for n in numels)
    o = 3 * sum(sz.round_up(n * 4) for n in numels)  # m, v, g
    assert big.component("param_pool").nbytes == p + largest
    assert big.component("optimizer_pool").nbytes == o + largest
    # with a GPU the activations are not host memory
    assert estimate_offload(Workload(model, gpus=1)).component("activations") is None


def test_plain_path_notes_a_budget_too_small_for_the_largest_tensor():
    model = load_model_config("llama-34m")
    est = estimate_offload(Workload(model), budget=1 * MIB)
    assert any("PoolExhaustedError" in n for n in est.notes)


def test_machine_warnings_ram_and_memlock():
    model = load_model_config("llama-34m")
    ests = [estimate_deepspeed(Workload(model), sz.parse_deepspeed_config(ZERO_INF)),
            estimate_offload(Workload(model), budget=64 * MIB)]
    warns = machine_warnings(ests, phys_bytes=1 << 30, lockable_bytes=8 * MIB)
    assert any("deepspeed" in w and "RAM" in w for w in warns)
    assert any("deepspeed" in w and "SIGABRT" in w for w in warns)
    assert any(w.startswith("memascend:") and "unlocked" in w for w in warns)
    assert machine_warnings(ests, phys_bytes=1 << 40, lockable_bytes=None) == []


def test_bad_workload_and_stage():
    model = load_model_config("llama-34m")
    with pytest.raises(ConfigError):
        Workload(model, batch=0)
    with pytest.raises(ConfigError):
        estimate_deepspeed(Workload(model), sz.parse_deepspeed_config({"zero_optimization": {"stage": 2}}))


def test_cli_table_and_json(tmp_path):
    cfg = tmp_path / "ds.json"
    cfg.write_text(json.dumps(ZERO_INF))
    out = cli("--model", "llama-34m", "--ds-config", str(cfg), "--gpus", "0", "--seq", "64")
    assert out.returncode == 0, out.stderr
    for needle in ("parameter swap pool", "peak RSS per rank", "SSD read per step",
                   "memascend-deepspeed", "% less"):
        assert needle in out.stdout
    out = cli("--model", "llama-34m", "--ds-config", str(cfg), "--json", "--budget", "64MiB")
    doc = json.loads(out.stdout)
    assert set(doc["estimates"]) == {"deepspeed", "memascend-deepspeed", "memascend"}
    assert doc["parameters"] == 33_694_208
    d = doc["estimates"]["deepspeed"]
    assert d["peak_bytes"] == d["persistent_bytes"] + max(d["phase_transient_bytes"].values())
    # the parameter arena: the budget plus the largest tensor in the config's dtype (bf16)
    largest = sz.round_up(max(_numels(load_model_config("llama-34m"))) * 2)
    assert doc["estimates"]["memascend"]["components"][2]["bytes"] == 64 * MIB + largest
    assert doc["deepspeed_config"]["param_buffer_count"] == 5
    assert "physical_bytes" in doc["machine"]


def test_cli_mmap_threshold_flag_and_environment():
    """Stock's heap model follows the run's glibc threshold: ``--mmap-threshold``, else
    ``$MALLOC_MMAP_THRESHOLD_``, else glibc's dynamic one."""
    import os

    clean = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}

    def stock_peak(*args: str, **env: str) -> int:
        out = subprocess.run([sys.executable, "-m", "memascend.cli", "profile", "estimate",
                              "--model", "llama-34m", "--gpus", "0", "--seq", "64", "--json",
                              *args], capture_output=True, text=True, timeout=60,
                             env={**clean, **env})
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["estimates"]["deepspeed"]["peak_bytes"]

    w = Workload(load_model_config("llama-34m"), seq=64, gpus=0)
    cfg = sz.parse_deepspeed_config(ZERO_INF)
    fixed = estimate_deepspeed(w, cfg, mmap_threshold=128 << 10).peak_bytes
    dynamic = estimate_deepspeed(w, cfg).peak_bytes
    assert fixed < dynamic
    assert stock_peak("--mmap-threshold", "128KiB") == fixed
    assert stock_peak(MALLOC_MMAP_THRESHOLD_="131072") == fixed
    assert stock_peak() == dynamic


def test_cli_without_ds_config_and_with_example_configs():
    out = cli("--model", "llama2-7b", "--seq", "2048")
    assert out.returncode == 0 and "no --ds-config" in out.stdout
    for path in ("configs/ds_zero3_nvme.json", "configs/ds_zero3_nvme_tuned.json"):
        out = cli("--model", "llama2-7b", "--ds-config", path, "--json")
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["estimates"]["deepspeed"]["peak_bytes"] > 0


@pytest.mark.parametrize("args,needle", [
    (("--model", "no-such-preset"), "unknown model preset"),
    (("--model", "/nonexistent/config.json"), "does not exist"),
    (("--model", "llama-34m", "--ds-config", "/nonexistent/ds.json"), "does not exist"),
    (("--model", "llama-34m", "--batch", "0"), "must be positive"),
    (("--model", "llama-34m", "--budget", "lots"), "cannot parse size"),
    (("--model", "llama-34m", "--mmap-threshold", "0"), "must be positive"),
])
def test_cli_bad_input_is_one_line_exit_2(args, needle):
    out = cli(*args)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not valid JSON"),
    ('{"zero_optimization": {"stage": 3, "offload_param": {"buffer_count": "x"}}}',
     "zero_optimization.offload_param.buffer_count"),
    ("[1, 2]", "expected a JSON object"),
])
def test_cli_malformed_ds_config(tmp_path, content, needle):
    cfg = tmp_path / "ds.json"
    cfg.write_text(content)
    out = cli("--model", "llama-34m", "--ds-config", str(cfg))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


@pytest.mark.parametrize("content,needle", [
    ("{broken", "not valid JSON"),
    ('{"hidden_size": 64}', "missing from the model config"),
    ('{"model_type": "gpt2", "hidden_size": 64}', "only 'llama'"),
])
def test_cli_malformed_model_config(tmp_path, content, needle):
    cfg = tmp_path / "config.json"
    cfg.write_text(content)
    out = cli("--model", str(cfg))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], out.stderr


def test_endurance_rows_and_json():
    """Bytes written per 1,000 steps always; with --drive-tbw the steps until the drive's
    rated endurance, from the written bytes per step of all ranks."""
    out = cli("--model", "llama2-7b", "--drive-tbw", "1200")
    assert out.returncode == 0, out.stderr
    assert "SSD written per 1,000 steps (TB)" in out.stdout
    assert "steps to the drive's 1200 TBW" in out.stdout
    doc = json.loads(cli("--model", "llama2-7b", "--drive-tbw", "1200", "--json").stdout)
    for e in doc["estimates"].values():
        per_step = e["ssd"]["written_per_step"]
        assert e["ssd"]["written_per_1000_steps"] == 1000 * per_step
        assert doc["endurance"]["steps"][e["system"]] == int(1200e12 // (per_step * e["ranks"]))
    assert "endurance" not in json.loads(cli("--model", "llama2-7b", "--json").stdout)
    bad = cli("--model", "llama2-7b", "--drive-tbw", "0")
    assert bad.returncode == 2


def test_offload_without_undo_needs_the_state_once_on_ssd():
    """offload_model keeps a step's old versions aside (~2x the state at its peak); with
    exact_undo=False (window declared) it holds the state once, without stored gradients."""
    w = Workload(load_model_config("llama2-7b"))
    undo = estimate_offload(w, compute_dtype="bfloat16")
    plain = estimate_offload(w, compute_dtype="bfloat16", exact_undo=False)
    assert undo.ssd.capacity_peak > 1.8 * undo.ssd.capacity
    assert plain.ssd.capacity < undo.ssd.capacity  # no gradients stored
    assert plain.ssd.capacity < plain.ssd.capacity_peak < 1.1 * plain.ssd.capacity
    assert "exact_undo=False" in plain.title
    out = cli("--model", "llama2-7b", "--no-undo", "--json")
    doc = json.loads(out.stdout)
    assert doc["estimates"]["memascend"]["ssd"]["capacity_peak"] == plain.ssd.capacity_peak


def test_offload_activation_tier_moves_the_saved_activations_to_ssd():
    """--activations ssd: RAM keeps one layer's worth and the top; the rest is SSD capacity
    and traffic; the tier's pinned arena is locked."""
    model = load_model_config("llama2-7b")
    w = Workload(model, seq=8192, gpus=0, checkpointing=True)
    base = estimate_offload(w)
    tier = estimate_offload(w, activations="ssd", activation_budget=32 * MIB)
    ram, moved = sz.llama_activation_tier_bytes(model, 1, 8192, 4, True)
    assert base.component("activations").nbytes - tier.component("activations").nbytes == \
        sz.llama_activation_bytes(model, 1, 8192, 4, True) - ram > 0
    assert tier.component("activation_pool").nbytes == 32 * MIB
    assert tier.component("activation_pool").kind == "locked"
    assert tier.ssd.written_per_step - base.ssd.written_per_step == moved
    assert tier.ssd.read_per_step - base.ssd.read_per_step == moved
    assert tier.ssd.capacity - base.ssd.capacity == moved
    assert tier.peak_bytes < base.peak_bytes
    out = cli("--model", "llama2-7b", "--gpus", "0", "--seq", "8192", "--checkpointing",
              "--dtype", "float32", "--activations", "ssd", "--activation-budget", "32MiB",
              "--json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["estimates"]["memascend"]["ssd"]["written_per_step"] == \
        tier.ssd.written_per_step
    with pytest.raises(ConfigError, match="activations"):
        estimate_offload(w, activations="disk")


def test_store_slack_is_the_smallest_bound_on_overwrites_in_flight_plus_growing_ahead():
    gib, mib = 1 << 30, 1 << 20
    window = sz.WRITE_WINDOW
    # without the largest tensor: the staging memory bounds what is in flight
    assert sz.store_slack_bytes(10 * gib, gib) == gib + 11 * gib // 64
    # with it: each of two areas holds at most the window and one tensor in flight
    assert sz.store_slack_bytes(10 * gib, gib, 100 * mib) == \
        2 * (window + 100 * mib) + (10 * gib + 2 * (window + 100 * mib)) // 64
    # and never more than what is stored
    assert sz.store_slack_bytes(mib, gib, 100 * mib) == mib + 2 * mib // 64


def test_estimate_reads_offload_models_environment_below_its_flags(monkeypatch):
    """MEMASCEND_OFFLOAD_* reach the plain path's estimate as they reach offload_model; a
    flag wins over its variable."""
    def plain(*flags, **env):
        for k, v in env.items():
            monkeypatch.setenv(f"MEMASCEND_OFFLOAD_{k}", v)
        out = cli("--model", "llama-134m", "--gpus", "0", "--json", *flags)
        for k in env:
            monkeypatch.delenv(f"MEMASCEND_OFFLOAD_{k}")
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["estimates"]["memascend"]

    w = Workload(load_model_config("llama-134m"), gpus=0)
    want = estimate_offload(w, compute_dtype="float32", budget=256 << 20, exact_undo=False)
    got = plain(EXACT_UNDO="0", BUDGET="256MiB", COMPUTE_DTYPE="float32")
    assert got["title"] == want.title and got["ssd"]["capacity_peak"] == want.ssd.capacity_peak
    flag = plain("--budget", "512MiB", EXACT_UNDO="0", BUDGET="256MiB")
    assert "512 + 512 MiB" in flag["title"] and "exact_undo=False" in flag["title"]
    assert "exact_undo" not in plain()["title"]
    monkeypatch.setenv("MEMASCEND_OFFLOAD_BUDGET", "lots")
    bad = cli("--model", "llama-134m", "--json")
    assert bad.returncode != 0 and "MEMASCEND_OFFLOAD_BUDGET" in bad.stderr
