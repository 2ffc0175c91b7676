"""The training demo that ``memascend demo`` (and ``make demo``) runs.

It fine-tunes a LLaMA-style causal language model built from a config with random weights
(``transformers.LlamaForCausalLM``; no download) on text that ships with Python itself (the
standard library's source), tokenized byte by byte (vocabulary 256). Parameters live on SSD in
the compute dtype and the fp32 master weights and AdamW moments in a second tier, both in a
fresh temporary swap directory, through :func:`memascend.offload.offload_model`. At the end it
reports the training state's size on SSD, the process's peak RSS (``VmHWM``) and the bytes
memascend locked, against what in-memory training of the same model would hold. The swap
directory is removed at the end, also after an error or Ctrl-C (SIGINT/SIGTERM).

The default model (``medium``: 12 layers, hidden 768, 85 M parameters, a 1.3 GB in-memory
training state) with one sequence of 128 tokens per step runs 25 steps in about 3 minutes on 2
CPU cores (about 7 s a step here: each step moves 3.5 GB through SSD and runs AdamW over
85 M parameters on the CPU). Small batches keep activations small, so the footprint shown is
mostly memascend's. ``--model`` also takes the presets in
``configs/models/`` or a ``config.json`` path; their vocabulary is kept (bytes use ids 0-255),
so the training state has the real model's size.
"""
from __future__ import annotations

import math
import os
import shutil
import sysconfig
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

from .config import parse_size
from .errors import ConfigError
from .heap import PLAIN_MMAP_THRESHOLD, set_mmap_threshold
from .sysinfo import proc_status

#: Demo model shapes (LLaMA architecture, byte vocabulary).
PRESETS: dict[str, dict[str, int]] = {
    "tiny": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
             "num_attention_heads": 4},
    "small": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6,
              "num_attention_heads": 6},
    "medium": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
               "num_attention_heads": 12},
    "large": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 16,
              "num_attention_heads": 16},
}


@dataclass(frozen=True)
class DemoOptions:
    """What to train and where. ``budget`` is the pinned-memory budget of each swap tier
    (``None``: sized from the model's largest tensor)."""

    model: str = "medium"
    steps: int = 25
    batch: int = 1
    seq_len: int = 128
    swap_dir: Optional[str] = None
    budget: Optional[str] = None
    compute_dtype: str = "auto"
    lr: float = 2e-3
    seed: int = 0
    checkpointing: bool = False
    corpus_bytes: int = 4 << 20

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq_len", "corpus_bytes"):
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be positive, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError("lr", f"must be positive, got {self.lr}")
        if self.budget is not None:
            parse_size("budget", self.budget)
        model_config(self.model)  # an unknown model fails here, before any work


