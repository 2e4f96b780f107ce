"""The results: model FLOP utilisation per row, our/baseline ratios, the issue's targets, a table and the JSON."""

from __future__ import annotations

from pathlib import Path

from dreambooth.atomic import write_json

from .matrix import BASELINE_VARIANTS, TARGETS, Target
from .memory import SPLIT

# every row carries every one of these keys (None where a value does not apply or was not measured)
ROW_KEYS = ("case", "family", "method", "resolution", "batch", "lora_rank", "profile", "kind", "status", "settings",
            "notes", "optimizer_ran", "samples_per_s", "step_time_s", "step_time_min_s", "step_time_max_s",
            "peak_allocated_bytes", "peak_reserved_bytes", "peak_tensor_bytes",
            *(f"peak_{part}_bytes" for part in SPLIT), "max_other_bytes", "step_start_tensor_bytes", "offloaded_bytes",
            "time_to_first_step_s", "flops_per_sample", "flops_counted_on", "mfu", "mfu_datasheet", "last_loss",
            "warmup_steps", "measured_steps")


def add_mfu(row: dict, peak_flops: float, datasheet_flops: float | None) -> None:
    """MFU = model FLOPs per sample x samples/s / peak FLOP/s (measured; and the datasheet's where known)."""
    rate, flops = row.get("samples_per_s"), row.get("flops_per_sample")
    row["mfu"] = row["mfu_datasheet"] = None
    if row["status"] == "ok" and rate and flops:
        row["mfu"] = flops * rate / peak_flops
        if datasheet_flops:
            row["mfu_datasheet"] = flops * rate / datasheet_flops


def _ratio_entry(ours: dict, base: dict) -> dict:
    entry = {"case": ours["case"], "ours": ours["profile"], "baseline": base["profile"], "samples_per_s": None,
             "best_step": None, "samples_per_s_rounds": [], "peak_allocated": None, "peak_reserved": None,
             "peak_tensor": None}
    if ours["samples_per_s"] and base["samples_per_s"]:
        entry["samples_per_s"] = ours["samples_per_s"] / base["samples_per_s"]
        entry["best_step"] = base["step_time_min_s"] / ours["step_time_min_s"]  # the least disturbed steps
        rounds = zip(ours.get("samples_per_s_runs") or [], base.get("samples_per_s_runs") or [], strict=False)
        entry["samples_per_s_rounds"] = [a / b for a, b in rounds if a and b]  # each round's rows: the noise
    for key in ("peak_allocated", "peak_reserved", "peak_tensor"):
        a, b = ours[f"{key}_bytes"], base[f"{key}_bytes"]
        entry[key] = a / b if a is not None and b else None
    return entry


def ratios(rows: list[dict]) -> list[dict]:
    """Each of our rows against each recipe row (baseline-default, baseline-lowmem) of the same case: samples/s and
    peak memory, ours / baseline."""
    ok = [r for r in rows if r["status"] == "ok"]
    return [_ratio_entry(ours, base) for ours in ok if ours["kind"] == "ours"
            for base in ok if base["profile"] in BASELINE_VARIANTS and base["case"] == ours["case"]]


def like_for_like(rows: list[dict], pairs: list[tuple[str, str, str]]) -> list[dict]:
    """Our rows against the recipe with the same checkpointing, precision and optimizer (``run.plan``'s pairs)."""
    by_key = {(r["case"], r["profile"]): r for r in rows if r["status"] == "ok"}
    out = []
    for case, ours, base in pairs:
        if (case, ours) in by_key and (case, base) in by_key:
            out.append(_ratio_entry(by_key[(case, ours)], by_key[(case, base)]))
    return out


def evaluate_target(target: Target, rows: list[dict]) -> dict:
    """The target's value from this run's rows, and PASS / FAIL (None: the rows it needs are not in this run)."""
    def find(profile: str) -> dict | None:
        return next((r for r in rows if r["case"] == target.case_key and r["profile"] == profile), None)

    result = {"name": target.name, "case": target.case_key, "profile": target.profile, "metric": target.metric,
              "threshold": target.threshold, "value": None, "passed": None, "why": ""}
    row = find(target.profile)
    if row is None:
        result["why"] = "not in this run"
        return result
    if row["status"] != "ok":
        result["why"] = f"{target.profile}: {row['status']}"
        result["passed"] = False if row["status"] in ("oom",) or row["status"].startswith("error") else None
        return result
    if target.metric == "samples_per_s_ratio":
        base = find(target.versus or "")
        if base is None or base["status"] != "ok":
            result["why"] = f"{target.versus}: {'not in this run' if base is None else base['status']}"
            return result
        value = row["samples_per_s"] / base["samples_per_s"]
    else:
        value = row.get(target.metric)
    if value is None:
        result["why"] = f"{target.metric} not measured on this device"
        return result
    result["value"] = value
    result["passed"] = value <= target.threshold if target.at_most else value >= target.threshold
    return result


def _gb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e9:.2f}"


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x * 100:.2f}"


def _ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}x over {len(values)} rounds" if len(values) > 1 else ""


