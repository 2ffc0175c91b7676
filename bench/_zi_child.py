"""One ZeRO-3 / ZeRO-Infinity training run in a process of its own, for bench/zero_infinity.py.

``python bench/_zi_child.py SPEC_JSON`` builds a random-weight transformers LLaMA under
``deepspeed.zero.Init`` with parameters and optimizer state offloaded to NVMe, trains it for
``warmup + steps`` steps on fixed random tokens, and prints one line ``RESULT {json}`` on
stdout (DeepSpeed's own logging is sent to stderr). The spec names the system: ``stock``
(DeepSpeed's libaio swappers, the ``async_io`` op loaded from ``$TORCH_EXTENSIONS_DIR``) or
``memascend`` (``memascend.integrations.deepspeed.enable()`` first); everything else — model,
seed, data, DeepSpeed config, optimizer (``DeepSpeedCPUAdam`` in AdamW mode by default;
``"optimizer": "torch"`` takes ``torch.optim.AdamW`` with ``zero_force_ds_cpu_optimizer``
false) — is the same for both. A process per run gives every run a fresh
``VmHWM`` (peak RSS) and ``VmLck``, and keeps DeepSpeed's global state apart.

What it reports: wall time of each phase and of each step (forward, backward, optimizer step),
the bytes this process read and wrote at the block layer during the timed steps
(``/proc/self/io``, which counts O_DIRECT and io_uring I/O), the swap folder's allocated and
stored bytes after each step (:func:`swap_footprint`), ``/proc/self/status`` memory
after each phase, the losses (the same seed must give the same losses on both systems), and
where the big host buffers went, read from DeepSpeed's objects: the parameter swapper's pool,
the optimizer swapper's buffers (``buffer_count`` × the largest sub-group), stage 3's flat CPU
copy of the parameters (``max_in_cpu``) and its flat gradient buffer, and, with memascend,
the pool's and parameter tier's counters.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench._proc import proc_io  # noqa: E402

STATUS_KEYS = ("VmRSS", "VmHWM", "VmLck", "VmPin")


def status() -> dict[str, int]:
    """The memory lines of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            k, _, rest = line.partition(":")
            p = rest.split()
            if k in STATUS_KEYS and len(p) == 2:
                out[k] = int(p[0]) * 1024
    return out


def swap_footprint(folder: str, system: str) -> dict[str, Any]:
    """The swap folder's allocated bytes (``st_blocks``: what the filesystem holds for it)
    and the bytes of state stored in it: for stock DeepSpeed its files' sizes (a file per
    tensor, each exactly its tensor, aligned); for memascend the keys its stores hold."""
    allocated = apparent = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                st = os.stat(os.path.join(root, name))
            except OSError:  # removed meanwhile
                continue
            allocated += st.st_blocks * 512
            if name.endswith(".swp") and system == "stock":
                apparent += st.st_size
    if system == "memascend":
        from memascend.integrations.deepspeed.runtime import current_runtime

        rt = current_runtime()
        stores = rt.stores() if rt is not None else []
        apparent = sum(st.stats().stored_bytes for st in stores)
        # where each area's bytes are: what it stores, free space (overwrites in flight
        # need a second extent) and growth ahead
        parts = [{"area": os.path.relpath(st.path, folder), "area_bytes": x.area_bytes,
                  "stored_bytes": x.stored_bytes, "free_bytes": x.free_bytes}
                 for st in stores for x in [st.stats()]]
        return {"allocated": allocated, "stored": apparent, "areas": parts}
    return {"allocated": allocated, "stored": apparent}


def ds_config(spec: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config: NVMe offload of parameters and optimizer state, with the
    spec's buffer settings (absent keys keep DeepSpeed's defaults)."""
    swap = spec["swap_dir"]
    st = spec["settings"]
    off_param = {"device": "nvme", "nvme_path": swap, "pin_memory": True, **st.get("param", {})}
    off_opt = {"device": "nvme", "nvme_path": swap, "pin_memory": True, **st.get("optimizer", {})}
    zero = {"stage": 3, "stage3_max_reuse_distance": 0, "offload_param": off_param,
            "offload_optimizer": off_opt, **st.get("zero", {})}
    cfg = {"train_micro_batch_size_per_gpu": spec["batch"], "gradient_accumulation_steps": 1,
           "steps_per_print": 10 ** 9, "zero_optimization": zero}
    if spec.get("optimizer", "cpu_adam") != "cpu_adam":
        cfg["zero_force_ds_cpu_optimizer"] = False  # a torch optimizer with offload
    if spec.get("memascend_options"):
        cfg["memascend"] = dict(spec["memascend_options"])  # read by the drop-in only
    return cfg


def nbytes(t: Any) -> int:
    """Bytes of a tensor's elements (0 for None)."""
    return 0 if t is None else int(t.numel()) * int(t.element_size())


