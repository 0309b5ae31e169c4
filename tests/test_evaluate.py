"""`tfmq evaluate` end to end on a tiny RANDOM-weight pipeline (plumbing: the numbers come from
the run, cells are reused, the grid has one row per cell). FID needs the offline network (the
Fashion-MNIST test images ship with tfmq); the test skips with the reason when it is absent."""

import json

import numpy as np
import pytest
from PIL import Image

from tfmq.eval.evaluate import EvalSettings, evaluate, parse_bits
from tfmq.sampling import SamplerConfig


@pytest.fixture
def fid_ready():
    from tfmq.eval.datasets import DatasetUnavailable, fashion_mnist_dir
    from tfmq.eval.inception import NetworkUnavailable, find_fid_network
    try:
        find_fid_network()
        fashion_mnist_dir()
    except (NetworkUnavailable, DatasetUnavailable) as exc:
        pytest.skip(str(exc))


def settings(model, n, methods=("fp", "naive")):
    return EvalSettings(model=str(model), methods=list(methods), bits=["w8a8"], num_images=n, seed=3,
                        sampler=SamplerConfig(steps=3), batch_size=4, calib_size=2,
                        reference="fashion-mnist-test", reference_size=20, grid_images=3)


def test_parse_bits():
    assert parse_bits("w4a8") == (4, 8) and parse_bits("W4A32") == (4, 32)
    with pytest.raises(ValueError):
        parse_bits("4/8")


@pytest.mark.slow
def test_report_comes_from_the_run(tiny_pipe_dir, tmp_path, fid_ready):
    a = evaluate(settings(tiny_pipe_dir, 4), tmp_path / "a", progress=False)
    b = evaluate(settings(tiny_pipe_dir, 6), tmp_path / "b", progress=False)
    ra, rb = a["rows"], b["rows"]
    assert [r["cell"] for r in ra] == ["fp", "naive-w8a8"]
    assert ra[0]["n"] == 4 and rb[0]["n"] == 6
    assert ra[0]["fid"] != rb[0]["fid"]                       # measured, not fixed
    q = ra[1]
    assert q["checkpoint_bytes"] > 0 and 0 < q["checkpoint_ratio"] < 1
    assert q["psnr_vs_fp"] > 0 and q["calibration_s"] > 0 and q["layer_policy"] == "tfmq-official"
    assert q["is"] is None and "classifier" in a["metric_notes"]["is"]
    on_disk = json.loads((tmp_path / "a" / "report.json").read_text())
    assert on_disk["rows"][1]["fid"] == q["fid"]
    md = (tmp_path / "a" / "report.md").read_text()
    assert "| naive | 8/8 |" in md and f"{q['fid']:.2f}" in md
    samples = np.load(tmp_path / "a" / "cells" / "naive-w8a8" / "samples.npz")["arr_0"]
    assert samples.shape == (4, 16, 16, 3) and samples.dtype == np.uint8
    # the grid: one row per cell under a 22 px label band, grid_images columns of 16 px images
    # enlarged 6x to 96 px, 2 px padding
    w, h = Image.open(tmp_path / "a" / "grid.png").size
    assert h == 2 * (22 + 96 + 2) and w == 3 * (96 + 2) + 2
    assert "[grid.png](grid.png)" in md
    # FID with its N and bootstrap interval; the paired difference to FP; N = 4 is far too small to rank
    assert q["fid_ci"][0] < q["fid"] < q["fid_ci"][1] and len(q["fid_bootstrap"]["samples"]) == 50
    assert "FID (N = 4) [95% CI]" in md and "FID cannot rank these methods" in md

    # continuing: finished cells are reused, a new method adds a cell, other settings are refused
    cell = tmp_path / "a" / "cells" / "fp" / "cell.json"
    before = cell.stat().st_mtime_ns
    c = evaluate(settings(tiny_pipe_dir, 4, ("fp", "naive", "naive")), tmp_path / "a", progress=False)
    assert cell.stat().st_mtime_ns == before and c["rows"][0]["fid"] == ra[0]["fid"]
    with pytest.raises(ValueError, match="other settings"):
        evaluate(settings(tiny_pipe_dir, 5), tmp_path / "a", progress=False)

    # sampling without metrics (e.g. on a GPU machine without the FID network), metrics later
    s = settings(tiny_pipe_dir, 4)
    s.reference = None
    d = evaluate(s, tmp_path / "d", progress=False)
    assert d["rows"][0]["fid"] is None
    cell = tmp_path / "d" / "cells" / "fp" / "cell.json"
    before = cell.stat().st_mtime_ns
    e = evaluate(settings(tiny_pipe_dir, 4), tmp_path / "d", progress=False)
    assert cell.stat().st_mtime_ns == before
    assert e["rows"][0]["fid"] == pytest.approx(ra[0]["fid"])   # same seeds, same samples


def test_bad_settings_fail_before_work(tiny_pipe_dir, tmp_path):
    s = settings(tiny_pipe_dir, 4, ("fp", "magic"))
    with pytest.raises(ValueError, match="unknown method"):
        evaluate(s, tmp_path / "x", progress=False)
    s = settings(tiny_pipe_dir, 4)
    s.bits = ["w1a8"]
    with pytest.raises(ValueError, match="weight bits"):
        evaluate(s, tmp_path / "y", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("bits", ["w4x8", "w1a8", "w4a9", "4/8"])
def test_every_bit_setting_checked_whatever_the_methods(tiny_pipe_dir, tmp_path, capsys, bits):
    from tfmq.cli import main
    s = settings(tiny_pipe_dir, 4, ("fp",))
    s.bits = ["w8a8", bits]
    with pytest.raises(ValueError, match="bit"):
        evaluate(s, tmp_path / "x", progress=False)
    # the CLI refuses it before any work: no output folder, exit code 2, the bad value named
    out = tmp_path / "cli"
    assert main(["evaluate", str(tiny_pipe_dir), "--methods", "fp", "--bits", bits, "--out", str(out)]) == 2
    assert bits in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not out.exists()


def test_new_metric_flags_checked_before_work(tiny_pipe_dir, tmp_path, capsys):
    from tfmq.cli import main
    out = tmp_path / "o"
    assert main(["evaluate", str(tiny_pipe_dir), "--methods", "fp", "--fid-bootstrap", "1", "--out", str(out)]) == 2
    assert "fid_bootstrap" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit):
        main(["evaluate", str(tiny_pipe_dir), "--classifier", "cifar10", "--out", str(out)])
    s = settings(tiny_pipe_dir, 4)
    s.backend = "openvino"
    with pytest.raises(ValueError, match="unknown backend"):
        evaluate(s, out, progress=False)
    assert not out.exists()
