"""Summary and printed report of bench/zero_infinity.py: medians of per-pair ratios.

A *pair* is one stock run and one memascend run of the same configuration (model × buffer
settings) in the same repetition, back to back. Every ratio is memascend / stock within a
pair, so a slow minute of a shared machine hits both sides of the ratio it lands in; the
reported ratio of a configuration is the median over its pairs, and the headline
(``summary.peak_rss_ratio``, ``summary.step_time_ratio``) is the median over all pairs of
all configurations. Absolute numbers are medians over repetitions. The breakdown of host
buffers (read from DeepSpeed's objects by the child) comes from the first good run of each
configuration and system: those sizes are set by the config, not by timing.
"""
from __future__ import annotations

import json
import math
from typing import Any

from bench._common import median as med

METRICS = ("peak_rss", "peak_vmlck", "step_time_s", "read_bytes_per_step",
           "write_bytes_per_step", "swap_bytes_per_step")
GOAL_RSS, GOAL_STEP = 0.35, 1.0
MIB = 1 << 20


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is 0."""
    return a / b if b else math.nan


def summarize(configs: list[dict[str, Any]], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-configuration medians and ratios, and the overall summary."""
    by_config: dict[str, Any] = {}
    all_ratios: dict[str, list[float]] = {m: [] for m in METRICS}
    for c in configs:
        key = c["key"]
        mine = [r for r in runs if r.get("config") == key]
        reps = sorted({r["rep"] for r in mine})
        pairs = []
        for rep in reps:
            s = next((r for r in mine if r["rep"] == rep and r["system"] == "stock"), None)
            m = next((r for r in mine if r["rep"] == rep and r["system"] == "memascend"), None)
            if s and m and "failed" not in s and "failed" not in m and "skipped" not in s:
                pairs.append((s, m))
        entry: dict[str, Any] = {"pairs": len(pairs),
                                 "failed": [f"{r['label']}: {r['failed']}" for r in mine
                                            if "failed" in r],
                                 "skipped": sorted({r["skipped"] for r in mine
                                                    if "skipped" in r})}
        for system, idx in (("stock", 0), ("memascend", 1)):
            entry[system] = {m: med([p[idx][m] for p in pairs]) for m in METRICS}
            first = pairs[0][idx] if pairs else None
            entry[system]["breakdown"] = first["breakdown"] if first else None
            if first is not None and system == "memascend":
                pool = first.get("memascend", {}).get("pool", {})
                entry[system]["pool_locked_peak"] = pool.get("locked_peak")
                entry[system]["pool_in_use_peak"] = pool.get("in_use_peak")
        ratios = {m: [ratio(mm[m], s[m]) for s, mm in pairs] for m in METRICS}
        entry["ratios"] = {m: med(v) for m, v in ratios.items()}
        entry["ratios_all"] = ratios
        entry["losses_equal"] = all(s["losses"] == mm["losses"] for s, mm in pairs) \
            if pairs else None
        entry["max_loss_diff"] = max((abs(a - b) for s, mm in pairs
                                      for a, b in zip(s["losses"], mm["losses"])), default=None)
        for m in METRICS:
            all_ratios[m].extend(ratios[m])
        by_config[key] = entry
    rss, step = med(all_ratios["peak_rss"]), med(all_ratios["step_time_s"])
    summary = {
        "peak_rss_ratio": rss, "step_time_ratio": step,
        "peak_vmlck_ratio": med(all_ratios["peak_vmlck"]),
        "swap_bytes_ratio": med(all_ratios["swap_bytes_per_step"]),
        "pairs": len(all_ratios["peak_rss"]),
        "by_config": {k: {"peak_rss_ratio": v["ratios"]["peak_rss"],
                          "step_time_ratio": v["ratios"]["step_time_s"],
                          "peak_vmlck_ratio": v["ratios"]["peak_vmlck"],
                          "swap_bytes_ratio": v["ratios"]["swap_bytes_per_step"],
                          "pairs": v["pairs"]} for k, v in by_config.items()},
        "goal_peak_rss_ratio": GOAL_RSS, "goal_step_time_ratio": GOAL_STEP,
        "peak_rss_goal_met": bool(rss <= GOAL_RSS),
        "step_time_goal_met": bool(step <= GOAL_STEP),
        "losses_equal": all(v["losses_equal"] is not False for v in by_config.values()),
        "ratio_rule": "memascend / stock within each back-to-back pair; medians over pairs "
                      "(by_config: over a configuration's repetitions; top level: over all "
                      "pairs of all configurations)",
    }
    return {"by_config": by_config, "summary": summary}


def _mib(x: float | None) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x / MIB:,.0f}"


def _r(x: float) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.3f}"


