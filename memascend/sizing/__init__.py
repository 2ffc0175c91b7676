"""Sizing rules: how much host memory and SSD a configuration of SSD-offloaded training needs.

One package of pure functions (no I/O, no torch) shared by the footprint estimator
(``memascend profile estimate``), the plain-PyTorch path (:mod:`memascend.offload`) and the
DeepSpeed drop-in (:mod:`memascend.integrations.deepspeed`), so that what is estimated is
what is allocated. Three families of rules:

- **Stock DeepSpeed 0.19.8 ZeRO-3 / ZeRO-Infinity** (``ds_*``), read from its source
  (``runtime/swap_tensor/``, ``runtime/zero/stage3.py``) and checked by measurement: the
  parameter swap pool, the partitioned reserve, the fp16 flat CPU buffer (``max_in_cpu``), the
  optimizer swap pool, the gradient buffer, the overflow-check temporaries and the I/O
  alignment. Every swap tensor is padded to the element alignment
  ``A = 1024 × intra_op_parallelism / element size`` and only tensors of at least
  ``max(1 MiB, aio.block_size)`` bytes are swapped.
- **memascend as a DeepSpeed drop-in** (:func:`ds_param_budget_bytes`,
  :func:`ds_optimizer_budget_bytes`, ``ma_*``): the same buffer *count* as DeepSpeed's
  config, each buffer exact-size (rounded to 4096) for the largest real tensor instead of
  ``buffer_size`` elements; no partitioned reserve; the chunked overflow check. With the
  streamed step (the ``"memascend"`` block's ``stream_optimizer``, default on) the optimizer
  tier is one budget of pieces (:func:`ma_stream_budget_bytes`) instead of ``buffer_count``
  sub-groups, and with ``stream_grads`` stage 3's flat gradient buffer is replaced by
  gradient pieces (:func:`ma_grad_pieces_bytes` while backward runs). The block is validated
  by the drop-in's own ``Options`` (the one import outside this module).
- **memascend's plain path** (``offload_*``): two swappers whose pinned bytes never exceed
  their budgets (``budget`` default 1 GiB, ``optimizer_budget`` default ``budget``), leases
  rounded to 4096; the parameter tier holds each parameter in the compute dtype, the optimizer
  tier fp32 master, gradient and the two AdamW moments.

Host memory that is not a swap buffer is modelled too, where it can be: the saved
activations of a LLaMA forward pass (:func:`llama_activation_bytes`, counted from the tensors
autograd saves), the temporaries of a streamed AdamW update, and the Python + torch runtime
(measured constants, below). Sizes are bytes; element counts are called ``numel``.

Measured constants (torch 2.13.0+cpu, Python 3.11, transformers 4.x, DeepSpeed 0.19.8, glibc,
x86-64; ``VmRSS`` from ``/proc/self/status``; they vary by a few MiB between versions, so the
estimator takes a ``runtime_bytes`` override, and the accuracy tests measure the runtime in
the same run):

- :data:`TORCH_RUNTIME_BYTES`: RSS after ``import torch`` (218 MiB);
  :data:`MEMASCEND_IMPORT_BYTES`: ``import memascend`` on top (3.5 MiB);
  :data:`TRANSFORMERS_LLAMA_IMPORT_BYTES`: ``import transformers.models.llama.modeling_llama``
  on top (111 MiB); :data:`DEEPSPEED_IMPORT_BYTES`: ``import deepspeed`` plus
  ``init_distributed("gloo")`` on top of those (25 MiB).
- :data:`TRAINING_RUNTIME_BYTES`: what the first forward + backward + optimizer step of a
  74 K-parameter LLaMA adds to the runtime (model skeleton, kernel and autograd start-up, the
  swap engine's rings and threads; 22 MiB): the part of a training process that does not
  grow with the model.
- :data:`DEEPSPEED_ENGINE_BYTES`: what DeepSpeed's engine adds on top of that for the same
  74 K-parameter model under ZeRO-3 NVMe offload, beyond its swap pools (the cpu_adam op,
  aio handles, engine objects; 48 MiB).
"""
from __future__ import annotations

# One module per job; everything is re-exported here (``from memascend import sizing as sz``).
from .common import *  # noqa: F401,F403
from .deepspeed import *  # noqa: F401,F403
from .dropin import *  # noqa: F401,F403
from .ds_config import *  # noqa: F401,F403
from .plain import *  # noqa: F401,F403
from .ssd import *  # noqa: F401,F403
