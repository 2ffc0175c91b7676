"""One DeepSpeed ZeRO-3 training run in its own process, for tests/test_deepspeed.py.

``python tests/_ds_worker.py SPEC.json`` trains a small model with ZeRO-3 (CPU accelerator,
gloo) and prints one JSON line: the losses, and memascend's stats when it was enabled. The
spec says the model (``llama`` or ``mlp``), where parameters and optimizer state go
(``nvme`` with memascend enabled, or ``cpu``, which needs no aio op), how many steps, and
optionally a checkpoint to save after some step or to load before training, and ``adamw``
(keyword arguments of ``torch.optim.AdamW``, e.g. ``{"fused": true}``). Rank and world
size come from the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so the test
starts one such process per rank. A separate process per run keeps DeepSpeed's global state
(process group, patched classes) out of the test process.
"""
from __future__ import annotations

import json
import os
import sys


def build_model(spec):
    import torch

    torch.manual_seed(0)
    if spec["model"] == "llama":
        import transformers

        transformers.logging.set_verbosity_error()
        cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=2048,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=4096,
                                       max_position_embeddings=64, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg)
    return torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.GELU(),
                               torch.nn.Linear(1024, 512), torch.nn.GELU(),
                               torch.nn.Linear(512, 512))


def batch(spec, step, rank):
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    if spec["model"] == "llama":
        ids = torch.randint(0, 4096, (2, 32), generator=g)
        return {"input_ids": ids, "labels": ids}
    return {"x": torch.randn(4, 512, generator=g), "y": torch.randn(4, 512, generator=g)}


def loss_of(engine, spec, data):
    import torch

    if spec["model"] == "llama":
        return engine(input_ids=data["input_ids"], labels=data["labels"]).loss
    return torch.nn.functional.mse_loss(engine(data["x"]), data["y"])


def ds_config(spec):
    dev = spec["device"]
    off_param = {"device": dev, "nvme_path": spec["swap"], "buffer_count": 5,
                 "buffer_size": 2_000_000, "max_in_cpu": 0, "pin_memory": spec.get("pin", True)}
    off_opt = {"device": dev, "nvme_path": spec["swap"], "buffer_count": 4,
               "pin_memory": spec.get("pin", True)}
    if spec.get("fast_init"):
        off_opt["fast_init"] = True
    if spec.get("pipeline"):
        off_opt.update(pipeline_read=True, pipeline_write=True, buffer_count=12)
    cfg = {"train_micro_batch_size_per_gpu": 2,
           "gradient_accumulation_steps": spec.get("gas", 1),
           "zero_force_ds_cpu_optimizer": False, "steps_per_print": 10 ** 9,
           "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0,
                                 "stage3_param_persistence_threshold": 0,
                                 "offload_param": off_param, "offload_optimizer": off_opt,
                                 "sub_group_size": 1_000_000},
           "aio": {"block_size": 1 << 20, "queue_depth": 8}}
    if spec.get("clip"):
        cfg["gradient_clipping"] = spec["clip"]
    if spec.get("fp16"):
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000}
    if "memascend" in spec:
        cfg["memascend"] = spec["memascend"]
    return cfg


def main(path):
    with open(path) as f:
        spec = json.load(f)
    caught = []
    if spec.get("warnings"):  # record every warning (their text goes into the result)
        import warnings

        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **kw: caught.append(str(message))
    import torch
    import deepspeed

    if spec["device"] == "nvme" and spec.get("enable", True):
        import memascend.integrations.deepspeed as ma_ds

        ma_ds.enable()
        if "grad_max_open" in spec:  # force incomplete gradient pieces (tests)
            from memascend.integrations.deepspeed import grads as ma_grads

            ma_grads.MAX_OPEN = spec["grad_max_open"]
    if spec["model"] == "llama":
        # Import the model class before zero.Init patches tensor constructors: its lazy
        # imports (torch._dynamo) fail under the patch.
        import transformers

        transformers.LlamaForCausalLM  # noqa: B018 - the attribute access imports it
    rank = int(os.environ.get("RANK", "0"))
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = ds_config(spec)
    with deepspeed.zero.Init(config_dict_or_path=cfg, remote_device=spec["device"],
                             pin_memory=True):
        model = build_model(spec)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01,
                            **spec.get("adamw", {}))
    if spec.get("hf_checkpointing") is not None:  # transformers' (torch.utils.checkpoint)
        model.gradient_checkpointing_enable({"use_reentrant": spec["hf_checkpointing"]})
        model.train()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    tier = getattr(engine, "memascend_activations", None)
    if tier is not None and "act_min_bytes" in spec:
        tier.min_bytes = spec["act_min_bytes"]
    start = 0
    if spec.get("load"):
        engine.load_checkpoint(spec["load"], tag="ckpt")
        start = spec["load_step"]
    losses = []
    gas = spec.get("gas", 1)
    for step in range(start, spec["steps"]):
        for micro in range(gas):  # engine.step() steps the optimizer on the last one
            loss = loss_of(engine, spec, batch(spec, step * gas + micro, rank))
            if step in spec.get("overflow_steps", ()):
                loss = loss * float("inf")  # every gradient becomes inf or nan
            engine.backward(loss)
            engine.step()
            losses.append(float(loss.detach()))
        if spec.get("save") and step + 1 == spec["save_step"]:
            engine.save_checkpoint(spec["save"], tag="ckpt")
    out = {"rank": rank, "losses": losses,
           "numel": sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters()), "skipped_steps": int(engine.skipped_steps),
           "warnings": caught,
           "loss_scale": float(getattr(engine.optimizer, "loss_scale", 1.0))}
    if spec["device"] == "nvme" and spec.get("enable", True):
        from memascend.integrations.deepspeed import params as ma_params

        sw = next((p.nvme_swapper for p in model.parameters()
                   if getattr(p, "nvme_swapper", None) is not None), None)
        out["param_swapper"] = type(sw).__name__ if sw is not None else None
        out["param_stats"] = sw.stats() if isinstance(sw, ma_params.MemAscendParamSwapper) \
            else None
        out["optimizer_swapper"] = type(engine.optimizer.optimizer_swapper).__name__
        osw = engine.optimizer.optimizer_swapper
        out["optim_stats"] = osw.stats() if hasattr(osw, "stats") else None
        out["stats"] = ma_ds.stats()
    if tier is not None:
        tier.collect()
        out["activations"] = tier.stats().to_dict()
        out["activation_dir"] = tier.path
    from memascend.heap import mmap_threshold

    out["heap_mmap_threshold"] = mmap_threshold()
    with open("/proc/self/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    out["vm_lck_kb"] = int(status["VmLck"].split()[0])
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