def format_table(result: dict) -> str:
    """The run as text: device, rows, ratios, targets."""
    dev = result["device"]
    lines = [f"device: {dev['name']}  |  measured peak {dev['measured_peak_flops'] / 1e12:.2f} TFLOP/s "
             f"({dev['peak_method']})  |  datasheet peak "
             + (f"{dev['datasheet_peak_flops'] / 1e12:.0f} TFLOP/s" if dev["datasheet_peak_flops"] else "unknown"),
             f"matrix {result['matrix']} ({result['model_size']} models), {result['warmup']} warm-up + "
             f"{result['steps']} measured steps per row; memory in GB (1e9 bytes)", ""]
    head = (f"{'case':<24} {'profile':<23} {'samples/s':>9} {'step ms':>8} {'alloc GB':>8} {'resv GB':>8} "
            f"{'1st step s':>10} {'GFLOP/smp':>9} {'MFU %':>6} {'MFU ds %':>8}  status / notes")
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        ok = r["status"] == "ok"
        notes = "; ".join(r["notes"]) if ok else r["status"]
        lines.append(
            f"{r['case']:<24} {r['profile']:<23} {_num(r['samples_per_s'], '.3f'):>9} "
            f"{_num(r['step_time_s'] and r['step_time_s'] * 1000, '.1f'):>8} "
            f"{_gb(r['peak_allocated_bytes']) if ok else '':>8} {_gb(r['peak_reserved_bytes']) if ok else '':>8} "
            f"{_num(r['time_to_first_step_s'], '.1f'):>10} "
            f"{_num(r['flops_per_sample'] and r['flops_per_sample'] / 1e9, '.2f'):>9} "
            f"{_pct(r['mfu']):>6} {_pct(r['mfu_datasheet']):>8}"
            f"  {notes}")
    tracked = [r for r in result["rows"] if r["status"] == "ok" and r["peak_tensor_bytes"] is not None]
    if tracked:
        big = max(r["peak_tensor_bytes"] for r in tracked) >= 1e9
        unit, scale = ("GB", 1e9) if big else ("MB", 1e6)

        def _mem(n: int | None) -> str:
            return "n/a" if n is None else f"{n / scale:.2f}"

        lines += ["", f"peak tensor memory during one step (the last warm-up step), {unit}; offloaded modules not "
                      "counted:",
                  f"{'case':<24} {'profile':<23} {'peak':>7} {'weights':>8} {'grads':>7} {'optim':>7} {'other':>7} "
                  f"{'max other':>9} {'offloaded':>9}"]
        for r in tracked:
            lines.append(f"{r['case']:<24} {r['profile']:<23} {_mem(r['peak_tensor_bytes']):>7} "
                         f"{_mem(r['peak_weights_bytes']):>8} {_mem(r['peak_gradients_bytes']):>7} "
                         f"{_mem(r['peak_optimizer_state_bytes']):>7} {_mem(r['peak_other_bytes']):>7} "
                         f"{_mem(r['max_other_bytes']):>9} {_mem(r['offloaded_bytes']):>9}")
    for title, entries in (("ours / baseline (same case, same run):", result["ratios"]),
                           ("like for like: ours / the recipe with the same gradient checkpointing, mixed precision "
                            "and optimizer (same run):", result["like_for_like"])):
        if not entries:
            continue
        lines += ["", title, f"{'case':<24} {'ours':<13} {'baseline':<23} {'samples/s':>9} {'best step':>9} "
                             f"{'alloc':>7} {'tensors':>7}  noise"]
        for e in entries:
            lines.append(f"{e['case']:<24} {e['ours']:<13} {e['baseline']:<23} {_ratio(e['samples_per_s']):>9} "
                         f"{_ratio(e['best_step']):>9} {_ratio(e['peak_allocated']):>7} {_ratio(e['peak_tensor']):>7}  "
                         f"{_spread(e['samples_per_s_rounds'])}")
    lines += ["", "targets (issue 7):"]
    for t in result["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a "}[t["passed"]]
        if t["value"] is None:
            shown = t["why"]
        elif t["metric"] == "peak_allocated_bytes":
            shown = f"{t['value'] / 1e9:.2f} GB (<= {t['threshold'] / 1e9:g} GB)"
        elif t["metric"] == "mfu":
            shown = f"{t['value'] * 100:.1f}% (>= {t['threshold'] * 100:g}%)"
        else:
            shown = f"{t['value']:.2f}x (>= {t['threshold']:g}x)"
        lines.append(f"  [{verdict}] {t['name']} [{t['profile']}]: {shown}")
    return "\n".join(lines)


def build_result(meta: dict, rows: list[dict], pairs: list[tuple[str, str, str]] = ()) -> dict:
    dev = meta["device"]
    for row in rows:
        add_mfu(row, dev["measured_peak_flops"], dev["datasheet_peak_flops"])
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise AssertionError(f"row {row.get('case')} {row.get('profile')} lacks {missing}")
    return {**meta, "rows": rows, "ratios": ratios(rows), "like_for_like": like_for_like(rows, list(pairs)),
            "targets": [evaluate_target(t, rows) for t in TARGETS]}


def write_result(path: Path, result: dict) -> None:
    write_json(path, result)
