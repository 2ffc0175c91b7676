"""One training run of ``plain_vs_ram.py``, in its own process: in RAM or through offload_model.

``python bench/_plain_child.py SPEC_JSON`` reads a spec (kind ``ram`` or ``offload``, model
config, batch, steps, seed, AdamW settings, swap folder, offload options) and writes its
record to ``spec["out"]``. Both kinds build the same ``transformers.LlamaForCausalLM`` in RAM
from the same seed (so the initial weights are identical), fp32, and train on the same random
token batches; ``ram`` steps ``torch.optim.AdamW(foreach=False)``, ``offload`` hands the model
to :func:`memascend.offload_model` and drops the in-RAM copy. Peak RSS is measured over the
training steps only: ``VmHWM`` is reset (``/proc/self/clear_refs``) once the set-up is done,
so building the model in RAM does not count against the offloaded run.

Per step: wall time of forward, backward and the optimizer step, the loss, the process's CPU
seconds, what the rest of the machine used meanwhile; for ``offload`` also the SSD bytes its
two swap tiers read and wrote (store counters: exact tensor bytes), their areas' size and
the bytes stored in them after the step, new pinned mappings and
newly locked bytes (pool counters), and the optimizer's own statistics when it has them.
"""
from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench._proc import cpu_seconds, other_cpu  # noqa: E402
from memascend.sysinfo import proc_status  # noqa: E402


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _batches(spec: dict[str, Any], vocab: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(spec["seed"] + 1)
    return [torch.randint(0, vocab, (spec["batch"], spec["seq"]), generator=g)
            for _ in range(spec["steps"] * spec.get("accumulation", 1))]


def _model(spec: dict[str, Any]) -> Any:
    import torch
    import transformers

    torch.manual_seed(spec["seed"])
    cfg = transformers.LlamaConfig(**spec["config"])
    cfg.use_cache = False
    model = transformers.LlamaForCausalLM(cfg).float()
    model.train()
    if spec.get("checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    return model


def _tier_counts(om: Any) -> dict[str, int]:
    stats = {"params": om.param_store.stats(), "optim": om.optim_store.stats()}  # once each
    st = stats.values()
    ps = om.pool.stats()
    return {"read": sum(s.bytes_read for s in st), "written": sum(s.bytes_written for s in st),
            "mapped": ps.arenas_mapped_total, "locked": ps.locked, "leases": ps.leases_total,
            "area": sum(s.area_bytes for s in st), "stored": sum(s.stored_bytes for s in st),
            "areas": {name: {"area": s.area_bytes, "stored": s.stored_bytes,
                             "pieced": getattr(s, "writes_pieced", 0)}
                      for name, s in stats.items()}}


def main(spec_path: str) -> int:
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec.get("threads", torch.get_num_threads()))
    model = _model(spec)
    n_params = sum(p.numel() for p in model.parameters())
    data = _batches(spec, model.config.vocab_size)
    accum = spec.get("accumulation", 1)
    om = opt = None
    if spec["kind"] == "ram":
        kernel = {"fused": True} if spec.get("fused_adam") else {"foreach": False}
        opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=spec["wd"],
                                **kernel)
    else:
        import memascend

        opts = dict(spec.get("offload_options", {}))
        om = memascend.offload_model(model, spec["swap_dir"],
                                     optimizer=memascend.AdamW(
                                         lr=spec["lr"], weight_decay=spec["wd"],
                                         fused=bool(spec.get("fused_adam"))),
                                     **opts)
    gc.collect()
    hwm_reset = _reset_hwm()
    steps = []
    for step in range(spec["steps"]):
        c0 = cpu_seconds()
        before = _tier_counts(om) if om is not None else None
        t0 = time.perf_counter()
        fwd = bwd = 0.0
        losses = []
        for micro in range(accum):
            x = data[step * accum + micro]
            a = time.perf_counter()
            loss = model(input_ids=x, labels=x).loss
            b = time.perf_counter()
            loss.backward()
            c = time.perf_counter()
            fwd += b - a
            bwd += c - b
            losses.append(loss.item())
        s0 = time.perf_counter()
        if opt is not None:
            if spec.get("max_grad_norm"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), spec["max_grad_norm"])
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            om.step()
            om.zero_grad()
        t1 = time.perf_counter()
        rec: dict[str, Any] = {"step": step + 1, "time_s": t1 - t0, "forward_s": fwd,
                               "backward_s": bwd, "step_s": t1 - s0,
                               "losses": [float(v).hex() for v in losses], "loss": losses[-1]}
        rec.update(other_cpu(c0, cpu_seconds()))
        if om is not None:
            after = _tier_counts(om)
            rec.update(ssd_read=after["read"] - before["read"],
                       ssd_written=after["written"] - before["written"],
                       new_mappings=after["mapped"] - before["mapped"],
                       newly_locked=max(0, after["locked"] - before["locked"]),
                       new_leases=after["leases"] - before["leases"],
                       swap_area=after["area"], swap_stored=after["stored"],
                       swap_areas=after["areas"])
            stats = getattr(om, "stats", None)
            if callable(stats):
                rec["offload_stats"] = _plain(stats())
        steps.append(rec)
        print(f"[{spec['kind']}] step {step + 1}: {rec['time_s']:.2f} s loss {losses[-1]:.6f}",
              file=sys.stderr, flush=True)
    status = proc_status()
    out = {"kind": spec["kind"], "n_params": n_params, "steps": steps,
           "peak_rss": status.get("VmHWM", 0), "hwm_reset": hwm_reset,
           "threads": torch.get_num_threads()}
    if om is not None:
        om.close()
    Path(spec["out"]).write_text(json.dumps(out))
    return 0


def _plain(x: Any) -> Any:
    if hasattr(x, "to_dict"):
        return x.to_dict()
    return x


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
