"""From a training run's step records to the numbers ``fit_under_budget.py`` reports.

For each step: the **I/O bound** (bytes read / read bandwidth + bytes written / write
bandwidth, both measured in the same run), the step's **bound** max(compute, I/O bound), and
the **overlap efficiency** bound / step time: 1.0 when the smaller of compute and I/O is
entirely hidden behind the larger, lower when the step also spends time on neither (host work,
stalls) or fails to overlap them. A bound larger than the step it bounds is impossible, so it
is never reported as an efficiency above 1: the step's efficiency is then None and the step
carries an ``anomalies`` entry naming which estimate (compute or disk bandwidth) the run
contradicts. The run's efficiency is the median over the measured steps (all but the first,
a warm-up), and None if any measured step has an anomaly.
"""
from __future__ import annotations

from typing import Any, Optional

from bench._common import median
from memascend.sysinfo import fmt_bytes

GOAL = 0.8
MIN_RATIO = 3.0
GiB = 1 << 30


def step_anomalies(seconds: float, compute_s: float, io_bound_s: float) -> list[str]:
    """Why a step's bound cannot be right (a bound above the step time), or []."""
    out = []
    if compute_s > seconds:
        out.append(f"compute estimate {compute_s:.2f} s exceeds the step time {seconds:.2f} s")
    if io_bound_s > seconds:
        out.append(f"I/O bound {io_bound_s:.2f} s exceeds the step time {seconds:.2f} s (the "
                   "disk moved the step's bytes faster than the measured bandwidth)")
    return out


def analyse(res: dict[str, Any], bw: dict[str, float], compute_s: float) -> dict[str, Any]:
    """Annotate each step of ``res`` with its I/O bound, bound and efficiency (or anomalies);
    return the medians over the measured steps."""
    steps = res.get("steps") or []
    for s in steps:
        s["io_bound_s"] = s["bytes_read"] / bw["read"] + s["bytes_written"] / bw["write"]
        s["bound_s"] = max(compute_s, s["io_bound_s"])
        s["bound_to_step"] = s["bound_s"] / s["seconds"]  # raw; > 1 only when an input is wrong
        s["anomalies"] = step_anomalies(s["seconds"], compute_s, s["io_bound_s"])
        s["overlap_efficiency"] = None if s["anomalies"] else s["bound_to_step"]
        if "params_wait_s" in s:
            # The step minus the swappers' wait_seconds: compute plus host work, roughly
            # (wait_seconds counts each late request from its swap_in, so requests a module
            # waits for together are counted more than once and this can come out low).
            s["seconds_not_waiting"] = s["seconds"] - s["params_wait_s"] - s["optim_wait_s"]
    measured = steps[1:] if len(steps) > 1 else steps
    keys = ("seconds", "forward_s", "backward_s", "optimizer_s", "bytes_read", "bytes_written",
            "io_bound_s", "bound_s", "seconds_not_waiting", "other_cpu_s")
    out: dict[str, Any] = {f"median_{k}": median([s.get(k) for s in measured], None)
                           for k in keys}
    anomalies = [f"step {s['step']}: {a}" for s in measured for a in s["anomalies"]]
    out["median_overlap_efficiency"] = (None if anomalies or not measured else
                                        median([s["overlap_efficiency"] for s in measured], None))
    out["anomalies"] = anomalies
    out["measured_steps"] = [s["step"] for s in measured]
    return out


def summarize(runs: dict[str, Any], state: dict[str, Any], limit: int, bw: dict[str, Any],
              compute: dict[str, Any]) -> dict[str, Any]:
    """The JSON ``summary``: the issue's three keys first, then the supporting numbers."""
    ma = runs["memascend"]
    a = ma.get("analysis", {})
    ok = ma["status"] == "ok"
    eff = a.get("median_overlap_efficiency") if ok else None
    out = {
        "state_to_ram_limit": state["in_memory_bytes"] / limit,
        "overlap_efficiency": eff,
        "peak_rss_bytes": ma.get("peak_rss_bytes") if ok else None,
        "state_without_gradients_to_ram_limit": state["without_gradients_bytes"] / limit,
        "issue_state_to_ram_limit": state["issue_definition_bytes"] / limit,
        "goal": GOAL, "goal_met": None if eff is None else eff >= GOAL,
        "anomalies": a.get("anomalies", []),
        "peak_rss_below_limit": (ma["peak_rss_bytes"] < limit) if ok else None,
        "cgroup_peak_bytes": ma.get("cgroup", {}).get("peak_bytes"),
        "limit_bytes": limit, "memascend_status": ma["status"],
        "step_seconds": a.get("median_seconds"),
        "bytes_moved_per_step": (a["median_bytes_read"] + a["median_bytes_written"]
                                 if a.get("median_bytes_read") is not None else None),
        "io_bound_seconds": a.get("median_io_bound_s"), "compute_seconds": compute["seconds"],
        "disk_read_bytes_per_s": bw["read"], "disk_write_bytes_per_s": bw["write"],
    }
    for name in ("deepspeed", "deepspeed_unconstrained"):
        r = runs.get(name)
        if r is None:
            continue
        if "skipped" in r:
            out[f"{name}_skipped"] = r["skipped"]
            continue
        ra = r.get("analysis", {})
        out[f"{name}_status"] = r["status"]
        out[f"{name}_peak_rss_bytes"] = r.get("peak_rss_bytes")
        out[f"{name}_cgroup_peak_bytes"] = r["cgroup"].get("peak_bytes")
        out[f"{name}_step_seconds"] = ra.get("median_seconds")
        out[f"{name}_bytes_moved_per_step"] = (
            ra["median_bytes_read"] + ra["median_bytes_written"]
            if ra.get("median_bytes_read") is not None else None)
        out[f"{name}_io_bound_seconds"] = ra.get("median_io_bound_s")
        out[f"{name}_overlap_efficiency"] = ra.get("median_overlap_efficiency")
        out[f"{name}_anomalies"] = ra.get("anomalies", [])
    return out


