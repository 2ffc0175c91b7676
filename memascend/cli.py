"""The ``memascend`` command line.

Subcommands: ``info`` (what this machine and process allow: native build, memlock, io_uring,
and which swap-engine backend ``auto`` picks and why),
``demo`` (fine-tunes a small LLaMA-style model with parameters and optimizer state on SSD
and reports the memory footprint; ``--selfcheck`` runs the pinned-pool self-check instead)
and ``profile`` (``estimate``: the memory footprint of a configuration, stock DeepSpeed vs
memascend, before a run; ``run -- CMD``: runs a command and samples its process tree's
memory, I/O and CPU). Every command that reports numbers takes ``--json``. The library never prints;
this module does. Bad input exits with status 2 and a one-line message.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import threading
import sys
from typing import Any, Sequence

from . import __version__, _native
from .errors import MemAscendError
from .sysinfo import (fmt_bytes, has_cap_ipc_lock, io_uring_sysctl, lockable_bytes,
                      memlock_hard_limit, memlock_limit, phys_bytes)


def _probe_mlock(nbytes: int = 1 << 16) -> tuple[bool, str]:
    """Try to lock ``nbytes`` through the pool with lock='required'."""
    if not _native.AVAILABLE:
        return False, "native extension not built"
    from .pool import PinnedPool

    try:
        with PinnedPool(lock="required", arena_bytes=nbytes, large_threshold=nbytes) as pool:
            with pool.lease(nbytes):
                pass
        return True, f"locked a {fmt_bytes(nbytes)} probe"
    except MemAscendError as exc:
        return False, str(exc)


def collect_info() -> dict[str, Any]:
    """Everything ``memascend info`` reports, as a dict."""
    try:
        import torch

        torch_version = torch.__version__
        cuda = bool(torch.cuda.is_available())
    except ImportError:
        torch_version, cuda = None, False
    ok, detail = _probe_mlock()
    sysctl = io_uring_sysctl()
    backends: dict[str, Any] = {}
    chosen, reason = None, "native extension not built"
    if _native.AVAILABLE:
        from .engine import probe_backends

        backends = {k: {"available": v[0], "detail": v[1]} for k, v in probe_backends().items()}
        if backends["uring"]["available"]:
            chosen, reason = "uring", backends["uring"]["detail"]
        else:
            chosen = "threads"
            reason = "io_uring unusable: " + backends["uring"]["detail"]
    from . import tune

    path = tune.tuned_path()
    try:
        doc = tune.load(path) if path else None
        tuned = {"path": path, "in_effect": doc is not None,
                 "settings": doc["settings"] if doc else None,
                 "measured": {k: v for k, v in doc["measured"].items() if k != "trials"}
                 if doc else None, "error": None}
    except MemAscendError as exc:
        tuned = {"path": path, "in_effect": False, "settings": None, "measured": None,
                 "error": str(exc)}
    return {
        "tuned": tuned,
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch_version,
        "cuda_available": cuda,
        "native": {
            "built": _native.AVAILABLE,
            "path": getattr(getattr(_native, "_lib", None), "__file__", None),
            "error": None if _native.AVAILABLE else str(_native.IMPORT_ERROR),
        },
        "memory": {"physical_bytes": phys_bytes()},
        "memlock": {
            "soft_limit_bytes": memlock_limit(),
            "hard_limit_bytes": memlock_hard_limit(),
            "cap_ipc_lock": has_cap_ipc_lock(),
            "lockable_bytes": lockable_bytes(),
            "mlock_works": ok,
            "detail": detail,
        },
        "io_uring": {
            "sysctl_io_uring_disabled": sysctl,
            "built_with_liburing": bool(_native.AVAILABLE and _native.lib.MA_BUILT_WITH_URING),
        },
        "engine": {"auto_backend": chosen, "reason": reason, "backends": backends},
        "crc32c_hardware": bool(_native.AVAILABLE and _native.lib.ma_crc32c_hw()),
    }


def _print_info(info: dict[str, Any]) -> None:
    ml = info["memlock"]
    nat = info["native"]
    print(f"memascend {info['version']}  (python {info['python']}, torch {info['torch']}, "
          f"CUDA {'yes' if info['cuda_available'] else 'no'})")
    print(f"native core      : {'built, ' + str(nat['path']) if nat['built'] else 'MISSING: ' + str(nat['error'])}")
    print(f"physical memory  : {fmt_bytes(info['memory']['physical_bytes'])}")
    print(f"memlock limit    : soft {fmt_bytes(ml['soft_limit_bytes'])}, hard "
          f"{fmt_bytes(ml['hard_limit_bytes'])}, CAP_IPC_LOCK {'yes' if ml['cap_ipc_lock'] else 'no'}"
          f" -> may lock {fmt_bytes(ml['lockable_bytes'])}")
    print(f"mlock            : {'works' if ml['mlock_works'] else 'REFUSED'} ({ml['detail']})")
    if ml["lockable_bytes"] is not None:
        print("                   past that limit the pool runs unlocked (lock='auto') and "
              "counts lock failures")
    sysctl = info["io_uring"]["sysctl_io_uring_disabled"]
    state = {0: "enabled", 1: "restricted to a group", 2: "disabled", None: "unknown"}.get(sysctl, str(sysctl))
    print(f"io_uring sysctl  : {state}; native core built "
          f"{'with' if info['io_uring']['built_with_liburing'] else 'WITHOUT'} liburing")
    eng = info["engine"]
    print(f"swap engine      : backend 'auto' -> {eng['auto_backend']} ({eng['reason']})")
    for name, b in eng["backends"].items():
        print(f"  {name:<15}: {'yes' if b['available'] else 'no '}  {b['detail']}")
    t = info["tuned"]
    if t["error"]:
        print(f"tuned settings   : ERROR {t['error']}")
    elif t["in_effect"]:
        m = t["measured"]
        print(f"tuned settings   : {t['path']} (measured {m.get('date')} in {m.get('swap_dir')}): "
              + "; ".join(f"{sec} " + ", ".join(f"{k}={v}" for k, v in vals.items())
                          for sec, vals in t["settings"].items()))
    else:
        print(f"tuned settings   : none ({t['path'] or 'MEMASCEND_TUNED=off'}"
              f"{' does not exist' if t['path'] else ''}; `memascend tune` measures and saves "
              "them); built-in defaults")


def cmd_info(args: argparse.Namespace) -> int:
    info = collect_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _print_demo(r: Any) -> None:
    mib = lambda n: fmt_bytes(n)  # noqa: E731
    m = r.model
    print(f"model: LLaMA-style, {m['parameters']:,d} parameters, "
          f"{m['config']['num_hidden_layers']} layers, hidden {m['config']['hidden_size']}, "
          f"compute {m['compute_dtype']}; {r.steps} steps of {r.tokens_per_step} tokens "
          f"in {r.seconds:.0f} s ({r.seconds_per_step:.2f} s/step)")
    print(f"loss: {r.first_loss:.3f} (first steps) -> {r.last_loss:.3f} (last steps)")
    print(f"training state on SSD:   {mib(r.ssd_state_bytes)} "
          f"(parameters + fp32 master + AdamW moments + gradients; "
          f"{mib(r.ssd_allocated_bytes)} allocated in {r.swap_dir}, now removed)")
    print(f"in-memory training needs {mib(r.in_memory_state_bytes)} of RAM for the same state "
          "(plus activations)")
    pinned = r.pinned_peak_bytes["parameters"] + r.pinned_peak_bytes["optimizer"]
    budget = r.budget_bytes["parameters"] + r.budget_bytes["optimizer"]
    print(f"memascend pinned buffers: peak {mib(pinned)} of a {mib(budget)} budget; "
          f"locked peak {mib(r.pool_locked_peak_bytes)}"
          + (f" ({r.extra['lock_failures']} lock refusals: ran unlocked)"
             if r.extra.get("lock_failures") else ""))
    rest = r.peak_rss_bytes - r.rss_before_model_bytes - r.pool_reserved_peak_bytes
    print(f"process peak RSS (VmHWM): {mib(r.peak_rss_bytes)} = Python + torch runtime "
          f"{mib(r.rss_before_model_bytes)} + memascend buffers (peak) "
          f"{mib(r.pool_reserved_peak_bytes)} + activations, allocator and the rest "
          f"{mib(max(0, rest))}")
    per_step = r.bytes_written // max(1, r.steps)
    print(f"SSD traffic: read {mib(r.bytes_read)}, wrote {mib(r.bytes_written)} "
          f"({mib((r.bytes_read + r.bytes_written) // max(1, r.steps))} per step); "
          f"SSD wear: {mib(per_step)} written per step, {per_step * 1000 / 1e12:.3f} TB per "
          "1,000 steps (a drive's endurance is rated in TB written: "
          "`memascend profile estimate --drive-tbw TB` for a model you plan)")


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo
    from .progress import Progress

    if args.selfcheck:
        return _cmd_selfcheck(args)
    opts = DemoOptions(model=args.model, steps=args.steps, batch=args.batch,
                       seq_len=args.seq_len, swap_dir=args.swap_dir, budget=args.budget,
                       compute_dtype=args.dtype, lr=args.lr, seed=args.seed,
                       checkpointing=args.checkpointing)
    bar = Progress(opts.steps, "training", enabled=not args.json or sys.stderr.isatty())
    if not args.json:
        print(f"memascend demo: fine-tuning a LLaMA-style model ({opts.model}) on Python's own "
              "source, parameters and optimizer state on SSD", flush=True)
    stop = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        # First signal: stop between two steps (cleanly); a second Ctrl-C interrupts at once.
        if stop.is_set():
            raise KeyboardInterrupt(f"signal {signum}")
        stop.set()
        print("\nmemascend: stopping after this step (Ctrl-C again to abort now)",
              file=sys.stderr, flush=True)

    old_int = signal.signal(signal.SIGINT, request_stop)
    old_term = signal.signal(signal.SIGTERM, request_stop)
    try:
        result = run_demo(opts, on_step=lambda i, loss: bar.update(i, f"loss {loss:.3f}"),
                          stop=stop)
    finally:
        signal.signal(signal.SIGINT, old_int)
        signal.signal(signal.SIGTERM, old_term)
        bar.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        _print_demo(result)
    return 0


def _cmd_selfcheck(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    info = collect_info()
    if not info["native"]["built"]:
        print(f"memascend: native core missing: {info['native']['error']}", file=sys.stderr)
        return 1
    result = run_selfcheck(lock=args.lock)
    if args.json:
        print(json.dumps({"info": info, "pool_selfcheck": result.to_dict()}, indent=2))
        return 0 if result.ok else 1
    _print_info(info)
    print()
    print(f"pool self-check ({result.leases} swap buffers of a small LLaMA-style decoder):")
    print(f"  requested {result.requested_bytes:>12,d} B   reserved {result.reserved_bytes:>12,d} B"
          f"   overhead {result.overhead:.4f}x")
    print(f"  locked    {result.locked_bytes:>12,d} B   VmLck grew {result.vmlck_delta_bytes:>12,d} B"
          f"   VmRSS grew {result.vmrss_delta_bytes:,d} B")
    for name, ok in result.checks.items():
        print(f"  [{'ok' if ok else 'FAIL'}] {name}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0 if result.ok else 1


def _load_model(name: str) -> dict[str, Any]:
    """A demo preset, a ``configs/models`` preset or a ``config.json`` path."""
    from .demo import PRESETS, model_config
    from .shapes import load_model_config

    if name in PRESETS:
        return model_config(name)
    return load_model_config(name)


def _load_json_file(path: str, what: str) -> Any:
    from .errors import ConfigError

    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(what, f"file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(what, f"cannot read {path!r}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(what, f"{path!r} is not valid JSON: {exc}") from None


#: The DeepSpeed config ``profile estimate`` assumes without ``--ds-config``: ZeRO-Infinity
#: (stage 3, parameters and optimizer state on NVMe), bf16, every other value DeepSpeed's
#: default.
DEFAULT_DS_CONFIG: dict[str, Any] = {
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"},
                          "offload_optimizer": {"device": "nvme"}},
}


def cmd_profile_estimate(args: argparse.Namespace) -> int:
    from .config import parse_size
    from .profile import EstimateReport, Workload, estimate_deepspeed, estimate_offload
    from .profile.estimate import machine_warnings
    from .profile.report import format_estimate
    from .shapes import parameter_count
    from .sizing import parse_deepspeed_config

    model = _load_model(args.model)
    n_params = parameter_count(model)  # validates the shapes (ConfigError names the key)
    raw_ds = _load_json_file(args.ds_config, "--ds-config") if args.ds_config else DEFAULT_DS_CONFIG
    ds = parse_deepspeed_config(raw_ds)
    runtime = parse_size("--runtime", args.runtime) if args.runtime else None
    w = Workload(model, batch=args.batch, seq=args.seq, gpus=args.gpus,
                 micro_batches=args.micro_batches, checkpointing=args.checkpointing,
                 runtime_bytes=runtime)
    plain = _offload_options(args, ds.model_dtype)
    mmap = parse_size("--mmap-threshold", args.mmap_threshold) if args.mmap_threshold else None
    ests = [estimate_deepspeed(w, ds, flavor="stock", mmap_threshold=mmap),
            estimate_deepspeed(w, ds, flavor="memascend", mmap_threshold=mmap),
            estimate_offload(w, compute_dtype=plain.compute_dtype, budget=plain.budget,
                             optimizer_budget=plain.optimizer_budget,
                             exact_undo=plain.exact_undo, activations=plain.activations,
                             activation_budget=plain.activation_budget)]
    report = EstimateReport(model, n_params, w, tuple(ests),
                            tuple(machine_warnings(ests, phys_bytes(), lockable_bytes())))
    if args.json:
        doc = report.to_dict()
        doc["deepspeed_config"] = {"path": args.ds_config, **ds.to_dict()}
        doc["machine"] = {"physical_bytes": phys_bytes(), "lockable_bytes": lockable_bytes()}
        if args.drive_tbw is not None:
            doc["endurance"] = {"drive_tbw": args.drive_tbw, "steps": {
                e.system: e.ssd.steps_to_endurance(args.drive_tbw, e.ranks) for e in ests}}
        print(json.dumps(doc, indent=2))
    else:
        if not args.ds_config:
            print("(no --ds-config: DeepSpeed ZeRO-Infinity defaults, bf16, parameters and "
                  "optimizer on NVMe)")
        print(format_estimate(report, drive_tbw=args.drive_tbw))
    return 0


def _offload_options(args: argparse.Namespace, ds_dtype: str) -> Any:
    """The plain path's options for ``profile estimate``: the flags given, then
    ``MEMASCEND_OFFLOAD_*`` (as ``offload_model`` reads them), then ``offload_model``'s
    defaults; the compute dtype falls back to the DeepSpeed config's."""
    from .config import from_env, parse_size
    from .offload_types import OffloadOptions

    given = {"budget": args.budget, "optimizer_budget": args.optimizer_budget,
             "compute_dtype": args.dtype, "exact_undo": False if args.no_undo else None,
             "activation_budget": args.activation_budget,
             "activations": None if args.activations in (None, "none") else args.activations}
    opts = from_env(OffloadOptions, "OFFLOAD", given)
    if args.activations == "none":
        opts = dataclasses.replace(opts, activations=None)
    if args.dtype is None and "MEMASCEND_OFFLOAD_COMPUTE_DTYPE" not in os.environ:
        opts = dataclasses.replace(opts, compute_dtype=ds_dtype)
    sizes = {}
    for name in ("budget", "optimizer_budget", "activation_budget"):
        value = getattr(opts, name)
        where = "--" + name.replace("_", "-") if getattr(args, name) else \
            f"MEMASCEND_OFFLOAD_{name.upper()}"  # a default never fails to parse
        sizes[name] = None if value is None else parse_size(where, value)
    return dataclasses.replace(opts, compute_dtype=str(opts.compute_dtype).replace("torch.", ""),
                               **sizes)


