"""The sizing rules: DeepSpeed 0.19.8's (checked against numbers measured from its source and
its own allocations), memascend's drop-in budgets, and the plain path against a real
``offload_model`` run (pinned peaks, bytes on SSD, bytes moved per step)."""
from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest

from memascend import sizing as sz
from memascend.config import parse_size
from memascend.errors import ConfigError

MIB = 1 << 20


def test_import_does_not_need_torch():
    code = "import sys, memascend.sizing, memascend.profile; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_round_up_and_alignment():
    assert sz.round_up(1) == 4096 and sz.round_up(4096) == 4096 and sz.round_up(0) == 0
    assert sz.ds_numel_alignment(2) == 512 and sz.ds_numel_alignment(4) == 256
    assert sz.ds_numel_alignment(2, intra_op_parallelism=4) == 2048
    assert sz.ds_align(100_000_000, 512) == 100_000_256


def test_swap_threshold_is_max_of_1mib_and_block_size():
    assert sz.ds_swap_threshold_bytes(1 << 20) == 1 << 20
    assert sz.ds_swap_threshold_bytes(4096) == 1 << 20
    assert sz.ds_swap_threshold_bytes(8 << 20) == 8 << 20
    assert sz.ds_is_swappable(512 * 1024, 2) and not sz.ds_is_swappable(512 * 1024 - 1, 2)
    assert not sz.ds_is_swappable(1 << 20, 2, block_size=4 << 20)


def test_sub_groups_close_at_size_and_overshoot_by_one_parameter():
    assert sz.ds_sub_groups([5, 5, 5], 100) == [[5, 5, 5]]
    assert sz.ds_sub_groups([6, 6, 1, 3], 7) == [[6, 6], [1, 3]]
    assert sz.ds_sub_groups([10, 1, 1], 10) == [[10], [1, 1]]
    assert sz.ds_sub_groups([], 10) == []


def test_default_parameter_pool_is_one_gigabyte():
    assert sz.ds_param_pool_bytes(5, 100_000_000, 2, 512) == 5 * 100_000_256 * 2


def test_notes_example_three_linear_layers_vmlck():
    """DEEPSPEED_NOTES.md: a bf16 model of three 1024x1024 Linear layers (with bias),
    buffer_count 4, buffer_size 2e6, max_in_cpu 0 locked exactly 70,980 kB (VmLck, page
    granular): 15,628 + 6,152 + 49,200 kB."""
    cfg = sz.parse_deepspeed_config({
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3,
                              "offload_param": {"device": "nvme", "buffer_count": 4,
                                                "buffer_size": 2_000_000, "max_in_cpu": 0},
                              "offload_optimizer": {"device": "nvme"}}})
    numels = [1024 * 1024, 1024] * 3
    a, a32 = sz.ds_numel_alignment(2), sz.ds_numel_alignment(4)
    groups = sz.ds_sub_groups(numels, cfg.sub_group_size)
    flat = sz.ds_fp16_flat_cpu_numel(sum(numels), cfg.max_in_cpu, cfg.params_on_nvme)
    in_cpu = sz.ds_subgroups_in_cpu([sum(g) for g in groups], flat, True)
    pool = sz.ds_param_pool_bytes(cfg.param_buffer_count, cfg.param_buffer_size, 2, a)
    reserve = sz.ds_partitioned_reserve_bytes(groups, [sum(g) for g in groups], in_cpu, 2, a)
    opt = sz.ds_optimizer_pool_bytes(cfg.optimizer_buffer_count, max(sum(g) for g in groups), 4, a32)
    kb = lambda n: math.ceil(n / 4096) * 4  # noqa: E731  (mlock locks whole pages)
    assert flat == 0 and in_cpu == [False]
    assert (kb(pool), kb(reserve), kb(opt)) == (15_628, 6_152, 49_200)
    assert kb(pool) + kb(reserve) + kb(opt) == 70_980


def test_partitioned_reserve_only_when_a_subgroup_is_on_nvme_and_uses_full_numel():
    groups = [[4096, 4096], [8192]]
    totals = [8192, 8192]
    assert sz.ds_partitioned_reserve_bytes(groups, totals, [True, True], 2, 512) == 0
    # full numels (world size 2 would halve the partitions, not the reserve)
    assert sz.ds_partitioned_reserve_bytes(groups, totals, [True, False], 2, 512) == 8192 * 2


