"""The training children of ``fit_under_budget.py``: one process per run, inside a memory cgroup.

Each run is a fresh Python process, so its peak RSS (``VmHWM``) and the cgroup's peak are that
run's alone. The parent writes a spec (model config, steps, batch, budgets, swap folder) to a
JSON file and starts ``python bench/_fit_children.py KIND SPEC`` through
:meth:`MemoryCgroup.wrap <bench._cgroup.MemoryCgroup.wrap>` (:func:`run_child`); the child
trains and writes its per-step records to ``spec["out"]``. A child the kernel kills leaves
no result, so it also writes how far it got to ``spec["out"] + ".phase"``.

Both children build the same ``transformers.LlamaForCausalLM``, train on the same byte-level
tokenized standard-library text with the same seed, with reentrant activation checkpointing on
every decoder layer, fp32, AdamW lr 1e-4, and time forward, backward and step separately:

* ``memascend``: the model is built under :func:`memascend.meta_parameters` and materialized
  one module at a time by :func:`memascend.offload_model`, so it never exists in RAM. Bytes
  moved and wait time come from the two swappers' ``stats()``; the pinned pools' leases are
  counted by wrapping the pool instances' ``lease`` (the library is unchanged), and their new
  mappings (each maps, populates and locks memory) from their stats. The window is declared
  (``accumulation_steps=1``): one micro-batch per step.
* ``deepspeed``: stock ZeRO-3 with ``offload_param`` and ``offload_optimizer`` on NVMe (CPU
  accelerator, gloo, world size 1), the model built under ``deepspeed.zero.Init``. Bytes moved
  come from ``/proc/self/io`` (DeepSpeed has no counters). Its ``async_io`` and ``cpu_adam``
  ops are JIT-built into ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/memascend-torch-ext``,
  set here when absent, so a cache built once is reused).
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._cgroup import MemoryCgroup  # noqa: E402
from bench._proc import allocated_bytes, cpu_seconds, other_cpu, proc_io  # noqa: E402
from memascend.errors import MemAscendError  # noqa: E402
from memascend.sysinfo import fmt_bytes, proc_status  # noqa: E402

LR = 1e-4
DEFAULT_EXT_DIR = os.path.expanduser("~/.cache/memascend-torch-ext")
DS_OPS = ("async_io", "cpu_adam")
CGROUP_PREFIX = "memascend-fit"


def _corpus_ids(corpus: Any, gen: Any, batch: int, seq_len: int) -> Any:
    import torch

    starts = torch.randint(0, corpus.numel() - seq_len - 1, (batch,), generator=gen)
    return torch.stack([corpus[s:s + seq_len] for s in starts.tolist()]).long()


def _child_common(spec: dict[str, Any]) -> tuple[Any, Any, Any]:
    import torch
    import transformers

    from memascend.demo import load_corpus

    transformers.logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])
    corpus = torch.frombuffer(bytearray(load_corpus(4 << 20)), dtype=torch.uint8)
    gen = torch.Generator().manual_seed(spec["seed"])
    cfg = transformers.LlamaConfig(**spec["config"], attn_implementation="sdpa")
    return corpus, gen, cfg


def enable_checkpointing(model: Any) -> None:
    """Reentrant activation checkpointing of every decoder layer: activation memory stays at
    one layer's plus the layers' inputs (see fit_under_budget.py's docstring)."""
    kwargs = {"use_reentrant": True}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class LeaseMeter:
    """Counts the pinned pool's new leases: how many, bytes, and seconds in ``pool.lease()``.
    Wraps the instance's method; the library is unchanged."""

    def __init__(self, *pools: Any):
        self.count = self.nbytes = 0
        self.seconds = 0.0
        self.pools = pools
        for pool in pools:
            self._wrap(pool)

    def _wrap(self, pool: Any) -> None:
        inner = pool.lease

        def lease(nbytes: int) -> Any:
            t0 = time.perf_counter()
            out = inner(nbytes)
            self.seconds += time.perf_counter() - t0
            self.count += 1
            self.nbytes += nbytes
            return out

        pool.lease = lease

    def mappings(self) -> int:
        """Arenas the pools have mapped so far (each maps, populates and locks memory)."""
        return sum(p.stats().arenas_mapped_total for p in self.pools)

    def snapshot(self) -> tuple[int, int, float]:
        return self.count, self.nbytes, self.seconds


def _stats_dict(s: Any) -> dict[str, Any]:
    d = s.to_dict()
    d.pop("depth_history", None)
    return d


def _counters(om: Any) -> tuple[Any, Any, tuple[int, int]]:
    return om.params_sw.stats(), om.optim_sw.stats(), proc_io()


def _memascend_step(i: int, model: Any, om: Any, meter: LeaseMeter, ids: Any,
                    before: tuple[Any, Any, tuple[int, int]],
                    last: bool) -> tuple[dict[str, Any], tuple[Any, Any, tuple[int, int]]]:
    """One timed training step and its swapper, I/O and CPU deltas, and the counters at its
    end. Counters are taken once per step boundary (``before``: the previous step's end), so
    the writes a step leaves landing behind ``step()`` count in the window they land in; the
    last step's are waited for after its time is taken (``om.synchronize()``)."""
    ps0, os0, io0 = before
    cpu0, lease0, maps0 = cpu_seconds(), meter.snapshot(), meter.mappings()
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    t1 = time.perf_counter()
    om.backward(loss)
    t2 = time.perf_counter()
    om.step()
    t3 = time.perf_counter()
    cpu1, lease1 = cpu_seconds(), meter.snapshot()
    if last:
        om.synchronize()
    ps1, os1, io1 = after = _counters(om)
    rec = {"step": i + 1, "seconds": t3 - t0, "forward_s": t1 - t0, "backward_s": t2 - t1,
           "optimizer_s": t3 - t2, "loss": float(loss.detach()),
           "bytes_read": ps1.bytes_read - ps0.bytes_read + os1.bytes_read - os0.bytes_read,
           "bytes_written": (ps1.bytes_written - ps0.bytes_written
                             + os1.bytes_written - os0.bytes_written),
           "proc_read_bytes": io1[0] - io0[0], "proc_write_bytes": io1[1] - io0[1],
           "vm_hwm_bytes": proc_status().get("VmHWM", 0), **other_cpu(cpu0, cpu1),
           "leases_created": lease1[0] - lease0[0], "leased_bytes": lease1[1] - lease0[1],
           "lease_s": lease1[2] - lease0[2], "new_mappings": meter.mappings() - maps0}
    for tier, a, b in (("params", ps0, ps1), ("optim", os0, os1)):
        rec[f"{tier}_wait_s"] = b.wait_seconds - a.wait_seconds
        rec[f"{tier}_bytes_read"] = b.bytes_read - a.bytes_read
        rec[f"{tier}_bytes_written"] = b.bytes_written - a.bytes_written
        rec[f"{tier}_hits"] = b.hits + b.reuse_hits - a.hits - a.reuse_hits
        rec[f"{tier}_late"] = b.late - a.late
        rec[f"{tier}_misses"] = b.misses - a.misses
        rec[f"{tier}_budget_waits"] = b.budget_waits - a.budget_waits
    return rec, after


def child_memascend(spec: dict[str, Any]) -> dict[str, Any]:
    """Train under memascend's offload; runs inside the cgroup."""
    import torch
    import transformers

    from memascend.offload import AdamW, meta_parameters, offload_model

    corpus, gen, cfg = _child_common(spec)
    rss_runtime = proc_status().get("VmRSS", 0)
    with meta_parameters():
        model = transformers.LlamaForCausalLM(cfg)
    enable_checkpointing(model)
    model.train()
    t0 = time.perf_counter()
    # one micro-batch per step: the window is declared, so no gradient goes to SSD
    om = offload_model(model, spec["swap_dir"], budget=spec["param_budget"],
                       optimizer_budget=spec["optim_budget"],
                       optimizer=AdamW(lr=LR, weight_decay=0.0), accumulation_steps=1,
                       compute_dtype=torch.float32, init=model._init_weights)
    init_s = time.perf_counter() - t0
    meter = LeaseMeter(om.pool, om.optim_pool)
    steps = []
    try:
        counters = _counters(om)
        for i in range(spec["steps"]):
            ids = _corpus_ids(corpus, gen, spec["batch"], spec["seq_len"])
            rec, counters = _memascend_step(i, model, om, meter, ids, counters,
                                            last=i == spec["steps"] - 1)
            steps.append(rec)
            print(f"  memascend step {i + 1}/{spec['steps']}: {rec['seconds']:.1f} s "
                  f"(fwd {rec['forward_s']:.1f}, bwd {rec['backward_s']:.1f}, step "
                  f"{rec['optimizer_s']:.1f}), loss {rec['loss']:.3f}, "
                  f"{fmt_bytes(rec['bytes_read'])} read, {fmt_bytes(rec['bytes_written'])} "
                  f"written", file=sys.stderr, flush=True)
        sizes = om.training_state_bytes()
        ps, os_ = om.params_sw.stats(), om.optim_sw.stats()
        result = {
            "parameters": sizes["parameters"], "init_s": init_s,
            "rss_runtime_bytes": rss_runtime, "steps": steps,
            "training_state_bytes": sizes,
            "budget_bytes": {"params": spec["param_budget"], "optim": spec["optim_budget"]},
            "pinned_peak_bytes": {"params": ps.pinned_peak, "optim": os_.pinned_peak},
            "pool": om.pool.stats().to_dict(),
            "optim_pool": om.optim_pool.stats().to_dict(),
            "offload_stats": om.stats().to_dict(),
            "leases": dict(zip(("created", "bytes", "seconds"), meter.snapshot())),
            "engine_backend": om.engine.backend,
            # saved weight views kept as copies (extra RAM); 0 when all were re-derived
            "saved_view_copies": getattr(getattr(om, "_saved", None), "copies", None),
            "swapper_stats": {"params": _stats_dict(ps), "optim": _stats_dict(os_)},
        }
    finally:
        om.close()
    result["ssd_allocated_bytes"] = allocated_bytes(spec["swap_dir"])
    st = proc_status()
    result["peak_rss_bytes"] = st.get("VmHWM", 0)
    result["vm_lck_end_bytes"] = st.get("VmLck", 0)
    return result


def deepspeed_config(spec: dict[str, Any]) -> dict[str, Any]:
    """Stock ZeRO-3 NVMe offload; every non-default value is needed to run here, or lowers
    host memory (see fit_under_budget.py's docstring)."""
    return {
        "train_micro_batch_size_per_gpu": spec["batch"], "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
        "zero_optimization": {
            "stage": 3, "stage3_max_reuse_distance": 0, "sub_group_size": int(1e8),
            "offload_param": {"device": "nvme", "nvme_path": spec["swap_dir"],
                              "buffer_size": spec["largest_numel"], "max_in_cpu": 0},
            "offload_optimizer": {"device": "nvme", "nvme_path": spec["swap_dir"]},
        },
    }


def deepspeed_floor(spec: dict[str, Any], n_params: int) -> dict[str, Any]:
    """Host memory DeepSpeed 0.19.8 ZeRO-3 allocates whatever the limit, from its source
    (``stage3.py``: ``grad_partitions_flat_buffer``; the two swap-buffer pools), for this
    config; the Python runtime, activations and temporaries come on top."""
    cfg = deepspeed_config(spec)["zero_optimization"]

    def pad(n: int) -> int:  # 1024 B alignment of fp32 elements
        return -(-n // 256) * 256

    grads = 4 * n_params  # fp32 gradient partitions of every parameter, in CPU memory
    params = 5 * pad(cfg["offload_param"]["buffer_size"]) * 4  # buffer_count 5 (default)
    optim = 4 * pad(min(cfg["sub_group_size"], n_params)) * 4  # buffer_count 4 (default)
    return {"gradient_buffer_bytes": grads, "param_swap_buffers_bytes": params,
            "optimizer_swap_buffers_bytes": optim, "total_bytes": grads + params + optim}


def deepspeed_ops_prebuilt(ext_dir: str) -> bool:
    """Whether DeepSpeed's async_io and cpu_adam ops are already built in ``ext_dir``."""
    for op in DS_OPS:
        d = os.path.join(ext_dir, op)
        if not (os.path.isdir(d) and any(n.endswith(".so") for n in os.listdir(d))):
            return False
    return True


def _report_phase(spec: dict[str, Any], phase: str) -> None:
    """Record how far the child got (read by the parent if the child is killed)."""
    with open(spec["out"] + ".phase", "w", encoding="utf-8") as f:
        f.write(phase)
    print(f"  deepspeed: {phase} ...", file=sys.stderr, flush=True)


def child_deepspeed(spec: dict[str, Any]) -> dict[str, Any]:
    """Train under stock DeepSpeed ZeRO-3 NVMe offload; runs inside the cgroup."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", DEFAULT_EXT_DIR)
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(spec["port"])),
                 ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(k, v)
    import transformers

    corpus, gen, cfg = _child_common(spec)
    import deepspeed

    rss_runtime = proc_status().get("VmRSS", 0)
    ds_config = deepspeed_config(spec)
    deepspeed.init_distributed(dist_backend="gloo")
    _report_phase(spec, "zero.Init (model built and partitioned to NVMe)")
    t0 = time.perf_counter()
    with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device="nvme",
                             pin_memory=True):
        model = transformers.LlamaForCausalLM(cfg)
    enable_checkpointing(model)
    model.train()
    _report_phase(spec, "deepspeed.initialize (optimizer state to NVMe)")
    engine, _opt, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                              config=ds_config)
    init_s = time.perf_counter() - t0
    steps = []
    for i in range(spec["steps"]):
        _report_phase(spec, f"step {i + 1}")
        ids = _corpus_ids(corpus, gen, spec["batch"], spec["seq_len"])
        io0, cpu0 = proc_io(), cpu_seconds()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        engine.backward(loss)
        t2 = time.perf_counter()
        engine.step()
        t3 = time.perf_counter()
        io1, cpu1 = proc_io(), cpu_seconds()
        rec = {"step": i + 1, "seconds": t3 - t0, "forward_s": t1 - t0, "backward_s": t2 - t1,
               "optimizer_s": t3 - t2, "loss": float(loss.detach()),
               "bytes_read": io1[0] - io0[0], "bytes_written": io1[1] - io0[1],
               "vm_hwm_bytes": proc_status().get("VmHWM", 0), **other_cpu(cpu0, cpu1)}
        steps.append(rec)
        print(f"  deepspeed step {i + 1}/{spec['steps']}: {rec['seconds']:.1f} s, loss "
              f"{rec['loss']:.3f}, {fmt_bytes(rec['bytes_read'])} read, "
              f"{fmt_bytes(rec['bytes_written'])} written", file=sys.stderr, flush=True)
    st = proc_status()
    return {"parameters": sum(p.ds_numel for p in model.parameters()), "init_s": init_s,
            "rss_runtime_bytes": rss_runtime, "steps": steps, "config": ds_config,
            "deepspeed": deepspeed.__version__,
            "torch_extensions_dir": os.environ["TORCH_EXTENSIONS_DIR"],
            "ssd_allocated_bytes": allocated_bytes(spec["swap_dir"]),
            "peak_rss_bytes": st.get("VmHWM", 0), "vm_lck_end_bytes": st.get("VmLck", 0)}


def child_main(kind: str, spec_path: str) -> int:
    """Entry point of a training child: run, write the result JSON to ``spec["out"]``."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    try:
        result = (child_memascend if kind == "memascend" else child_deepspeed)(spec)
    except (MemAscendError, OSError, RuntimeError, ValueError, ImportError) as exc:
        result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]}
        print(f"fit_under_budget.py ({kind} child): error: {result['error']}", file=sys.stderr)
    with open(spec["out"], "w", encoding="utf-8") as f:
        json.dump(result, f)
    return 0 if "error" not in result else 1