def breakdown(engine: Any, model: Any) -> dict[str, Any]:
    """Where the big host buffers of stage 3 went (bytes), read from DeepSpeed's objects."""
    opt = engine.optimizer
    out: dict[str, Any] = {}
    sw = next((p.nvme_swapper for p in model.parameters()
               if getattr(p, "nvme_swapper", None) is not None), None)
    out["param_swapper"] = type(sw).__name__ if sw is not None else None
    if sw is not None and hasattr(sw, "stats"):  # memascend's: a byte budget, exact leases
        out["param_tier"] = sw.stats()
    elif sw is not None:
        out["param_pool_bytes"] = nbytes(getattr(sw, "buffers", None))
        out["param_writeback_buffer_bytes"] = nbytes(getattr(sw, "partitioned_swap_buffer", None))
    osw = getattr(opt, "optimizer_swapper", None)
    if osw is not None:
        out["optimizer_swapper"] = type(osw).__name__
        out["optimizer_largest_numel"] = int(osw.largest_numel)
        if hasattr(osw, "swap_buffer_manager"):  # whole-sub-group buffers
            out["optimizer_swap_buffers_bytes"] = sum(
                nbytes(t) for t in osw.swap_buffer_manager.all_buffers)
        else:  # memascend's streamed step: the peak of its budgeted pieces
            out["optimizer_tier"] = osw.stats()
            out["optimizer_swap_buffers_bytes"] = int(out["optimizer_tier"]["pinned_peak"])
    out["flat_cpu_params_bytes"] = sum(nbytes(t) for t in
                                       getattr(opt, "param_groups_fp16_flat_cpu_memory", []))
    out["grad_flat_buffer_bytes"] = nbytes(getattr(opt, "grad_partitions_flat_buffer", None))
    numels = [int(p.ds_tensor.ds_numel) for p in model.parameters()]
    where = [getattr(p.ds_tensor, "final_location", None) for p in model.parameters()]
    out["params_total"] = sum(numels)
    out["params_kept_in_cpu"] = sum(n for n, w in zip(numels, where) if w == "not-nvme")
    out["sub_groups"] = len(getattr(opt, "fp16_groups", []))
    return out


def run(spec: dict[str, Any]) -> dict[str, Any]:
    """Build, initialise and train; the measurements (see the module docstring)."""
    marks: dict[str, dict[str, Any]] = {}
    t_start = time.perf_counter()

    def mark(name: str) -> None:
        marks[name] = {"t": time.perf_counter() - t_start, **status()}

    import torch
    import deepspeed

    if spec["system"] == "memascend":
        import memascend.integrations.deepspeed as ma_ds

        ma_ds.enable()
    # Import the model class before zero.Init patches tensor constructors: its lazy imports
    # (torch._dynamo) fail under the patch.
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.logging.set_verbosity_error()
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    mark("imported")
    cfg = ds_config(spec)
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=cfg, remote_device="nvme", pin_memory=True):
        model = LlamaForCausalLM(LlamaConfig(**spec["model"]))
    mark("model_built")
    if spec.get("optimizer", "cpu_adam") == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt = DeepSpeedCPUAdam(model.parameters(), lr=1e-4, weight_decay=0.0, adamw_mode=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    mark("initialized")
    steps, warm, losses = [], [], []
    io0 = io1 = (0, 0)
    warmup, timed = spec["warmup"], spec["steps"]
    for step in range(warmup + timed):
        g = torch.Generator().manual_seed(1000 + step)
        ids = torch.randint(0, spec["model"]["vocab_size"], (spec["batch"], spec["seq"]),
                            generator=g)
        if step == warmup:
            mark("warmed_up")
            io0 = proc_io()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        s1 = status()
        engine.backward(loss)
        t2 = time.perf_counter()
        s2 = status()
        engine.step()
        t3 = time.perf_counter()
        s3 = status()
        losses.append(float(loss.detach()))
        foot = swap_footprint(spec["swap_dir"], spec["system"])
        rec = {"swap_allocated": foot["allocated"], "swap_stored": foot["stored"],
               "swap_areas": foot.get("areas"),
               "forward_s": t1 - t0, "backward_s": t2 - t1, "step_s": t3 - t2,
               "total_s": t3 - t0, "hwm_after": [s1["VmHWM"], s2["VmHWM"], s3["VmHWM"]],
               "rss_after": [s1["VmRSS"], s2["VmRSS"], s3["VmRSS"]]}
        (steps if step >= warmup else warm).append(rec)
    io1 = proc_io()
    mark("trained")
    out: dict[str, Any] = {
        "system": spec["system"], "steps": steps, "warmup_steps": warm, "losses": losses,
        "step_time_s": sum(s["total_s"] for s in steps) / max(len(steps), 1),
        "read_bytes_per_step": (io1[0] - io0[0]) / max(timed, 1),
        "write_bytes_per_step": (io1[1] - io0[1]) / max(timed, 1),
        "marks": marks, "breakdown": breakdown(engine, model),
        # the swap folder at the end of each timed step: its largest allocation over what
        # it stored then (1.0: no space beyond the state)
        "swap_area_ratio": max((s["swap_allocated"] / s["swap_stored"] for s in steps
                                if s["swap_stored"]), default=None),
        "deepspeed": deepspeed.__version__, "torch": torch.__version__,
        "torch_threads": torch.get_num_threads()}
    if spec["system"] == "memascend":
        out["memascend"] = ma_ds.stats()
    return out


def main(argv: list[str]) -> int:
    """Run the spec given as a JSON string; print ``RESULT {json}``."""
    spec = json.loads(argv[0])
    real_stdout = sys.stdout
    sys.stdout = sys.stderr  # DeepSpeed logs to stdout; keep ours for the result
    res = run(spec)
    real_stdout.write("RESULT " + json.dumps(res, default=str) + "\n")
    real_stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