@dataclass
class DemoResult:
    """What the demo measured (``to_dict()`` is the ``--json`` output)."""

    model: dict[str, Any]
    steps: int
    tokens_per_step: int
    losses: list[float]
    seconds: float
    seconds_per_step: float
    swap_dir: str
    ssd_state_bytes: int
    ssd_allocated_bytes: int
    in_memory_state_bytes: int
    budget_bytes: dict[str, int]
    pinned_peak_bytes: dict[str, int]
    pool_locked_peak_bytes: int
    pool_reserved_peak_bytes: int
    rss_before_model_bytes: int
    peak_rss_bytes: int
    vmlck_end_bytes: int
    bytes_read: int
    bytes_written: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def first_loss(self) -> float:
        """Mean loss of the first steps (up to 5)."""
        head = self.losses[:5]
        return sum(head) / len(head)

    @property
    def last_loss(self) -> float:
        """Mean loss of the last steps (up to 5)."""
        tail = self.losses[-5:]
        return sum(tail) / len(tail)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with ``first_loss`` and ``last_loss``."""
        d = asdict(self)
        d["first_loss"], d["last_loss"] = self.first_loss, self.last_loss
        return d


def load_corpus(max_bytes: int) -> bytes:
    """Up to ``max_bytes`` of the Python standard library's source, in a fixed file order.

    Raises
    ------
    ConfigError
        Less than 64 KiB of text was found (a Python installed without its sources).
    """
    root = sysconfig.get_paths()["stdlib"]
    chunks, n = [], 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test",
                                                               "__pycache__", "idlelib"))
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            try:
                with open(os.path.join(dirpath, fn), "rb") as f:
                    data = f.read(max_bytes - n)
            except OSError:
                continue
            chunks.append(data)
            n += len(data)
            if n >= max_bytes:
                return b"".join(chunks)
    text = b"".join(chunks)
    if len(text) < 64 << 10:
        raise ConfigError("corpus", f"found only {len(text)} bytes of Python source under "
                                    f"{root}; the demo needs the standard library's .py files")
    return text


def model_config(name: str) -> dict[str, Any]:
    """The LLaMA config dict for a demo preset, a ``configs/models`` preset or a path."""
    if name in PRESETS:
        cfg = dict(PRESETS[name], vocab_size=256, max_position_embeddings=1024,
                   rms_norm_eps=1e-6, tie_word_embeddings=False)
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
        return cfg
    from .shapes import load_model_config

    try:
        cfg = dict(load_model_config(name))
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError("model", f"{name!r} is neither a demo preset ({', '.join(PRESETS)}) "
                                   f"nor a model config: {exc}") from exc
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps",
            "tie_word_embeddings")
    return {k: cfg[k] for k in keep if k in cfg}


def _swap_base(swap_dir: Optional[str]) -> str:
    if swap_dir:
        return swap_dir
    # /var/tmp is on disk on every distribution; /tmp is often a tmpfs (RAM).
    if os.access("/var/tmp", os.W_OK):
        return "/var/tmp"
    return tempfile.gettempdir()


def _allocated_bytes(path: str) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for fn in filenames:
            try:
                total += os.stat(os.path.join(dirpath, fn)).st_blocks * 512
            except OSError:
                pass
    return total


def auto_budgets(shapes: list[tuple[int, ...]], compute_bytes: int) -> tuple[int, int]:
    """Pinned budgets (parameter tier, optimizer tier) sized from the largest tensor: room for
    a few tensors in flight in each tier, at least 8 and 16 MiB."""
    largest = max(math.prod(s) for s in shapes)
    mib = 1 << 20
    p = max(8 * mib, 6 * largest * compute_bytes)
    o = max(16 * mib, 16 * largest * 4)
    return -(-p // mib) * mib, -(-o // mib) * mib


def run_demo(opts: DemoOptions,
             on_step: Optional[Callable[[int, float], None]] = None,
             stop: Optional[threading.Event] = None) -> DemoResult:
    """Train as ``opts`` says; ``on_step(step, loss)`` is called after every step. When
    ``stop`` is set, training ends between two steps with ``KeyboardInterrupt`` (a safe point:
    no I/O half-submitted), after which the swap directory is removed.

    Raises
    ------
    ConfigError
        Bad options, or transformers is not installed.
    SwapIOError
        The swap directory cannot hold the training state (e.g. ENOSPC), named in the error.
    """
    import torch

    try:
        import transformers
    except ImportError as exc:
        raise ConfigError("transformers", "the demo builds a transformers LlamaForCausalLM: "
                                          "pip install 'memascend[transformers]'") from exc
    from .offload import AdamW, meta_parameters, offload_model

    transformers.logging.set_verbosity_error()
    malloc_fixed = set_mmap_threshold(PLAIN_MMAP_THRESHOLD)  # see memascend.heap
    cfg_dict = model_config(opts.model)
    corpus = torch.frombuffer(bytearray(load_corpus(opts.corpus_bytes)), dtype=torch.uint8)
    if corpus.numel() <= opts.seq_len + 1:
        raise ConfigError("seq_len", f"{opts.seq_len} is longer than the corpus")
    rss_before = proc_status().get("VmRSS", 0)
    torch.manual_seed(opts.seed)
    cfg = transformers.LlamaConfig(**cfg_dict, attn_implementation="sdpa")
    with meta_parameters():  # the full model never exists in RAM
        model = transformers.LlamaForCausalLM(cfg)
    if opts.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    name = opts.compute_dtype
    if name == "auto":  # bf16 matmuls are ~10x slower than fp32 on CPUs without AMX/AVX512-BF16
        name = "bfloat16" if torch.cuda.is_available() else "float32"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(name)
    if dtype is None:
        raise ConfigError("compute_dtype", f"must be float32 or bfloat16, got "
                                           f"{opts.compute_dtype!r}")
    shapes = [tuple(p.shape) for p in model.parameters()]
    if opts.budget:
        pb = ob = parse_size("budget", opts.budget)
    else:
        pb, ob = auto_budgets(shapes, dtype.itemsize)
    run_dir = tempfile.mkdtemp(prefix="memascend-demo-", dir=_swap_base(opts.swap_dir))
    om = None
    try:
        om = offload_model(model, run_dir, budget=pb, optimizer_budget=ob,
                           optimizer=AdamW(lr=opts.lr, weight_decay=0.0), compute_dtype=dtype,
                           init=model._init_weights, accumulation_steps=1)
        gen = torch.Generator().manual_seed(opts.seed)
        losses: list[float] = []
        t0 = time.monotonic()
        for step in range(opts.steps):
            if stop is not None and stop.is_set():
                raise KeyboardInterrupt("stop requested")
            starts = torch.randint(0, corpus.numel() - opts.seq_len - 1, (opts.batch,),
                                   generator=gen)
            ids = torch.stack([corpus[s:s + opts.seq_len] for s in starts.tolist()]).long()
            loss = model(input_ids=ids, labels=ids).loss
            om.backward(loss)
            om.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step + 1, losses[-1])
        om.synchronize()  # the last step's writes, landing behind step(), count in its time
        seconds = time.monotonic() - t0
        sizes = om.training_state_bytes()
        ps, os_ = om.params_sw.stats(), om.optim_sw.stats()
        pool = om.pool.stats()
        status = proc_status()
        return DemoResult(
            model={"config": cfg_dict, "parameters": sizes["parameters"],
                   "compute_dtype": name, "checkpointing": opts.checkpointing},
            steps=opts.steps, tokens_per_step=opts.batch * opts.seq_len, losses=losses,
            seconds=seconds, seconds_per_step=seconds / opts.steps, swap_dir=run_dir,
            ssd_state_bytes=sizes["param_tier_bytes"] + sizes["optimizer_tier_bytes"],
            ssd_allocated_bytes=_allocated_bytes(run_dir),
            in_memory_state_bytes=sizes["in_memory_bytes"],
            budget_bytes={"parameters": pb, "optimizer": ob},
            pinned_peak_bytes={"parameters": ps.pinned_peak, "optimizer": os_.pinned_peak},
            pool_locked_peak_bytes=pool.locked_peak, pool_reserved_peak_bytes=pool.reserved_peak,
            rss_before_model_bytes=rss_before, peak_rss_bytes=status.get("VmHWM", 0),
            vmlck_end_bytes=status.get("VmLck", 0),
            bytes_read=ps.bytes_read + os_.bytes_read,
            bytes_written=ps.bytes_written + os_.bytes_written,
            extra={"malloc_mmap_threshold_fixed": malloc_fixed,
                   "lock_failures": pool.lock_failures, "prefetch_hits":
                   {"parameters": ps.hits, "optimizer": os_.hits}})
    finally:
        if om is not None:
            om.close()
        shutil.rmtree(run_dir, ignore_errors=True)
