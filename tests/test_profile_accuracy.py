"""Estimate vs measurement on real runs of memascend's plain-PyTorch path (``offload_model``).

Each case trains a transformers LLaMA for two steps in a child process started under
``memascend profile run`` (the training child of ``bench/estimate_accuracy.py``) and compares
the profiler's peak RSS with :func:`memascend.profile.estimate_offload`. For small models the
Python + torch + transformers runtime (~335 MiB) dominates, so it is measured in the same test
(a child that only imports the same modules) and passed to the estimate; everything else
comes from the sizing rules. Two cases: one dominated by the pinned budgets (a 34 M-parameter
model, batch 1 x 64), one by activations (a 4-layer model, batch 4 x 512: ~270 MiB of
activations and logits gradients). Tolerance: 10 %.

The same for DeepSpeed ZeRO-3 with memascend's swappers (``memascend.integrations.deepspeed``,
no ``async_io`` build needed): the 34 M model with DeepSpeed's default NVMe-offload config
(bf16), and with a memory-lean config (``max_in_cpu`` 0, sub-groups the size of the largest
parameter) under ``MALLOC_MMAP_THRESHOLD_=131072``: with glibc's default malloc that config's
~25 MB per-sub-group temporaries stay in the heap after they are freed, which the model does
not predict (the benchmark records that miss). Stock DeepSpeed needs its slow ``async_io``
build and is in the benchmark only.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memascend import sizing as sz

# These compare an estimate with the peak RSS of real training runs. On this shared 2-core
# machine, with other test processes running at the same time, the measured baselines and
# peaks were off by up to 3x (a 3.3 GiB "runtime" for an import-only child): a measurement,
# not a unit test. bench/estimate_accuracy.py reports the same comparison; run these with
# MEMASCEND_ACCURACY_TESTS=1 on a quiet machine.
pytestmark = pytest.mark.skipif(
    os.environ.get("MEMASCEND_ACCURACY_TESTS") != "1",
    reason="peak-RSS accuracy runs need a quiet machine: set MEMASCEND_ACCURACY_TESTS=1")
from memascend.profile import Workload, estimate_deepspeed, estimate_offload
from memascend.shapes import llama_parameter_shapes, load_model_config

pytest.importorskip("torch")
pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parent.parent / "bench" / "estimate_accuracy.py"
REPO = BENCH.parent.parent
MIB = 1 << 20


def _run_child(kind: str, spec: dict, tmp_path: Path) -> dict:
    spec = dict(spec, out=str(tmp_path / f"{kind}.json"))
    spec_path = tmp_path / f"{kind}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(spec.get("env", {}))
    proc = subprocess.run([sys.executable, "-m", "memascend.cli", "profile", "run", "--json",
                           "--interval", "50", "--", sys.executable, str(BENCH), "--_child", kind,
                           "--spec", str(spec_path)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(Path(spec["out"]).read_text())
    assert "error" not in result, result
    result["profile"] = json.loads(proc.stdout[proc.stdout.index("{"):])
    return result


@pytest.fixture(scope="module")
def runtime_bytes(tmp_path_factory) -> int:
    tmp = tmp_path_factory.mktemp("runtime")
    res = _run_child("runtime-memascend", {"fix_malloc": True, "swap_dir": str(tmp)}, tmp)
    return res["profile"]["peak_rss_bytes"]


@pytest.mark.parametrize("model,batch,seq", [
    ("llama-34m", 1, 64),      # pinned budgets and runtime
    ("llama-tiny", 4, 512),    # activations
])
def test_plain_path_peak_rss_within_10_percent(model, batch, seq, runtime_bytes, tmp_path):
    cfg = load_model_config(model)
    largest = max(math.prod(s) for _n, s in llama_parameter_shapes(cfg))
    budget, obudget = 4 * sz.round_up(largest * 4), 8 * sz.round_up(largest * 4)
    swap = Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else tmp_path
    import tempfile

    swap_dir = tempfile.mkdtemp(prefix="memascend-acc-", dir=swap)
    try:
        res = _run_child("memascend", {"model": cfg, "batch": batch, "seq": seq, "steps": 2,
                                       "swap_dir": swap_dir, "budget": budget,
                                       "optimizer_budget": obudget, "fix_malloc": True}, tmp_path)
    finally:
        import shutil

        shutil.rmtree(swap_dir, ignore_errors=True)
    measured = res["profile"]["peak_rss_bytes"]
    assert measured >= res["peak_rss_bytes"] * 0.99  # the profiler saw the child's own VmHWM
    w = Workload(cfg, batch=batch, seq=seq, gpus=0, runtime_bytes=runtime_bytes)
    est = estimate_offload(w, compute_dtype="float32", budget=budget, optimizer_budget=obudget)
    err = (est.peak_bytes - measured) / measured
    detail = (f"{model} {batch}x{seq}: estimate {est.peak_bytes / MIB:.0f} MiB ({est.peak_phase}), "
              f"measured {measured / MIB:.0f} MiB, runtime {runtime_bytes / MIB:.0f} MiB, "
              f"error {100 * err:+.1f} %; components "
              + ", ".join(f"{c.name} {c.nbytes / MIB:.0f}" for c in est.components))
    print(detail)
    assert abs(err) <= 0.10, detail
    # the pinned part on its own: the pool never held more than the budgets (+ rounding slack)
    assert res["pool_in_use_peak_bytes"] <= 1.10 * (budget + obudget)


@pytest.fixture(scope="module")
def ds_runtime_bytes(tmp_path_factory) -> int:
    pytest.importorskip("deepspeed")
    tmp = tmp_path_factory.mktemp("ds-runtime")
    res = _run_child("runtime-deepspeed", {"swap_dir": str(tmp), "port": _free_port()}, tmp)
    return res["profile"]["peak_rss_bytes"]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("config", ["default", "tuned-mmap128k"])
def test_deepspeed_with_memascend_swappers_within_10_percent(config, ds_runtime_bytes, tmp_path):
    import shutil
    import tempfile

    sys.path.insert(0, str(REPO))
    from bench.estimate_accuracy import _with_path, ds_configs

    cfg = load_model_config("llama-34m")
    numels = [math.prod(s) for _n, s in llama_parameter_shapes(cfg)]
    ds_cfg = ds_configs(cfg, numels)["deepspeed" if config == "default" else "deepspeed-tuned"]
    swap = Path("/var/tmp") if os.access("/var/tmp", os.W_OK) else tmp_path
    swap_dir = tempfile.mkdtemp(prefix="memascend-acc-ds-", dir=swap)
    try:
        spec = {"model": cfg, "batch": 1, "seq": 64, "steps": 2, "swap_dir": swap_dir,
                "ds_config": _with_path(ds_cfg, swap_dir), "port": _free_port()}
        if config != "default":
            spec["env"] = {"MALLOC_MMAP_THRESHOLD_": "131072"}
        res = _run_child("memascend-deepspeed", spec, tmp_path)
    finally:
        shutil.rmtree(swap_dir, ignore_errors=True)
    measured = res["profile"]["peak_rss_bytes"]
    w = Workload(cfg, batch=1, seq=64, gpus=0, runtime_bytes=ds_runtime_bytes)
    est = estimate_deepspeed(w, sz.parse_deepspeed_config(spec["ds_config"]), flavor="memascend")
    err = (est.peak_bytes - measured) / measured
    detail = (f"drop-in {config}: estimate {est.peak_bytes / MIB:.0f} MiB ({est.peak_phase}), "
              f"measured {measured / MIB:.0f} MiB, runtime {ds_runtime_bytes / MIB:.0f} MiB, "
              f"error {100 * err:+.1f} %")
    print(detail)
    assert abs(err) <= 0.10, detail
    # the drop-in's pinned memory never exceeds the estimate's locked budgets by more than
    # the few-page rounding of its leases
    assert res["pool_in_use_peak_bytes"] <= 1.02 * est.locked_bytes
