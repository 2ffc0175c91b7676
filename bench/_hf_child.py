"""An HF Trainer fine-tuning script that knows nothing of memascend, for bench/hf_trainer_rss.py.

``python bench/_hf_child.py SPEC.json``: builds a LLaMA from a config (random weights, no
download) after ``TrainingArguments(deepspeed=<ZeRO-3 config>)`` (so under ``zero.Init``),
trains ``steps`` steps on fixed random tokens with HF's defaults otherwise pinned
(``adamw_torch``, constant LR, no shuffling surprises: one seed), and prints one JSON line:
the losses and the mean time of the steps after the first. Run as is, it uses DeepSpeed's
stock swappers; under ``memascend run`` the drop-in's. Spec keys: ``config`` (model config
dict), ``swap``, ``out``, ``steps``, ``seq``, ``batch``, ``ds`` (extra ZeRO settings merged into
``zero_optimization``).
"""
from __future__ import annotations

import json
import sys
import time


def main(path: str) -> int:
    with open(path) as f:
        spec = json.load(f)
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.LlamaForCausalLM  # noqa: B018 - imported before zero.Init patches tensors
    off = {"device": "nvme", "nvme_path": spec["swap"], "pin_memory": True}
    zero = {"stage": 3, "stage3_max_reuse_distance": 0, "offload_param": dict(off),
            "offload_optimizer": dict(off), **spec.get("ds", {})}
    ds = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
          "train_batch_size": "auto", "steps_per_print": 10 ** 9,
          "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
          "zero_optimization": zero}
    args = transformers.TrainingArguments(
        output_dir=spec["out"], deepspeed=ds, per_device_train_batch_size=spec["batch"],
        max_steps=spec["steps"], learning_rate=1e-4, weight_decay=0.01,
        lr_scheduler_type="constant", optim="adamw_torch", seed=0, save_strategy="no",
        logging_steps=10 ** 6, report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**spec["config"]))
    g = torch.Generator().manual_seed(7)
    vocab = spec["config"]["vocab_size"]
    rows = [{"input_ids": ids, "labels": ids.clone()}
            for ids in torch.randint(0, vocab, (spec["batch"] * spec["steps"], spec["seq"]),
                                     generator=g)]
    losses, stamps = [], []

    class Recording(transformers.Trainer):
        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            losses.append(float(loss))
            stamps.append(time.perf_counter())
            return loss

    Recording(model=model, args=args, train_dataset=rows).train()
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    print("RESULT " + json.dumps({"losses": losses,
                                  "step_s": sum(steps) / len(steps) if steps else None}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
