"""Human-readable reports and the timeline plot of ``memascend profile``.

Formatting only: the numbers come from :mod:`.estimate` and :mod:`.sampler`. The plot needs
matplotlib (``pip install matplotlib``, part of the ``dev`` and ``plot`` extras); it is
imported only when a plot is asked for.
"""
from __future__ import annotations

from typing import Optional, Sequence

from ..errors import ConfigError
from ..sysinfo import fmt_bytes
from .estimate import Estimate, EstimateReport
from .sampler import RunResult

_KIND_MARK = {"locked": "L", "resident": "R", "transient": "T", "virtual": "V"}


def _mib(n: int) -> str:
    return f"{n / (1 << 20):,.1f}"


def format_estimate(report: EstimateReport, drive_tbw: Optional[float] = None) -> str:
    """The table ``memascend profile estimate`` prints: one column per system, one row per
    component, then peaks, locked bytes, SSD capacity, traffic and endurance (with
    ``drive_tbw``, the drive's rated terabytes written: the steps until all ranks' writes
    reach it), notes and warnings."""
    ests: Sequence[Estimate] = report.estimates
    w = report.workload
    lines = [f"model: {report.parameters:,d} parameters "
             f"({report.model.get('num_hidden_layers')} layers, hidden "
             f"{report.model.get('hidden_size')}, vocab {report.model.get('vocab_size')}); "
             f"micro-batch {w.batch} x {w.seq} tokens, "
             + ("CPU-only (activations in host memory)" if w.host_activations
                else f"{w.gpus} GPU rank(s) (activations in GPU memory, not counted)")]
    for e in ests:
        lines.append(f"  [{e.system}] {e.title}")
    names: list[str] = []
    labels: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for e in ests:
        for c in e.components:
            if c.name not in labels:
                names.append(c.name)
                labels[c.name] = c.label
                kinds[c.name] = _KIND_MARK[c.kind] + (f" {c.phase}" if c.phase else "")
    width = max(len(labels[n]) for n in names) + 2
    head = f"{'MiB per rank':<{width}}{'kind':<17}" + "".join(f"{e.system:>22}" for e in ests)
    lines += ["", head, "-" * len(head)]
    for n in names:
        row = f"{labels[n]:<{width}}{kinds[n]:<17}"
        for e in ests:
            c = e.component(n)
            row += f"{(_mib(c.nbytes) if c is not None else '-'):>22}"
        lines.append(row)
    lines.append("-" * len(head))

    def total(label: str, fn) -> str:
        return f"{label:<{width + 17}}" + "".join(f"{fn(e):>22}" for e in ests)

    lines.append(total("peak RSS per rank", lambda e: _mib(e.peak_bytes)))
    lines.append(total("  in phase", lambda e: e.peak_phase))
    lines.append(total("locked (pinned) per rank", lambda e: _mib(e.locked_bytes)))
    lines.append(total("virtual only (not RSS)", lambda e: _mib(e.virtual_bytes)))
    if any(e.ranks > 1 for e in ests):
        lines.append(total("peak RSS, all ranks", lambda e: _mib(e.node_peak_bytes)))
    lines.append(total("SSD capacity", lambda e: _mib(e.ssd.capacity)))
    lines.append(total("SSD capacity, peak", lambda e: _mib(e.ssd.capacity_peak)))
    lines.append(total("SSD read per step", lambda e: _mib(e.ssd.read_per_step)))
    lines.append(total("SSD written per step", lambda e: _mib(e.ssd.written_per_step)))
    lines.append(total("SSD written per 1,000 steps (TB)",
                       lambda e: f"{e.ssd.written_per_1000_steps * e.ranks / 1e12:,.2f}"))
    if drive_tbw is not None:
        def steps(e: Estimate) -> str:
            n = e.ssd.steps_to_endurance(drive_tbw, e.ranks)
            return "-" if n is None else f"{n:,d}"
        lines.append(total(f"steps to the drive's {drive_tbw:g} TBW", steps))
    lines.append("kinds: L locked, R resident from start-up, T transient (in the named phase; "
                 "peak = L + R + the largest phase), V virtual")
    stock = next((e for e in ests if e.system == "deepspeed"), None)
    for e in ests:
        if stock is not None and e is not stock and stock.peak_bytes:
            saved = 1 - e.peak_bytes / stock.peak_bytes
            lines.append(f"{e.system}: peak {fmt_bytes(e.peak_bytes)} vs stock "
                         f"{fmt_bytes(stock.peak_bytes)} ({100 * abs(saved):.1f} % "
                         f"{'less' if saved >= 0 else 'more'})")
    for e in ests:
        for note in e.notes:
            lines.append(f"note ({e.system}): {note}")
    for warning in report.warnings:
        lines.append(f"WARNING: {warning}")
    return "\n".join(lines)


