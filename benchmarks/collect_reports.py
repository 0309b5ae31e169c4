"""Collect the rows of several ``tfmq evaluate`` reports into one comparison table.

Each argument is ``LABEL=PATH`` where PATH is an evaluation folder (its ``report.json``) or a
``report.json`` itself; ``--methods`` keeps only those methods' rows. Prints a Markdown table
(label, cell, FID, sFID, PSNR / MSE vs FP, calibration s, checkpoint bytes, FSC mode) and, with
``--json``, writes the same rows as JSON. Used for benchmarks/results/tfmq_variants.

    python benchmarks/collect_reports.py fsc-tib=runs/tib fsc-all=runs/all --methods tfmq --json out.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_rows(label: str, path: Path, methods: set[str] | None) -> list[dict]:
    report = path / "report.json" if path.is_dir() else path
    data = json.loads(report.read_text())
    overrides = data.get("settings", {}).get("quant_overrides", {})
    rows = []
    for row in data["rows"]:
        if methods and row["method"] not in methods:
            continue
        rows.append({"label": label, "cell": row["cell"], "fid": row.get("fid"), "sfid": row.get("sfid"),
                     "psnr_vs_fp": row.get("psnr_vs_fp"), "mse_vs_fp": row.get("mse_vs_fp"),
                     "calibration_s": row.get("calibration_s"), "checkpoint_bytes": row.get("checkpoint_bytes"),
                     "fsc": (row.get("fsc") or {}).get("mode"), "overrides": overrides,
                     "n": row.get("n"), "steps": row.get("steps"), "seed": row.get("seed")})
    return rows


def fmt(v, digits=2) -> str:
    return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def table(rows: list[dict]) -> str:
    lines = ["| variant | cell | FID | sFID | PSNR vs FP (dB) | MSE vs FP | calib (s) | ckpt bytes | fsc |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['cell']} | {fmt(r['fid'])} | {fmt(r['sfid'])} | "
                     f"{fmt(r['psnr_vs_fp'])} | {fmt(r['mse_vs_fp'], 1)} | {fmt(r['calibration_s'], 1)} | "
                     f"{fmt(r['checkpoint_bytes'])} | {fmt(r['fsc'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", metavar="LABEL=PATH")
    p.add_argument("--methods", default=None, help="comma-separated methods to keep (default: all)")
    p.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = p.parse_args(argv)
    methods = set(args.methods.split(",")) if args.methods else None
    rows = []
    for item in args.reports:
        label, sep, path = item.partition("=")
        if not sep:
            p.error(f"{item!r} is not LABEL=PATH")
        rows += load_rows(label, Path(path), methods)
    print(table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