def test_flat_cpu_buffer_is_capped_by_max_in_cpu_only_with_nvme():
    assert sz.ds_fp16_flat_cpu_numel(10, 4, params_on_nvme=True) == 4
    assert sz.ds_fp16_flat_cpu_numel(10, 4, params_on_nvme=False) == 10
    assert sz.ds_subgroups_in_cpu([3, 3, 3], 6, True) == [True, True, False]
    # a sub-group larger than what is left does not get a slice, even if a later one would fit
    assert sz.ds_subgroups_in_cpu([5, 3], 6, True) == [True, False]


def test_overflow_check_rules():
    assert sz.ds_overflow_check_bytes(1000, 2, fp16=True) == 3000
    assert sz.ds_overflow_check_bytes(1000, 2, fp16=False) == 0
    assert sz.chunked_overflow_check_bytes(2) == (1 << 20) * 3
    assert sz.chunked_overflow_check_bytes(2, fp16=False) == 0


def test_overflow_check_temporaries_measured():
    """torch.isinf over an fp16 buffer allocates |x| (2 B) and a bool (1 B) per element."""
    code = textwrap.dedent("""
        import torch
        def hwm():
            return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
        def rss():
            return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
        x = torch.ones(24 << 20, dtype=torch.float16)
        base = max(hwm(), rss())
        torch.isinf(x).any(); torch.isnan(x).any()
        print(hwm() - base)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew = int(out.stdout.strip())
    predicted = sz.ds_overflow_check_bytes(24 << 20, 2, fp16=True)
    assert abs(grew - predicted) / predicted < 0.05, (grew, predicted)


def test_drop_in_budgets_exact_formula():
    assert sz.ds_param_budget_bytes(5, 1) == 5 * 4096
    assert sz.ds_param_budget_bytes(5, 8192) == 5 * 8192
    assert sz.ds_param_budget_bytes(3, 10_000) == 3 * 12_288
    assert sz.ds_optimizer_budget_bytes(4, 1000) == 4 * 4096
    assert sz.ds_optimizer_budget_bytes(4, 1 << 20) == 4 * (4 << 20)


def test_parse_deepspeed_config_defaults():
    cfg = sz.parse_deepspeed_config({})
    assert (cfg.stage, cfg.param_device, cfg.optimizer_device) == (0, "none", "none")
    assert (cfg.param_buffer_count, cfg.param_buffer_size, cfg.max_in_cpu) == (5, 100_000_000,
                                                                             1_000_000_000)
    assert (cfg.optimizer_buffer_count, cfg.sub_group_size) == (4, 1_000_000_000)
    assert (cfg.aio_block_size, cfg.aio_queue_depth, cfg.aio_intra_op_parallelism) == (1 << 20, 8, 1)
    assert (cfg.model_dtype, cfg.grad_accum_dtype, cfg.reduce_bucket_size) == ("float32", "float32",
                                                                            500_000_000)


def test_parse_deepspeed_config_dtypes_auto_and_ignored_aio_keys():
    cfg = sz.parse_deepspeed_config({
        "fp16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"},
        "aio": {"thread_count": 8, "block_size": 4 << 20},
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto",
                              "offload_param": {"device": "nvme"}}})
    assert (cfg.model_dtype, cfg.grad_accum_dtype) == ("float16", "float32")
    assert cfg.model_bytes == 2 and cfg.grad_bytes == 4
    assert cfg.params_on_nvme and not cfg.optimizer_on_nvme
    assert cfg.swap_threshold_bytes == 4 << 20
    assert cfg.reduce_bucket_size == 500_000_000
    assert any("thread_count" in n for n in cfg.notes)
    assert any("'auto'" in n for n in cfg.notes)
    assert sz.parse_deepspeed_config({"bf16": {"enabled": True}}).model_dtype == "bfloat16"


@pytest.mark.parametrize("cfg,key", [
    ({"zero_optimization": {"stage": 7}}, "zero_optimization.stage"),
    ({"zero_optimization": {"sub_group_size": -1}}, "zero_optimization.sub_group_size"),
    ({"zero_optimization": {"offload_param": {"device": "disk"}}},
     "zero_optimization.offload_param.device"),
    ({"zero_optimization": {"offload_param": {"buffer_count": "five"}}},
     "zero_optimization.offload_param.buffer_count"),
    ({"zero_optimization": []}, "zero_optimization"),
    ({"aio": {"use_gds": "yes"}}, "aio.use_gds"),
    ({"data_types": {"grad_accum_dtype": "int8"}}, "data_types.grad_accum_dtype"),
])
def test_parse_deepspeed_config_bad_values_name_the_key(cfg, key):
    with pytest.raises(ConfigError) as exc:
        sz.parse_deepspeed_config(cfg)
    assert exc.value.key == key


def test_plain_budget_defaults_match_offload_model():
    from memascend.offload_types import OffloadOptions

    defaults = OffloadOptions()
    assert parse_size("budget", defaults.budget) == sz.OFFLOAD_DEFAULT_BUDGET
    assert defaults.optimizer_budget is None  # i.e. the same as budget
    assert sz.offload_budgets() == (1 << 30, 1 << 30)
    assert sz.offload_budgets(64 * MIB) == (64 * MIB, 64 * MIB)
    assert sz.offload_budgets(64 * MIB, 128 * MIB) == (64 * MIB, 128 * MIB)


def test_activation_rule_matches_saved_tensors():
    """The per-token element counts equal what autograd saves (unique storages), for a
    grouped-query LLaMA."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    cfg = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
           "max_position_embeddings": 256}
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg, attn_implementation="sdpa"))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    ids = torch.randint(0, 512, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _loss = model(input_ids=ids, labels=ids).loss
    predicted = sz.llama_activation_bytes(cfg, 2, 64, 4)
    assert abs(sum(seen.values()) - predicted) / predicted < 0.03, (sum(seen.values()), predicted)


def test_offload_rules_match_a_real_offload_model(tmp_path):
    """Pinned peaks, bytes on SSD and bytes moved by a steady-state step of offload_model
    against the plain-path rules (an MLP: no activations to speak of)."""
    torch = pytest.importorskip("torch")
    import memascend

    def build():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                   torch.nn.Linear(512, 300), torch.nn.ReLU(),
                                   torch.nn.Linear(300, 10))

    numels = [p.numel() for p in build().parameters()]
    x = torch.randn(8, 256)

    def run(budget, obudget):
        model = build()
        d = tmp_path / "swap"
        om = memascend.offload_model(model, str(d), budget=budget, optimizer_budget=obudget)
        try:
            for _ in range(2):
                om.backward(model(x).pow(2).mean())
                om.step()
            om.synchronize()  # the step's last writes land behind step()
            s0 = om.stats()
            om.backward(model(x).pow(2).mean())
            om.step()
            om.synchronize()
            s1 = om.stats()
            stored = (om.param_store.stats().stored_bytes, om.optim_store.stats().stored_bytes)
            pinned = (om.pool.stats().reserved_peak, om.optim_pool.stats().reserved_peak)
            return (pinned, stored, s1.ssd_read - s0.ssd_read,
                    s1.ssd_written - s0.ssd_written)
        finally:
            om.close()

    # Budgets larger than the tiers: each tier's arena is what the tier can use plus its
    # largest tensor, reserved whole. Default options: the window length is learned, so fused
    # windows keep their gradients (p, m, v and g: 16 B per parameter stored and written).
    big = 64 * MIB
    (pp, po), stored, read, written = run(big, big)
    assert (pp, po) == sz.offload_pinned_bytes(numels, 4, big, big)
    tiers = sz.offload_tier_bytes(numels, 4, grads=True)
    assert sum(stored) == sum(numels) * 4 * 4  # the store records exact bytes
    traffic = sz.offload_ssd_traffic(numels, 4, big, big)
    assert traffic.capacity == sum(tiers)
    assert written == sum(numels) * 4 * 4  # exact bytes of p, g, m, v
    assert traffic.written_per_step == sum(tiers)
    # Reads: the rule counts the parameters read in forward (an upper bound: with this budget
    # they stay resident) and m and v once.
    assert traffic.read_per_step == sum(tiers) - sum(sz.round_up(n * 4) for n in numels)
    assert sum(numels) * 4 * 2 <= read <= traffic.read_per_step


