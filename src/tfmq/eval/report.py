"""report.md of an evaluation: settings, a fidelity verdict per cell, cost, the grid.

Written for a reader who sees only this file, so that it cannot mislead:

* the header says what ran (model, sampler, N, seed, backend) and lists every setting that differs
  from the defaults, the reduced ones (quick runs) first and marked as such;
* fidelity comes first: PSNR / MSE of each quantized cell against FP from the same noise, then
  class accuracy (class-conditional models), then FID with its N and bootstrap interval and the
  paired FID difference to FP;
* one verdict line per quantized cell, and a warning when FID cannot rank the methods (N below
  :data:`MIN_FID_N`, or a cell's FID difference to FP within its bootstrap interval);
* cost (calibration time, checkpoint size, sampling time) with the backend that ran: the
  ``reference`` backend is a fake-quant simulation, so its timings are not low-bit speed;
* lines and columns that do not apply to the cells present are left out (no calibration line in
  an FP-only report, no FID line without a reference, no CLIP column without prompts).
"""

from __future__ import annotations

from .fid_bootstrap import paired_difference

__all__ = ["markdown_report", "fid_comparison", "ranking_warning", "verdicts", "MIN_FID_N", "cell_label"]

#: below this many images per cell FID (and its bootstrap interval) is too unstable to rank
#: methods: it is biased upwards by O(D / N) with D = 2048 features, and the bootstrap itself is
#: unreliable when there are fewer images than a few hundred
MIN_FID_N = 500


def _fmt(v, spec=".2f"):
    return "n/a" if v is None else format(v, spec)


def cell_label(row: dict) -> str:
    """Compact cell name: ``FP``, ``tfmq W4A8``."""
    if row["method"] == "fp":
        return "FP"
    return f"{row['method']} W{row['wbits']}A{row['abits']}"


def _fp_row(rows):
    return next((r for r in rows if r["method"] == "fp"), None)


def fid_comparison(row: dict, fp: dict | None, level: float):
    """The paired bootstrap difference FID(row) - FID(FP), or None when it cannot be formed."""
    if fp is None or row is fp or row.get("fid") is None or fp.get("fid") is None:
        return None
    a, b = row.get("fid_bootstrap"), fp.get("fid_bootstrap")
    if not a or not b or a["seed"] != b["seed"] or len(a["samples"]) != len(b["samples"]) or row["n"] != fp["n"]:
        return None
    return paired_difference(row["fid"], a["samples"], fp["fid"], b["samples"], level)


def ranking_warning(rows: list[dict], level: float = 0.95) -> str | None:
    """Why FID cannot rank these cells, or None when it can (see the module doc)."""
    with_fid = [r for r in rows if r.get("fid") is not None]
    if not with_fid:
        return None
    reasons = []
    n = min(r["n"] for r in with_fid)
    if n < MIN_FID_N:
        reasons.append(f"N = {n} images per cell is below {MIN_FID_N}, where FID and its interval are too "
                       f"unstable to rank methods")
    fp = _fp_row(rows)
    close = [cell_label(r) for r in with_fid if r is not fp and (c := fid_comparison(r, fp, level)) is not None
             and not c.separable]
    if close:
        reasons.append(f"the FID difference to FP is within its {level:.0%} bootstrap interval for "
                       f"{', '.join(close)}")
    unchecked = [cell_label(r) for r in with_fid if fp is not None and fp.get("fid") is not None
                 and r is not fp and fid_comparison(r, fp, level) is None]
    if unchecked:
        reasons.append(f"no paired bootstrap interval for {', '.join(unchecked)} (e.g. --fid-bootstrap 0), so "
                       f"its FID difference to FP is unchecked")
    if not reasons:
        return None
    return ("**Warning: FID cannot rank these methods here**: " + "; ".join(reasons) +
            ". Rank them by PSNR vs FP (and class accuracy where shown), or rerun with more images.")


def _psnr_rank(row, quantized):
    vals = sorted((r["psnr_vs_fp"] for r in quantized if r.get("psnr_vs_fp") is not None), reverse=True)
    if len(vals) < 2 or row.get("psnr_vs_fp") is None:
        return ""
    if row["psnr_vs_fp"] == vals[0]:
        return f", the highest of {len(vals)} quantized cells"
    if row["psnr_vs_fp"] == vals[-1]:
        return f", the lowest of {len(vals)} quantized cells"
    return ""