def _f(x: Optional[float], spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def print_report(doc: dict[str, Any]) -> None:
    """The human-readable report on stdout."""
    s = doc["summary"]
    st = doc["state"]
    print(f"model {doc['model']['name']}: {st['parameters'] / 1e9:.2f} B parameters, fp32 compute,"
          f" batch {doc['batch']} x {doc['seq_len']} tokens; limit {fmt_bytes(doc['limit_bytes'])}"
          f" ({doc['cgroup_version']})")
    print(f"in-memory training state {fmt_bytes(st['in_memory_bytes'])} (16 B/param) = "
          f"{s['state_to_ram_limit']:.2f} x the limit; without gradients "
          f"{s['state_without_gradients_to_ram_limit']:.2f} x; on SSD {fmt_bytes(st['ssd_bytes'])}")
    bw, c = doc["bandwidth"], doc["compute"]
    print(f"disk: write {bw['write'] / GiB:.2f} GiB/s, read {bw['read'] / GiB:.2f} GiB/s; "
          f"compute per step {c['seconds']:.1f} s (whole model, weights in RAM: fwd+bwd "
          f"{c['forward_backward_s']:.1f}, AdamW {c['adamw_s']:.1f}, overlapped on "
          f"{c['cores']} cores; {c['serial_seconds']:.1f} s one after the other); 'others' = "
          f"CPU s other processes and steal used per step")
    if c["others_cores_during_best"] > 0.2:
        print(f"warning: other processes used {c['others_cores_during_best']:.2f} cores on average "
              f"during the compute measurement: the compute time (and the efficiency) is inflated")
    head = (f"{'run':<24} {'status':<7} {'peak RSS':>10} {'cg peak':>10} {'step s':>7} "
            f"{'read GB':>8} {'write GB':>8} {'I/O s':>6} {'overlap':>7} {'others':>6}")
    print(head)
    print("-" * len(head))
    for name in ("memascend", "deepspeed", "deepspeed_unconstrained"):
        r = doc["results"].get(name)
        if r is None:
            continue
        if "skipped" in r:
            print(f"{name:<24} skipped: {r['skipped']}")
            continue
        a = r.get("analysis", {})
        cg = r.get("cgroup", {})
        rd, wr = a.get("median_bytes_read"), a.get("median_bytes_written")
        print(f"{name:<24} {('ok' if r['status'] == 'ok' else 'FAILED'):<7} "
              f"{fmt_bytes(r['peak_rss_bytes']) if r.get('peak_rss_bytes') else '-':>10} "
              f"{fmt_bytes(cg['peak_bytes']) if cg.get('peak_bytes') else '-':>10} "
              f"{_f(a.get('median_seconds')):>7} "
              f"{_f(rd / 1e9 if rd is not None else None, '.2f'):>8} "
              f"{_f(wr / 1e9 if wr is not None else None, '.2f'):>8} "
              f"{_f(a.get('median_io_bound_s')):>6} "
              f"{_f(a.get('median_overlap_efficiency'), '.3f'):>7} "
              f"{_f(a.get('median_other_cpu_s')):>6}")
        if r["status"] != "ok":
            print(f"  {name}: {r['status']}")
        for an in a.get("anomalies", []):
            print(f"  {name}: ANOMALY {an}; no efficiency reported")
        if "host_floor" in r and name == "deepspeed":
            fl = r["host_floor"]
            print(f"  {name}: allocates at least {fmt_bytes(fl['total_bytes'])} of host memory "
                  f"at any limit (fp32 gradient buffer "
                  f"{fmt_bytes(fl['gradient_buffer_bytes'])} + swap buffers)")
    eff = s["overlap_efficiency"]
    if eff is None:
        why = "anomalies above" if s["anomalies"] else "memascend did not train"
        print(f"goal (overlap efficiency >= {GOAL}): not evaluated ({why})")
    else:
        print(f"goal (overlap efficiency >= {GOAL}): {'met' if eff >= GOAL else 'NOT met'} "
              f"({eff:.3f}); state/limit {s['state_to_ram_limit']:.2f} (>= {MIN_RATIO}: "
              f"{'yes' if s['state_to_ram_limit'] >= MIN_RATIO else 'NO'})")