def test_offload_ssd_traffic_bound_counts_backward_rereads():
    numels = [1 << 20] * 4
    loose = sz.offload_ssd_traffic(numels, 4, budget=64 * MIB, grads=False)
    tight = sz.offload_ssd_traffic(numels, 4, budget=8 * MIB, grads=False)
    p, o = sz.offload_tier_bytes(numels, 4, grads=False)
    assert loose.read_per_step == p + o and tight.read_per_step == 2 * p + o
    assert loose.written_per_step == p + o  # declared window, no clipping: no gradient stored
    # the old versions kept aside until step() (all of it here: no gradients stored), the
    # overwrites in flight (at most the budgets, and per area the write window and the
    # largest tensor, 4 MiB here) and 1/64 grown ahead
    assert loose.capacity_peak == 2 * loose.capacity + sz.store_slack_bytes(
        2 * loose.capacity, 64 * MIB + 64 * MIB, 4 * MIB)
    big = 100 << 30  # a 7B model's state against its pinned tiers: within 1.1x
    assert sz.store_slack_bytes(big, 2 << 30) < 0.1 * big
    assert sz.store_slack_bytes(1 << 20, 1 << 30) == (1 << 20) + (2 << 20) // 64
    acc = sz.offload_ssd_traffic(numels, 4, budget=64 * MIB, micro_batches=3)
    g = sum(sz.round_up(n * 4) for n in numels)
    assert acc.read_per_step == 3 * p + o + 2 * g
    assert acc.written_per_step == p + o + 3 * g
    assert sz.offload_stores_grads(3) and sz.offload_stores_grads(1)
    assert not sz.offload_stores_grads(1, accumulation_declared=True)
    assert sz.offload_stores_grads(1, accumulation_declared=True, clipping=True)
    # bf16: the optimizer tier also holds the fp32 master
    assert sz.offload_tier_bytes(numels, 2, grads=False)[1] == 3 * 4 * sum(numels)