def cmd_profile_run(args: argparse.Namespace) -> int:
    import os

    from .errors import ConfigError
    from .profile.report import check_matplotlib, format_run, plot_timeline
    from .profile.sampler import run_profiled

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise ConfigError("command", "nothing to run: memascend profile run [options] -- CMD ...")
    if args.plot:
        check_matplotlib()
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            raise ConfigError("--plot", f"directory {folder!r} does not exist")
    result = run_profiled(cmd, interval=args.interval / 1000.0, adopt_orphans=True)
    if args.plot:
        try:
            plot_timeline(result, args.plot)
        except OSError as exc:
            print(f"memascend: cannot write the plot {args.plot!r}: {exc}", file=sys.stderr)
    if args.json:
        doc = result.to_dict(timeline=args.timeline)
        doc["plot"] = args.plot
        print(json.dumps(doc, indent=2))
    else:
        print(format_run(result) + (f"\n  plot            {args.plot}" if args.plot else ""),
              file=sys.stderr)
    return result.exit_code


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


class _Parser(argparse.ArgumentParser):
    """Bad arguments exit with status 2 and one line on stderr (no usage dump)."""

    def error(self, message: str) -> Any:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``memascend`` command."""
    p = _Parser(prog="memascend", description="memascend: fine-tune LLMs whose training "
                "state lives on SSD. Commands: info, demo, profile (estimate | run), run, tune; "
                "each takes --help")
    p.add_argument("--version", action="version", version=f"memascend {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what this machine allows: native build, memlock, io_uring")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=cmd_info)
    demo = sub.add_parser("demo", help="fine-tune a small LLaMA-style model with its training "
                                       "state on SSD and report the memory footprint")
    demo.add_argument("--json", action="store_true", help="print the result as JSON")
    demo.add_argument("--model", default="medium",
                      help="demo preset (tiny, small, medium, large), a configs/models preset "
                           "or a config.json path (default medium: 85 M parameters)")
    demo.add_argument("--steps", type=_positive_int, default=25, help="training steps (25)")
    demo.add_argument("--batch", type=_positive_int, default=1, help="sequences per step (1)")
    demo.add_argument("--seq-len", type=_positive_int, default=128,
                      help="tokens per sequence (128)")
    demo.add_argument("--swap-dir", default=None,
                      help="folder for the temporary swap directory (default /var/tmp)")
    demo.add_argument("--budget", default=None,
                      help="pinned RAM budget of each swap tier, e.g. 64MiB (default: sized "
                           "from the largest tensor)")
    demo.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                      help="compute dtype; auto: bfloat16 with CUDA, else float32 (bf16 "
                           "matmuls are slow on most CPUs); master weights are always fp32")
    demo.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--checkpointing", action="store_true",
                      help="use gradient checkpointing")
    demo.add_argument("--selfcheck", action="store_true",
                      help="instead of training, run the pinned-pool self-check")
    demo.add_argument("--lock", choices=["auto", "required", "off"], default="auto",
                      help="pool lock mode of --selfcheck (default auto)")
    demo.set_defaults(func=cmd_demo)
    _add_profile(sub)
    run = sub.add_parser(
        "run", help="run a command with the DeepSpeed drop-in enabled in every Python process "
                    "it starts (HF Trainer, accelerate, torchrun, the deepspeed launcher)",
        description="Run CMD so that each of its Python processes calls memascend.integrations."
                    "deepspeed.enable() as soon as it imports deepspeed (before zero.Init and "
                    "deepspeed.initialize); no edit to the scripts. The exit code is CMD's.")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="an option of enable() (memascend.integrations.deepspeed.Options), "
                          "e.g. --set param_budget=512MiB; VALUE is JSON or else a string; "
                          "a \"memascend\" block in the DeepSpeed config overrides it")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS ...]")
    run.set_defaults(func=cmd_run)
    from .tune_report import add_parser as add_tune

    add_tune(sub, _positive_float)
    return p


def cmd_run(args: argparse.Namespace) -> int:
    """``memascend run``: exec the command under the drop-in's start-up hook."""
    from .integrations.deepspeed import launch

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("memascend run: no command given (memascend run [--set K=V] -- CMD ...)",
              file=sys.stderr)
        return 2
    return launch.run(cmd, launch.parse_settings(args.set))


