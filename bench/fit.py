"""``python -m bench.fit RESULTS.json [--write]``: fit the memory estimate to a ``cpu-full`` run and check it.

For each of our rows with a tracked peak: the activations (the most the rest held at one moment, less the update's
scratch buffers the estimate counts apart) per activation class (``profiles.activation_class``) and resolution;
a line in the pixels through the measured resolutions (256 and 384 px: two points, so the line is exact there); then
the estimate of every row against its measured peak (it must be within 15%), and the estimate at 512 px of each
profile, extrapolated. ``--write`` stores the lines and the measured rows in ``dreambooth/assets/
memory_measured.json``, which the tab reads ("measured" for a configuration the run measured, else "estimated").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from dreambooth.atomic import write_json
from dreambooth.config import TrainConfig
from dreambooth.profiles import (
    MEASURED_FILE,
    PARAMS,
    UPDATE_SCRATCH_BYTES,
    activation_class,
    estimate_memory,
    memory_signature,
    update_bucket,
)

from .matrix import Case
from .ours import harness_settings

TOLERANCE = 0.15


def row_config(row: dict) -> TrainConfig:
    """The TrainConfig our row trained with: defaults, the harness's settings for its case, its profile's."""
    case = Case(row["family"], row["method"], row["resolution"], row["batch"], (), lora_rank=row["lora_rank"] or 32)
    settings = {**harness_settings(case), **(row["settings"] or {})}
    return dataclasses.replace(TrainConfig(family=row["family"]), **settings)


def ran_optimizer(row: dict) -> str:
    return (row.get("optimizer_ran") or "adamw").split(" ")[0]


def _scratch(cfg: TrainConfig) -> float:
    if cfg.weight_precision == "fp32" and not cfg.fused_backward_step:
        return 0.0
    counts = PARAMS[cfg.family]
    trained = counts["lora_per_rank"] * cfg.lora_rank if cfg.method == "lora" else counts["unet"]
    return UPDATE_SCRATCH_BYTES[cfg.weight_precision] * min(update_bucket(cfg, counts), trained)


def tracked_rows(results: list[dict]) -> list[dict]:
    return [r for result in results for r in result["rows"]
            if r["kind"] == "ours" and r["status"] == "ok" and r.get("peak_tensor_bytes") is not None]


def fit(rows: list[dict]) -> dict[str, dict]:
    """The activation line of each class, through the largest activation measured at each resolution."""
    points: dict[str, dict[int, float]] = {}
    for row in rows:
        cfg = row_config(row)
        sig = memory_signature(cfg, "cpu", ran_optimizer(row))
        pixels = sig["resolution"] ** 2 * sig["batch"]
        activations = max(0.0, row["max_other_bytes"] - _scratch(cfg))
        by_pixels = points.setdefault(activation_class(sig), {})
        by_pixels[pixels] = max(by_pixels.get(pixels, 0.0), activations)
    lines = {}
    for cls, by_pixels in sorted(points.items()):
        (p0, a0), *rest = sorted(by_pixels.items())
        if rest:
            p1, a1 = rest[-1]
            per_pixel = max(0.0, (a1 - a0) / (p1 - p0))
            constant = a0 - per_pixel * p0
        else:  # one resolution: through the origin
            per_pixel, constant = a0 / p0, 0.0
        resolutions = sorted(round(p ** 0.5) for p in by_pixels)  # batch 1 rows: pixels are the side squared
        lines[cls] = {"constant": constant, "per_pixel": per_pixel, "resolutions": resolutions}
    return lines


def check(rows: list[dict]) -> list[dict]:
    """Each row's estimate (the fitted model, not the measured lookup) against its measured peak."""
    out = []
    for row in rows:
        cfg = row_config(row)
        estimate = estimate_memory(cfg, device_type="cpu", optimizer=ran_optimizer(row))
        model = sum(estimate.parts.values())
        measured = row["peak_tensor_bytes"]
        out.append({"case": row["case"], "profile": row["profile"], "measured": measured, "estimated": model,
                    "ratio": model / measured, "ok": abs(model / measured - 1) <= TOLERANCE})
    return out


def stored_rows(rows: list[dict]) -> list[dict]:
    return [{"case": r["case"], "profile": r["profile"], "settings": row_config(r).to_dict() and {
        k: v for k, v in dataclasses.asdict(row_config(r)).items() if k != "concepts"},
        "optimizer": ran_optimizer(r), "signature": memory_signature(row_config(r), "cpu", ran_optimizer(r)),
        "peak_tensor_bytes": r["peak_tensor_bytes"],
        "split": {k: r[f"peak_{k}_bytes"] for k in ("weights", "gradients", "optimizer_state", "other")},
        "max_other_bytes": r["max_other_bytes"]} for r in rows]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fit", description=__doc__)
    p.add_argument("results", type=Path, nargs="+", help="bench JSON files of cpu-full runs")
    p.add_argument("--write", action="store_true", help=f"store the fit in {MEASURED_FILE}")
    args = p.parse_args(argv)
    results = [json.loads(path.read_text(encoding="utf-8")) for path in args.results]
    rows = tracked_rows(results)
    if not rows:
        print("no rows of ours with a tracked peak in these results", file=sys.stderr)
        return 2
    lines = fit(rows)
    env = results[0].get("environment", {})
    source = (f"python -m bench --matrix {results[0].get('matrix')} ({results[0].get('started', '')[:10]}, torch "
              f"{env.get('torch')}, bitsandbytes {env.get('bitsandbytes')})")
    data = {"source": source, "activations": lines, "rows": stored_rows(rows)}
    if args.write:
        write_json(MEASURED_FILE, data)
    from dreambooth import profiles

    profiles._measured.cache_clear()
    original = profiles._measured
    profiles._measured = lambda: data  # check the model with this fit, written or not
    try:
        checked = check(rows)
        print("activation lines (bytes = constant + per_pixel x pixels):")
        for cls, line in lines.items():
            print(f"  {cls:<26} {line['constant'] / 1e9:7.3f} GB + {line['per_pixel']:8.1f} B/px  "
                  f"(from {', '.join(map(str, line['resolutions']))} px)")
        print(f"\n{'case':<24} {'profile':<13} {'measured GB':>11} {'estimate GB':>11} {'ratio':>6}")
        for c in checked:
            print(f"{c['case']:<24} {c['profile']:<13} {c['measured'] / 1e9:11.2f} {c['estimated'] / 1e9:11.2f} "
                  f"{c['ratio']:6.2f}{'' if c['ok'] else '  OUTSIDE 15%'}")
        print("\n512 px (extrapolated), batch 1, the optimizer each row ran:")
        for row in rows:
            if row["resolution"] != 256:
                continue
            cfg = dataclasses.replace(row_config(row), resolution=512)
            est = estimate_memory(cfg, device_type="cpu", optimizer=ran_optimizer(row))
            print(f"  {row['case'].replace('/256/', '/512/'):<24} {row['profile']:<13} "
                  f"{sum(est.parts.values()) / 1e9:6.2f} GB  ({est.basis})")
    finally:
        profiles._measured = original
    return 0 if all(c["ok"] for c in checked) else 1


if __name__ == "__main__":
    raise SystemExit(main())
