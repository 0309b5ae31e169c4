"""report.md says what ran: non-default settings (the README's quick job), no lines that do not
apply, the backend, the grid. Built from report dicts, so no evaluation runs here."""

from tfmq.eval.evaluate import EvalSettings
from tfmq.eval.report import markdown_report
from tfmq.eval.report_settings import non_default_settings
from tfmq.sampling import SamplerConfig


def quick_settings(**kw):
    """The README's quick job."""
    base = dict(methods=["fp", "tfmq"], bits=["w4a8"], num_images=64, batch_size=64,
                sampler=SamplerConfig(steps=20), calib_size=16, reference_size=500,
                quant_overrides={"recon_iters": 20, "act_learn_iters": 20, "tiar_iters": 200})
    return EvalSettings(**{**base, **kw})


def rows_for(settings):
    rows = []
    for name, m, w, a in settings.cells():
        r = {"cell": name, "method": m, "wbits": w, "abits": a, "n": settings.num_images, "sampling_s": 1.0,
             "fid": None, "layer_policy": None if m == "fp" else settings.layer_policy}
        if m != "fp":
            r.update(psnr_vs_fp=30.0, mse_vs_fp=50.0, calibration_s=12.0, checkpoint_bytes=10**6,
                     checkpoint_ratio=0.15)
        rows.append(r)
    return rows


def report_for(settings, **extra):
    return {"settings": settings.to_dict(), "rows": rows_for(settings), "backend": "reference (fake-quant simulation)",
            "non_default_settings": non_default_settings(settings), "metric_notes": {}, "grid": "grid.png", **extra}


def test_quick_job_overrides_are_in_the_report():
    md = markdown_report(report_for(quick_settings()))
    reduced = md.split("Reduced for a quick run")[1].split("##")[0]
    for text in ("images per cell (--num-images) = 64 (default 1000)", "sampling steps (--steps) = 20 (default 100)",
                 "calibration trajectories (--calib-size) = 16 (default 256)",
                 "real images for FID (--reference-size) = 500 (default all 10,000)",
                 "recon_iters = 20 (--set, default 2000; used by tfmq)",
                 "act_learn_iters = 20 (--set, default 500; used by tfmq)",
                 "tiar_iters = 200 (--set, default 2000; used by tfmq)"):
        assert text in reduced, text
    assert "calibration on 16 trajectories" in md


def test_preset_and_unused_options_are_named():
    s = quick_settings(methods=["fp", "naive", "tfmq"], quant_overrides={"preset": "reference", "recon_iters": 50})
    entries = {e["setting"]: e for e in non_default_settings(s)}
    assert entries["recon_iters"]["value"] == 50 and entries["recon_iters"]["source"] == "--set"
    assert entries["recon_iters"]["used_by"] == ["tfmq"] and entries["recon_iters"]["reduced"]
    assert entries["act_learn_iters"] == {**entries["act_learn_iters"], "value": 5000, "source": "preset reference",
                                          "reduced": False}
    md = markdown_report(report_for(quick_settings(methods=["fp", "naive"], quant_overrides={"recon_iters": 5})))
    assert "recon_iters = 5 (--set, default 2000; no method of this run uses it)" in md
    assert "Reduced" in md and "recon_iters" not in md.split("Other changes")[0]


def test_defaults_say_so():
    s = EvalSettings()
    assert non_default_settings(s) == []
    assert "All settings are the defaults." in markdown_report(report_for(s))


def test_fp_only_report_has_no_calibration_lines():
    s = quick_settings(methods=["fp"], reference=None)
    md = markdown_report(report_for(s))
    for absent in ("calibration", "trajectories", "recon_iters", "Verdict", "PSNR", "ckpt", "fake-quant",
                   "reference None", "(all images)"):
        assert absent not in md, absent
    assert "FID: not computed (no reference data set: --reference none)" in md
    assert "FID reference (--reference) = none" in md


def test_quantized_report_names_backend_timings_and_grid():
    md = markdown_report(report_for(quick_settings()))
    assert "backend reference (fake-quant simulation)" in md
    assert "simulation timings" in md and "not the speed of low-bit kernels" in md
    assert "[grid.png](grid.png)" in md and "![" in md
    # fidelity first: PSNR before FID columns, and no CLIP / IS / class columns for this model
    header = next(x for x in md.splitlines() if x.startswith("| method | W/A | PSNR"))
    assert "CLIP" not in header and "IS" not in header and "class" not in header