def _nonneg_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _add_profile(sub: Any) -> None:
    prof = sub.add_parser("profile", help="estimate or measure the memory footprint of "
                                          "SSD-offloaded training")
    psub = prof.add_subparsers(dest="profile_command", required=True)
    est = psub.add_parser(
        "estimate", help="peak host memory, locked memory and SSD traffic of a configuration: "
                         "stock DeepSpeed ZeRO-Infinity vs memascend")
    est.add_argument("--model", required=True,
                     help="a config.json path, a configs/models preset or a demo preset")
    est.add_argument("--ds-config", default=None,
                     help="DeepSpeed config JSON (default: ZeRO-Infinity defaults, bf16, "
                          "parameters and optimizer on NVMe)")
    est.add_argument("--batch", type=_positive_int, default=1, help="micro-batch size (1)")
    est.add_argument("--seq", type=_positive_int, default=512, help="sequence length (512)")
    est.add_argument("--gpus", type=_nonneg_int, default=1,
                     help="GPU ranks on this machine (1); 0 = CPU-only training, activations "
                          "in host memory")
    est.add_argument("--micro-batches", type=_positive_int, default=1,
                     help="gradient accumulation steps per optimizer step (1)")
    est.add_argument("--checkpointing", action="store_true",
                     help="per-layer activation checkpointing")
    est.add_argument("--budget", default=None,
                     help="plain path: pinned budget of the parameter tier (default 1GiB; "
                          "MEMASCEND_OFFLOAD_* variables apply as to offload_model)")
    est.add_argument("--optimizer-budget", default=None,
                     help="plain path: pinned budget of the optimizer tier (default: --budget)")
    est.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                     help="plain path: compute dtype (default: the DeepSpeed config's)")
    est.add_argument("--runtime", default=None,
                     help="resident bytes of the Python + torch runtime, e.g. 350MiB "
                          "(default: measured constants, see memascend.sizing)")
    est.add_argument("--mmap-threshold", default=os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                     help="stock DeepSpeed: glibc's mmap threshold of the run, e.g. 128KiB "
                          "(default: $MALLOC_MMAP_THRESHOLD_, else glibc's dynamic one, up "
                          "to 32 MiB)")
    est.add_argument("--no-undo", action="store_true",
                     help="offload_model with exact_undo=False and the window declared: its "
                          "updates committed as they are made (SSD ~1.1x the state, not ~2x)")
    est.add_argument("--activations", choices=["none", "ssd", "pinned"], default=None,
                     help="plain path: offload_model's activation tier (none, or "
                          "$MEMASCEND_OFFLOAD_ACTIVATIONS): with ssd the "
                          "tensors forward saves wait on SSD (RAM keeps one layer's worth)")
    est.add_argument("--activation-budget", default=None,
                     help="plain path: pinned budget of the activation tier (default 64MiB)")
    est.add_argument("--drive-tbw", type=_positive_float, default=None, metavar="TB",
                     help="the swap drive's rated endurance in terabytes written: also report "
                          "the steps until all ranks' writes reach it")
    est.add_argument("--json", action="store_true", help="print JSON")
    est.set_defaults(func=cmd_profile_estimate)
    run = psub.add_parser(
        "run", help="run a command and sample its process tree: RSS, VmLck, VmPin, I/O, CPU",
        description="Run CMD, sample its whole process tree from /proc, print the peaks on "
                    "stderr (or JSON on stdout); the exit code is CMD's.")
    run.add_argument("--interval", type=_positive_float, default=100.0,
                     help="sampling interval in milliseconds (100)")
    run.add_argument("--plot", default=None, metavar="FILE.png",
                     help="write a timeline plot with the peak marked (needs matplotlib)")
    run.add_argument("--json", action="store_true",
                     help="print the peaks as JSON on stdout after CMD exits")
    run.add_argument("--timeline", action="store_true",
                     help="with --json: include every sample")
    run.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS ...]")
    run.set_defaults(func=cmd_profile_run)


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``memascend`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so that `finally` blocks remove temporary swap files.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        return int(args.func(args))
    except MemAscendError as exc:
        print(f"memascend: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("memascend: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `memascend ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