def print_report(meta: dict[str, Any], configs: list[dict[str, Any]], res: dict[str, Any]) -> None:
    """The table, the buffer breakdown and the summary, on stdout."""
    print(f"ZeRO-3 NVMe offload, stock DeepSpeed {meta.get('deepspeed', '?')} (libaio async_io) "
          f"vs memascend drop-in: {meta['dtype']}, {meta['optimizer']}, batch {meta['batch']} "
          f"x {meta['seq']} tokens, {meta['warmup']} warm-up + {meta['steps']} timed steps, "
          f"{meta['reps']} repetitions (pairs interleaved, order alternating)")
    if meta.get("memascend_options"):
        print(f"memascend options (the drop-in's \"memascend\" block): "
              f"{json.dumps(meta['memascend_options'], sort_keys=True)}")
    hdr = (f"{'config':<22} {'system':<10} {'peak RSS':>9} {'peak Lck':>9} {'step s':>7} "
           f"{'read/step':>10} {'write/step':>10} {'pairs':>5}")
    print("MiB unless noted; medians over repetitions; ratio row = median of per-pair ratios")
    print(hdr)
    print("-" * len(hdr))
    for c in configs:
        e = res["by_config"][c["key"]]
        for system in ("stock", "memascend"):
            v = e[system]
            print(f"{c['key']:<22} {system:<10} {_mib(v['peak_rss']):>9} "
                  f"{_mib(v['peak_vmlck']):>9} {v['step_time_s']:>7.2f} "
                  f"{_mib(v['read_bytes_per_step']):>10} {_mib(v['write_bytes_per_step']):>10} "
                  f"{e['pairs']:>5}")
        rr = e["ratios"]
        print(f"{'':<22} {'ratio':<10} {_r(rr['peak_rss']):>9} {_r(rr['peak_vmlck']):>9} "
              f"{_r(rr['step_time_s']):>7} {_r(rr['read_bytes_per_step']):>10} "
              f"{_r(rr['write_bytes_per_step']):>10}")
        for why in e["skipped"]:
            print(f"  skipped: {why}")
        for why in e["failed"]:
            print(f"  FAILED: {why}")
        if e["losses_equal"] is False:
            print(f"  losses differ between stock and memascend (max |diff| "
                  f"{e['max_loss_diff']:.3g})")
    print()
    print("Host buffers (MiB; read from DeepSpeed's objects; first good run)")
    hdr = (f"{'config':<22} {'system':<10} {'param tier':>10} {'writeback':>9} "
           f"{'optim bufs':>10} {'flat params':>11} {'grad buf':>8} {'kept in CPU':>11}")
    print(hdr)
    print("-" * len(hdr))
    for c in configs:
        e = res["by_config"][c["key"]]
        for system in ("stock", "memascend"):
            b = e[system]["breakdown"]
            if not b:
                continue
            if "param_tier" in b:
                tier = f"{_mib(b['param_tier']['peak_in_use_bytes'])}/" \
                       f"{_mib(b['param_tier']['budget_bytes'])}"
                wb = "0"
            else:
                tier, wb = _mib(b.get("param_pool_bytes")), _mib(
                    b.get("param_writeback_buffer_bytes"))
            kept = f"{b['params_kept_in_cpu'] / max(b['params_total'], 1):.0%}"
            print(f"{c['key']:<22} {system:<10} {tier:>10} {wb:>9} "
                  f"{_mib(b.get('optimizer_swap_buffers_bytes')):>10} "
                  f"{_mib(b['flat_cpu_params_bytes']):>11} {_mib(b['grad_flat_buffer_bytes']):>8} "
                  f"{kept:>11}")
    print("param tier: stock = its fixed locked pool (buffer_count x buffer_size); memascend = "
          "peak in use / byte budget (exact leases). writeback: stock's locked buffer for the "
          "largest sub-group's post-step parameter write-back. optim bufs: stock = buffer_count x "
          "largest sub-group, fp32; memascend = peak pinned bytes of its streamed pieces "
          "(whole-sub-group buffers when it does not stream). flat params: stage 3's CPU copy of the parameters "
          "(max_in_cpu). grad buf: stage 3's flat fp32 gradient partition buffer.")
    print()
    s = res["summary"]
    ok_r = "met" if s["peak_rss_goal_met"] else "MISSED"
    ok_s = "met" if s["step_time_goal_met"] else "MISSED"
    print(f"summary ({s['pairs']} pairs): peak_rss_ratio {_r(s['peak_rss_ratio'])} (goal <= "
          f"{GOAL_RSS}: {ok_r}), step_time_ratio {_r(s['step_time_ratio'])} (goal <= "
          f"{GOAL_STEP}: {ok_s}), peak_vmlck_ratio {_r(s['peak_vmlck_ratio'])}, "
          f"swap_bytes_ratio {_r(s['swap_bytes_ratio'])}, losses equal: {s['losses_equal']}")
