"""Calibration-time report: wall time per stage and per reconstruction unit.

``tfmq.quantize`` records the times in ``denoiser.tfmq_info["calibration_time"]``
(``stages_s``, ``total_s`` and, for per-unit stages, ``units_s``); per-unit errors before / after
reconstruction are in ``tfmq_info["reconstruction"]`` / ``["act_learning"]``. These helpers
write them as ``calibration_time.json`` into an output folder and format them for a terminal.
"""

from __future__ import annotations

import json
from pathlib import Path

REPORT_FILE = "calibration_time.json"


def calibration_report(info: dict) -> dict:
    """The report of a quantized denoiser's ``tfmq_info``: times, and per-unit errors if any."""
    report = {"method": info.get("method"), "wbits": info.get("wbits"), "abits": info.get("abits"),
              **info.get("calibration_time", {})}
    for key in ("reconstruction", "act_learning"):
        units = info.get(key)
        if units:
            report[f"{key}_errors"] = {
                u: {"before": s.get("error_before"), "after": s.get("error_after"),
                    "restored": bool(s.get("restored", False))} for u, s in units.items()}
    return report


def write_calibration_time(out_dir, info: dict) -> Path:
    """Write :func:`calibration_report` of ``info`` to ``out_dir/calibration_time.json``."""
    path = Path(out_dir) / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(calibration_report(info), indent=2))
    return path


def format_calibration_time(info: dict, units: bool = True) -> str:
    """A plain-text table of the stage times (and unit times, indented under their stage)."""
    t = info.get("calibration_time", {})
    stages, per_unit = t.get("stages_s", {}), t.get("units_s", {})
    rows = []
    for stage, sec in stages.items():
        rows.append((stage, sec))
        if units:
            for unit, usec in per_unit.get(stage, {}).items():
                rows.append(("  " + unit, usec))
    rows.append(("total", t.get("total_s", sum(stages.values()))))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage / unit':<{width}}  {'seconds':>10}", "-" * (width + 12)]
    lines += [f"{name:<{width}}  {sec:>10.2f}" for name, sec in rows]
    return "\n".join(lines)