def format_run(result: RunResult) -> str:
    """The summary ``memascend profile run`` prints after the command exits."""
    mem, t = result.sampled_peak_memory
    cpu = result.cpu_seconds
    lines = [
        f"memascend profile: {' '.join(result.command)}",
        f"  exit code {result.exit_code}"
        + (f" (interrupted by {result.interrupted})" if result.interrupted else "")
        + f", {result.seconds:.1f} s, {len(result.samples)} samples every "
          f"{result.interval * 1000:.0f} ms, {result.processes_seen} process(es)",
        f"  peak RSS        {fmt_bytes(result.peak_rss)}  (tree sampled: {fmt_bytes(mem)} at "
        f"{t:.1f} s; largest single process: "
        f"{fmt_bytes(max(result.process_hwm, result.rusage_maxrss))})",
        f"  peak VmLck      {fmt_bytes(result.peak_vm_lck)}",
        f"  peak VmPin      {fmt_bytes(result.peak_vm_pin)}",
        f"  storage read    {fmt_bytes(result.read_bytes)}",
        f"  storage written {fmt_bytes(result.write_bytes)}",
        f"  CPU time        {cpu:.1f} s ({100 * cpu / max(result.seconds, 1e-9):.0f} % of one core "
        "on average)",
    ]
    for note in result.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


def check_matplotlib() -> None:
    """Raise :class:`ConfigError` if matplotlib cannot be imported (before a long run)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ConfigError("--plot", "needs matplotlib: pip install matplotlib "
                                    "(or memascend[plot])") from exc


def plot_timeline(result: RunResult, path: str, title: Optional[str] = None) -> None:
    """Write a PNG timeline: memory (RSS, VmLck, VmPin) with the RSS peak marked, storage
    read/write rate and CPU use over time.

    Raises
    ------
    ConfigError
        matplotlib is missing.
    OSError
        The file cannot be written.
    """
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result.samples
    t = [x.t for x in s]
    mib = 1 << 20
    fig, (ax_m, ax_io, ax_cpu) = plt.subplots(3, 1, figsize=(10, 8), sharex=True,
                                             gridspec_kw={"height_ratios": [3, 1.3, 1]})
    ax_m.plot(t, [x.memory / mib for x in s], label="memory (tree: RSS, or PSS summed)",
              color="tab:blue")
    if any(x.processes > 1 for x in s):
        ax_m.plot(t, [x.rss / mib for x in s], label="RSS summed", color="tab:cyan",
                  linestyle=":")
    ax_m.plot(t, [x.vm_lck / mib for x in s], label="VmLck", color="tab:red")
    ax_m.plot(t, [x.vm_pin / mib for x in s], label="VmPin", color="tab:orange", linestyle="--")
    peak, pt = result.sampled_peak_memory
    if s:
        ax_m.scatter([pt], [peak / mib], color="black", zorder=5)
        ax_m.annotate(f"peak {fmt_bytes(peak)} at {pt:.1f} s", (pt, peak / mib),
                      textcoords="offset points", xytext=(8, 6))
    if result.peak_rss > peak:
        ax_m.axhline(result.peak_rss / mib, color="gray", linestyle=":",
                     label=f"process peak (VmHWM) {fmt_bytes(result.peak_rss)}")
    ax_m.set_ylabel("MiB")
    ax_m.legend(loc="upper left")
    ax_m.grid(alpha=0.3)

    def rate(vals: list[float]) -> list[float]:
        out = [0.0]
        for i in range(1, len(vals)):
            dt = t[i] - t[i - 1]
            out.append((vals[i] - vals[i - 1]) / dt if dt > 0 else 0.0)
        return out

    ax_io.plot(t, [v / mib for v in rate([x.read_bytes for x in s])], label="read",
               color="tab:green")
    ax_io.plot(t, [v / mib for v in rate([x.write_bytes for x in s])], label="written",
               color="tab:purple")
    ax_io.set_ylabel("MiB/s")
    ax_io.legend(loc="upper left")
    ax_io.grid(alpha=0.3)
    ax_cpu.plot(t, [100 * v for v in rate([x.cpu_seconds for x in s])], color="tab:gray")
    ax_cpu.set_ylabel("CPU %")
    ax_cpu.set_xlabel("seconds")
    ax_cpu.grid(alpha=0.3)
    fig.suptitle(title or " ".join(result.command)[:100])
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