def run_child(kind: str, spec: dict[str, Any], limit: int, workdir: str,
              timeout: float) -> dict[str, Any]:
    """Run one training child inside a fresh memory cgroup of ``limit`` bytes.

    Returns
    -------
    dict
        The child's result plus ``status`` ("ok", "oom-killed ...", "timeout ...",
        "error: ..."), ``exit_code``, ``wall_s``, the cgroup's view and ``limit_bytes``.
    """
    spec_path = os.path.join(workdir, f"{kind}-spec.json")
    spec["out"] = os.path.join(workdir, f"{kind}-{limit}-result.json")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    cg = MemoryCgroup(limit, CGROUP_PREFIX)
    proc = None
    t0 = time.monotonic()
    try:
        cmd = cg.wrap([sys.executable, os.path.abspath(__file__), kind, spec_path])
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = None
        wall = time.monotonic() - t0
        info = cg.info()
        result: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            with open(spec["out"], encoding="utf-8") as f:
                result = json.load(f)
        phase = None
        with contextlib.suppress(OSError):
            with open(spec["out"] + ".phase", encoding="utf-8") as f:
                phase = f.read()
        where = f" in {phase}" if phase else ""
        if rc is None:
            status = f"timeout: killed after {timeout:.0f} s{where}"
        elif rc == 0:
            status = "ok"
        elif info.get("oom_kills"):
            status = f"oom-killed by the {fmt_bytes(limit)} cgroup limit (exit {rc}){where}"
        elif "error" in result:
            status = f"error: {result['error']}"
        else:
            status = f"exit {rc}{where}"
        result.update(status=status, exit_code=rc, wall_s=wall, cgroup=info, limit_bytes=limit)
        return result
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        cg.remove()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("memascend", "deepspeed"):
        sys.exit("usage: _fit_children.py {memascend,deepspeed} SPEC.json (started by "
                 "fit_under_budget.py)")
    sys.exit(child_main(sys.argv[1], sys.argv[2]))