def test_ds_ssd_traffic_default_config_keeps_parameters_in_cpu():
    cfg = sz.parse_deepspeed_config({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "offload_param": {"device": "nvme"}, "offload_optimizer": {"device": "nvme"}}})
    numels = [4 << 20, 1 << 20, 1000]
    groups = sz.ds_sub_groups(numels, cfg.sub_group_size)
    in_cpu = sz.ds_subgroups_in_cpu([sum(g) for g in groups], 10 ** 9, True)
    t = sz.ds_ssd_traffic(numels, groups, in_cpu, cfg)
    # parameter files for the two swappable partitions; nothing read for parameters
    n = sum(numels)
    a32 = 256
    state = 3 * sz.ds_align(n, a32) * 4
    heads = sum(k // a32 * a32 * 4 for k in numels)
    assert t.capacity == (5 << 20) * 2 + state + heads
    assert t.read_per_step == state + heads == t.written_per_step
    cfg0 = sz.parse_deepspeed_config({"bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "offload_param": {"device": "nvme", "max_in_cpu": 0}}})
    t0 = sz.ds_ssd_traffic(numels, groups, [False], cfg0)
    assert t0.read_per_step == 2 * (5 << 20) * 2 and t0.written_per_step == (5 << 20) * 2
    assert sz.ds_ssd_traffic(numels, groups, [False], cfg0, recompute=True).read_per_step == \
        3 * (5 << 20) * 2


def test_runtime_constants_add_up():
    assert sz.runtime_bytes(transformers=False) == sz.TORCH_RUNTIME_BYTES + sz.MEMASCEND_IMPORT_BYTES
    assert sz.runtime_bytes(deepspeed=True) > sz.runtime_bytes() > sz.runtime_bytes(transformers=False)


def test_dtype_bytes():
    assert sz.dtype_bytes("torch.bfloat16") == 2 and sz.dtype_bytes("fp32") == 4
    with pytest.raises(ConfigError):
        sz.dtype_bytes("int3")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs /proc")
def test_measured_torch_runtime_is_close_to_the_constant():
    """The documented constant is what this machine measures, within 15 % (versions vary)."""
    code = ("import torch, memascend\n"
            "print(int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS'))"
            ".split()[1]) * 1024)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rss = int(out.stdout.strip())
    want = sz.runtime_bytes(transformers=False)
    assert abs(rss - want) / want < 0.15, (rss, want)
