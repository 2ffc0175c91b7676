"""One training run of a real DeepSpeed client in its own process, for tests/test_hf_clients.py.

``python tests/_hf_worker.py SPEC.json`` trains a tiny LLaMA with ZeRO-3 (CPU accelerator,
gloo, one rank) through HF ``Trainer`` (``TrainingArguments(deepspeed=<dict>)``, the model
built by ``from_config`` after the arguments, so under ``zero.Init``) or through an
accelerate loop (``Accelerator(deepspeed_plugin=...)``, ``prepare``, ``save_state`` /
``load_state``), and prints one JSON line: the loss of every optimizer step it ran, and which
swappers DeepSpeed built. The script never mentions memascend: the test starts it under
``memascend run`` (nvme) or plainly (cpu: stock DeepSpeed offloading to CPU memory).

Spec keys: ``client`` (trainer | accelerate), ``device`` (nvme | cpu), ``swap``, ``out``
(output folder), ``steps``, ``save_step`` (a checkpoint after that step), ``resume`` (a
checkpoint folder to continue from), ``resume_step`` (accelerate: steps it holds).
"""
from __future__ import annotations

import json
import os
import sys

VOCAB, SEQ, BATCH = 512, 32, 2


def ds_config(spec):
    dev = spec["device"]
    off_param = {"device": dev, "nvme_path": spec["swap"], "buffer_count": 5,
                 "buffer_size": 2_000_000, "max_in_cpu": 0, "pin_memory": True}
    off_opt = {"device": dev, "nvme_path": spec["swap"], "buffer_count": 4, "pin_memory": True}
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1,
            "train_batch_size": BATCH, "steps_per_print": 10 ** 9,
            "zero_force_ds_cpu_optimizer": False, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": 0,
                                  "stage3_param_persistence_threshold": 0,
                                  "offload_param": off_param, "offload_optimizer": off_opt,
                                  "sub_group_size": 1_000_000},
            "aio": {"block_size": 1 << 20, "queue_depth": 8}}


def llama():
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=VOCAB, max_position_embeddings=SEQ,
                                   tie_word_embeddings=False)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def dataset(n):
    import torch

    g = torch.Generator().manual_seed(7)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def swappers(engine, model):
    sw = next((p.nvme_swapper for p in model.parameters()
               if getattr(p, "nvme_swapper", None) is not None), None)
    osw = getattr(getattr(engine, "optimizer", None), "optimizer_swapper", None)
    return {"param_swapper": type(sw).__name__ if sw is not None else None,
            "optimizer_swapper": type(osw).__name__ if osw is not None else None}


def run_trainer(spec):
    import transformers

    transformers.logging.set_verbosity_error()
    args = transformers.TrainingArguments(
        output_dir=spec["out"], deepspeed=ds_config(spec), per_device_train_batch_size=BATCH,
        max_steps=spec["steps"], learning_rate=1e-3, weight_decay=0.01,
        lr_scheduler_type="constant", warmup_steps=0, seed=0,  # HF's default optimizer
        data_seed=0, save_strategy="steps", save_steps=spec["save_step"], logging_steps=1,
        report_to=[], disable_tqdm=True, dataloader_num_workers=0)
    model = llama()  # after the arguments: under zero.Init
    losses = []

    class Recording(transformers.Trainer):
        def training_step(self, *a, **kw):
            loss = super().training_step(*a, **kw)
            losses.append(float(loss))
            return loss

    trainer = Recording(model=model, args=args, train_dataset=dataset(BATCH * spec["steps"]))
    trainer.train(resume_from_checkpoint=spec.get("resume"))
    trainer.save_model(os.path.join(spec["out"], "final"))
    return losses, swappers(trainer.model_wrapped, model)


def run_accelerate(spec):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin

    acc = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=ds_config(spec)))
    model = llama()  # accelerate registered the config with transformers: under zero.Init
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(dataset(BATCH * spec["steps"]), batch_size=BATCH)
    engine, opt, loader = acc.prepare(model, opt, loader)
    start = 0
    if spec.get("resume"):
        acc.load_state(spec["resume"])
        start = spec["resume_step"]
    losses = []
    for step, batch in enumerate(loader):
        if step < start:
            continue
        loss = engine(**batch).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
        if step + 1 == spec["save_step"]:
            acc.save_state(os.path.join(spec["out"], f"state-{step + 1}"))
    return losses, swappers(engine, model)


def main(path):
    with open(path) as f:
        spec = json.load(f)
    import transformers

    transformers.LlamaForCausalLM  # noqa: B018 - imported before zero.Init patches tensors
    run = run_trainer if spec["client"] == "trainer" else run_accelerate
    losses, sw = run(spec)
    out = {"losses": losses, **sw, "memascend_enabled": False}
    if "memascend.integrations.deepspeed" in sys.modules:
        out["memascend_enabled"] = sys.modules["memascend.integrations.deepspeed"].enabled()
    print("RESULT " + json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