def verdicts(rows: list[dict], level: float = 0.95) -> list[str]:
    """One line per quantized cell: fidelity to FP first, then class accuracy, then FID."""
    fp = _fp_row(rows)
    quantized = [r for r in rows if r["method"] != "fp"]
    out = []
    for r in quantized:
        parts = []
        if r.get("psnr_vs_fp") is not None:
            parts.append(f"PSNR {r['psnr_vs_fp']:.1f} dB vs FP from the same noise{_psnr_rank(r, quantized)} "
                         f"(MSE {r['mse_vs_fp']:.1f})")
        else:
            parts.append("no PSNR vs FP (no FP cell in this evaluation)")
        if r.get("class_accuracy") is not None:
            fp_acc = fp.get("class_accuracy") if fp else None
            parts.append(f"class accuracy {r['class_accuracy']:.1%}" +
                         (f" vs FP {fp_acc:.1%} ({100 * (r['class_accuracy'] - fp_acc):+.1f} points)"
                          if fp_acc is not None else ""))
        if r.get("fid") is not None:
            c = fid_comparison(r, fp, level)
            if c is None:
                parts.append(f"FID {r['fid']:.2f} (N = {r['n']})" +
                             (f" vs FP {fp['fid']:.2f}" if fp and fp.get("fid") is not None else ""))
            else:
                if not c.separable:
                    what = f"not separable from FP at N = {r['n']}"
                elif c.difference > 0:
                    what = "worse than FP"
                else:
                    what = ("lower than FP's (FID measures distance to real data, not fidelity to FP: "
                            "do not read it as better)")
                if c.separable and r["n"] < MIN_FID_N:
                    what += f" (indicative only at N = {r['n']})"
                parts.append(f"FID {r['fid']:.2f} vs FP {fp['fid']:.2f}, difference {c.difference:+.2f} "
                             f"[{c.low:+.2f}, {c.high:+.2f}]: {what}")
        out.append(f"- **{cell_label(r)}**: " + "; ".join(parts) + ".")
    return out


def _header(report: dict) -> list[str]:
    s = report["settings"]
    samp = s["sampler"]
    rows = report["rows"]
    quantized = any(r["method"] != "fp" for r in rows)
    guidance = f", guidance {samp['guidance_scale']}" if samp["guidance_scale"] != 1.0 else ""
    lines = [f"# tfmq evaluation: {s['model']}", "",
             f"Sampler {samp['name']} {samp['steps']} steps (eta {samp['eta']}{guidance}), "
             f"N = {s['num_images']} images per cell, seed {s['seed']} (image i starts from the noise of "
             f"seed + i in every cell), device {s['device']}."]
    if quantized:
        lines.append(f"Quantized cells: calibration on {s['calib_size']} trajectories, layer policy "
                     f"{s['layer_policy']}, backend {report.get('backend', 'reference (fake-quant simulation)')}.")
    if s.get("reference"):
        lines.append(f"FID against {s['reference']} ({s['reference_size'] or 'all'} real images).")
    return lines


def _settings_section(report: dict) -> list[str]:
    entries = report.get("non_default_settings")
    if entries is None:
        return []
    if not entries:
        return ["", "All settings are the defaults."]

    def line(e):
        used = ""
        if e.get("used_by") is not None:
            used = f"; used by {', '.join(e['used_by'])}" if e["used_by"] else "; no method of this run uses it"
        src = f"{e['source']}, " if e["source"] != "flag" else ""
        return f"- {e['setting']} = {e['value']} ({src}default {e['default']}{used})"

    reduced = [e for e in entries if e["reduced"]]
    other = [e for e in entries if not e["reduced"]]
    out = ["", "## Settings that differ from the defaults"]
    if reduced:
        out += ["", "Reduced for a quick run: the numbers below are noisier than the default run's and "
                    "show the plumbing more than the methods' quality."]
        out += [line(e) for e in reduced]
    if other:
        out += ["", "Other changes:"] if reduced else [""]
        out += [line(e) for e in other]
    return out


def _fidelity_table(report: dict) -> list[str]:
    rows = report["rows"]
    level = (report.get("fid_bootstrap") or {}).get("level", 0.95)
    fp = _fp_row(rows)
    quantized = any(r["method"] != "fp" for r in rows)
    cols = [("method", lambda r: r["method"]), ("W/A", lambda r: f"{r['wbits']}/{r['abits']}")]
    if quantized and fp is not None:
        cols += [("PSNR vs FP (dB)", lambda r: _fmt(r.get("psnr_vs_fp")) if r is not fp else "-"),
                 ("MSE vs FP", lambda r: _fmt(r.get("mse_vs_fp"), ".1f") if r is not fp else "-")]
    if any(r.get("class_accuracy") is not None for r in rows):
        cols.append(("class acc.", lambda r: _fmt(r.get("class_accuracy"), ".1%")))
    if any(r.get("fid") is not None for r in rows):
        def fid_cell(r):
            if r.get("fid") is None:
                return "n/a"
            ci = r.get("fid_ci")
            return f"{r['fid']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")
        n = rows[0]["n"]
        cols.append((f"FID (N = {n})" + (f" [{level:.0%} CI]" if any(r.get("fid_ci") for r in rows) else ""),
                     fid_cell))
        if quantized and fp is not None and any(fid_comparison(r, fp, level) for r in rows):
            def diff_cell(r):
                c = fid_comparison(r, fp, level)
                return "-" if c is None else f"{c.difference:+.2f} [{c.low:+.2f}, {c.high:+.2f}]"
            cols.append(("FID - FP [paired CI]", diff_cell))
    for key, title in (("sfid", "sFID"), ("is", "IS"), ("clip_score", "CLIP")):
        if any(r.get(key) is not None for r in rows):
            cols.append((title, lambda r, k=key: _fmt(r.get(k))))
    if len(cols) == 2:       # nothing measured that compares cells (FP only, no FID)
        return []
    out = ["", "## Fidelity", "",
           "| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(f(r)) for _, f in cols) + " |" for r in rows]
    return out


def _cost_table(report: dict) -> list[str]:
    rows = report["rows"]
    quantized = any(r["method"] != "fp" for r in rows)
    cols = [("method", lambda r: r["method"]), ("W/A", lambda r: f"{r['wbits']}/{r['abits']}")]
    if quantized:
        def q(f):
            return lambda r: "-" if r["method"] == "fp" else f(r)
        cols += [("calib (s)", q(lambda r: _fmt(r.get("calibration_s"), ".1f"))),
                 ("ckpt (MB)", q(lambda r: _fmt(r["checkpoint_bytes"] / 1e6 if r.get("checkpoint_bytes") else None))),
                 ("ckpt / FP32", q(lambda r: _fmt(r.get("checkpoint_ratio"), ".1%"))),
                 ("policy", q(lambda r: r.get("layer_policy") or "-"))]
    cols.append(("sampling (s)", lambda r: _fmt(r.get("sampling_s"), ".1f")))
    out = ["", "## Cost", "", "| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(str(f(r)) for _, f in cols) + " |" for r in rows]
    if quantized:
        backend = report.get("backend", "reference (fake-quant simulation)")
        out += ["", f"Backend: {backend}. " + (
            "Quantized layers quantize and dequantize in floating point, so the sampling times of "
            "quantized cells are simulation timings (fake-quant adds work: usually slower than FP), "
            "not the speed of low-bit kernels; only a real backend measures that."
            if backend.startswith("reference") else "")]
    return out


def _notes(report: dict) -> list[str]:
    s = report["settings"]
    rows = report["rows"]
    notes = report.get("metric_notes", {})
    out = []
    boot = report.get("fid_bootstrap")
    if any(r.get("fid_ci") for r in rows) and boot:
        out.append(f"FID intervals: {boot['resamples']} bootstrap resamples of the generated images (seed "
                   f"{boot['seed']}), percentiles shifted so their median sits on the measured FID; the "
                   f"difference to FP resamples the same seeds in both cells (paired). The real images are "
                   f"held fixed. FID is biased upwards at small N: compare values only at equal N.")
    if s.get("reference") is None:
        out.append("FID: not computed (no reference data set: --reference none).")
    elif notes.get("fid"):
        out.append(f"FID: {notes['fid']}.")
    if notes.get("is") and not any(r.get("is") is not None for r in rows):
        out.append(f"IS: not available ({notes['is']}).")
    gaps = next((r.get("not_transferred") for r in rows if r.get("not_transferred")), None)
    if gaps:
        den = next((r.get("denoiser") for r in rows if r.get("denoiser")), "this denoiser")
        out.append(f"Not transferred to {den}: " + "; ".join(gaps) + ".")
    if notes.get("clip") and s.get("prompts"):
        out.append(f"CLIP score: {notes['clip']}.")
    if notes.get("class_accuracy"):
        out.append(f"Class accuracy: {notes['class_accuracy']}.")
    elif any(r.get("class_accuracy") is not None for r in rows) and report.get("classifier"):
        c = report["classifier"]
        out.append(f"Class accuracy: fraction of samples that the shipped {c['name']} classifier assigns to "
                   f"the class they were sampled with (its accuracy on {c['test_n']:,} real held-out images: "
                   f"{c['test_accuracy']:.1%}, the ceiling; chance: {1 / c['num_classes']:.0%}).")
    return ["", "## Notes", ""] + [f"- {x}" for x in out] if out else []


def markdown_report(report: dict) -> str:
    """The report dict of :func:`tfmq.eval.evaluate.evaluate` as Markdown (see the module doc)."""
    rows = report["rows"]
    level = (report.get("fid_bootstrap") or {}).get("level", 0.95)
    lines = _header(report) + _settings_section(report) + _fidelity_table(report)
    warning = ranking_warning(rows, level)
    v = verdicts(rows, level)
    if v or warning:
        lines += ["", "## Verdict", ""]
        if warning:
            lines += [warning, ""]
        lines += v
    lines += _cost_table(report)
    lines += _notes(report)
    if report.get("grid"):
        lines += ["", "## Samples", "",
                  f"[{report['grid']}]({report['grid']}): one row per cell (FP first), the same seed in each "
                  f"column.", "", f"![samples, one row per cell]({report['grid']})"]
    return "\n".join(lines) + "\n"
