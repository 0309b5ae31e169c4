"""The command line end to end in a temp folder (tiny RANDOM-weight pipeline: plumbing only)."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from tfmq.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tfmq", *map(str, args)], capture_output=True, text=True)


def test_quantize_then_sample(tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_pipe_dir), "--method", "naive", "--wbits", "4", "--abits", "8",
               "--steps", "3", "--calib-size", "2", "--seed", "1", "--out", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["wbits"] == 4 and "calibration_data" in report["calibration_time"]["stages_s"]
    assert (out / "quantization_config.json").exists() and (out / "tfmq_denoiser.safetensors").exists()

    samples = tmp_path / "s"
    rc = main(["sample", str(out), "--num-images", "3", "--batch-size", "2", "--seed", "5", "--out", str(samples)])
    assert rc == 0
    pngs = sorted(p.name for p in samples.glob("0*.png"))
    assert pngs == ["000000.png", "000001.png", "000002.png"]
    arr = np.load(samples / "samples.npz")["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (3, 16, 16, 3)
    assert np.array_equal(np.asarray(Image.open(samples / "000001.png")), arr[1])
    assert Image.open(samples / "grid.png").size[0] > 16
    # the checkpoint's sampler (3 DDIM steps) is the default when sampling from it
    assert json.loads(capsys.readouterr().out)["sampler"]["steps"] == 3

    # sampling the FP pipeline works too, and refuses to overwrite
    fp_out = tmp_path / "fp"
    assert main(["sample", str(tiny_pipe_dir), "--num-images", "2", "--steps", "2", "--out", str(fp_out)]) == 0
    assert main(["sample", str(tiny_pipe_dir), "--num-images", "2", "--steps", "2", "--out", str(fp_out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_sample_compile_flag(tiny_pipe_dir, tmp_path, capsys, monkeypatch):
    """``tfmq sample --compile MODE`` compiles the denoiser's forward in that mode before sampling
    (here with torch.compile's aot_eager backend, which needs no C++ compiler on the CPU): the
    images equal the uncompiled run's; --compile with onnxruntime is refused before any work."""
    import torch

    from tfmq.runtime import backends
    from tfmq.runtime.guards import SkipGuardsAfterFirstCall
    modes, wrappers = [], []
    real = backends.compile_denoiser

    def record(denoiser, mode=None):
        modes.append(mode)            # as compile_denoiser does, guards skipped after a signature's first call
        denoiser.forward = SkipGuardsAfterFirstCall(torch.compile(denoiser.forward, backend="aot_eager",
                                                                  fullgraph=True))
        wrappers.append(denoiser.forward)
        return denoiser
    monkeypatch.setattr(backends, "compile_denoiser", record)
    common = ["--num-images", "2", "--steps", "2", "--seed", "3"]
    assert main(["sample", str(tiny_pipe_dir), *common, "--out", str(tmp_path / "eager")]) == 0
    capsys.readouterr()
    assert main(["sample", str(tiny_pipe_dir), *common, "--compile", "reduce-overhead",
                 "--out", str(tmp_path / "comp")]) == 0
    assert json.loads(capsys.readouterr().out)["compile"] == "reduce-overhead"
    assert modes == ["reduce-overhead"]
    assert wrappers[0].skipped > 0                 # later sampling steps ran without the guard check
    a, b = (np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("eager", "comp"))
    assert np.array_equal(a, b)
    monkeypatch.setattr(backends, "compile_denoiser", real)
    import tfmq
    from tfmq.models.adapter import load_pipeline
    pipe = load_pipeline(str(tiny_pipe_dir))
    tfmq.quantize(pipe, wbits=8, abits=8, calib_size=2, sampler=tfmq.SamplerConfig("ddim", 2), progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    r = run_cli("sample", ckpt, "--backend", "onnxruntime", "--compile", "default", "--out", tmp_path / "o")
    assert r.returncode == 2 and "--compile applies to the PyTorch denoiser" in r.stderr
    assert not (tmp_path / "o").exists()
    r = run_cli("sample", tiny_pipe_dir, "--compile", "fast", "--out", tmp_path / "o")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_quantize_weight_symmetric_flag(tiny_pipe_dir, tmp_path, capsys):
    """--weight-symmetric: every quantized weight of the checkpoint has zero-point 0 and signed
    codes (the w8a8 GEMMs then take no activation sums); without it the grids are asymmetric."""
    import tfmq
    from tfmq.runtime import runtime_layers
    for flag, symmetric in (["--weight-symmetric"], True), ([], False):
        out = tmp_path / f"q{symmetric}"
        assert main(["quantize", str(tiny_pipe_dir), "--wbits", "8", "--abits", "8", "--steps", "2", "--calib-size",
                     "2", *flag, "--out", str(out)]) == 0
        capsys.readouterr()
        weights = [m.qweight for m in runtime_layers(tfmq.load(out).unet).values() if m.qweight is not None]
        assert weights and all(bool((w.zero_point == 0).all()) == symmetric for w in weights)
        assert all((w.qmin < 0) == symmetric for w in weights)


def test_sample_temporal_table_flag(tiny_pipe_dir, tmp_path, capsys):
    """``tfmq sample CKPT --temporal-table`` samples with the temporal block tabulated at load;
    the flag is refused for a full-precision pipeline and for onnxruntime, before any work."""
    import tfmq
    from tfmq.models.adapter import load_pipeline
    pipe = load_pipeline(str(tiny_pipe_dir))
    tfmq.quantize(pipe, tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, calib_size=2, recon_iters=0,
                                                    act_learn_iters=0, tiar_iters=0,
                                                    sampler=tfmq.SamplerConfig("ddim", 2)), progress=False)
    ckpt = tfmq.save(pipe, tmp_path / "ckpt")
    assert main(["sample", str(ckpt), "--num-images", "2", "--temporal-table", "--out", str(tmp_path / "t")]) == 0
    assert json.loads(capsys.readouterr().out)["temporal_table"] is True
    assert np.load(tmp_path / "t" / "samples.npz")["arr_0"].shape == (2, 16, 16, 3)
    assert main(["sample", str(ckpt), "--steps", "3", "--temporal-table", "--out", str(tmp_path / "s3")]) == 2
    assert "calibrated" in capsys.readouterr().err and not (tmp_path / "s3" / "samples.npz").exists()
    for source, extra in ((tiny_pipe_dir, []), (ckpt, ["--backend", "onnxruntime"])):
        r = run_cli("sample", source, "--temporal-table", *extra, "--out", tmp_path / "o")
        assert r.returncode == 2 and "--temporal-table applies to a quantized checkpoint" in r.stderr
        assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,msg", [
    (["--wbits", "1"], "unsupported bit width 1"),
    (["--abits", "9"], "unsupported bit width 9"),
    (["--wbits", "four"], "not an integer"),
    (["--calib-size", "0"], "must be >= 1"),
    (["--method", "magic"], "invalid choice"),
    (["--layer-policy", "nope"], "invalid choice"),
    (["--device", "tpu"], "device must be"),
])
def test_bad_flags_fail_before_any_work(flags, msg, tmp_path):
    r = run_cli("quantize", "/does/not/exist", "--out", tmp_path / "o", *flags)
    assert r.returncode == 2 and msg in r.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_is_not_overwritten(tiny_pipe_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    r = run_cli("quantize", tiny_pipe_dir, "--out", out, "--steps", "2", "--calib-size", "1")
    assert r.returncode != 0 and "not empty" in r.stderr
    assert (out / "mine.txt").read_text() == "keep"


def test_unloadable_model_is_a_clear_error(tmp_path):
    r = run_cli("quantize", tmp_path / "missing-model", "--out", tmp_path / "o", "--steps", "2")
    assert r.returncode == 2 and "could not load a diffusers pipeline" in r.stderr


def test_help_explains_every_flag():
    r = run_cli("quantize", "--help")
    assert r.returncode == 0
    for flag in ("--method", "--wbits", "--abits", "--steps", "--calib-size", "--seed", "--out",
                 "--layer-policy", "--device"):
        assert flag in r.stdout
    r = run_cli("sample", "--help")
    for flag in ("--num-images", "--batch-size", "--guidance-scale", "--class-labels", "--prompt"):
        assert flag in r.stdout
    r = run_cli("evaluate", "--help")
    for flag in ("--methods", "--bits", "--reference", "--prompt", "--clip-model", "--set"):
        assert flag in r.stdout


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["quantize", "--help"],
                                  ["quantize", "--wbits", "1", "--out", "x"], ["sample"]])
def test_help_version_and_flag_errors_answer_at_once(argv):
    """No torch / diffusers import for these (they take seconds): measured in a fresh process."""
    code = ("import sys, time; t0 = time.perf_counter()\n"
            "from tfmq.cli import main\n"
            "try:\n    main(%r)\nexcept SystemExit:\n    pass\n"
            "print('\\nTIMING', time.perf_counter() - t0, 'torch' in sys.modules, 'diffusers' in sys.modules)"
            % argv)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    seconds, torch_loaded, diffusers_loaded = r.stdout.rsplit("TIMING", 1)[1].split()
    assert diffusers_loaded == "False" and torch_loaded == "False"
    assert wall < 3.0, (seconds, wall)       # ~0.15 s alone on 2 cores; generous for a busy CI


def test_cli_choices_agree_with_the_registries():
    from tfmq import choices
    from tfmq.config import FSC_MODES, TEMPORAL_MODES
    from tfmq.quant.quantizer import SUPPORTED_BITS
    from tfmq.recipes import RECIPES
    from tfmq.sampling import SCHEDULERS
    assert tuple(SCHEDULERS) == choices.SAMPLERS and SUPPORTED_BITS == choices.SUPPORTED_BITS
    assert {n: r.description for n, r in RECIPES.items()} == choices.METHOD_DESCRIPTIONS
    assert (FSC_MODES, TEMPORAL_MODES) == (choices.FSC_MODES, choices.TEMPORAL_MODES)


def test_deterministic_flag_turns_on_deterministic_algorithms(tiny_pipe_dir, tmp_path):
    """--deterministic (quantize / sample / evaluate) switches PyTorch to deterministic algorithms
    before any work (a subprocess: the switch is process-wide), and the run still works."""
    code = ("import sys, torch; from tfmq.cli import main; rc = main(sys.argv[1:]); "
            "print('DET', torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic); "
            "sys.exit(rc)")
    args = ["quantize", str(tiny_pipe_dir), "--method", "naive", "--wbits", "8", "--abits", "8", "--steps", "2",
            "--calib-size", "2", "--out", str(tmp_path / "q")]
    r = subprocess.run([sys.executable, "-c", code, *args, "--deterministic"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "DET True True" in r.stdout
    r = subprocess.run([sys.executable, "-c", code, "sample", str(tmp_path / "q"), "--num-images", "1",
                        "--out", str(tmp_path / "s")], capture_output=True, text=True)
    assert r.returncode == 0 and "DET False False" in r.stdout        # off unless asked
    from tfmq.cli import build_parser
    for cmd in (["sample", "x", "--out", "o"], ["evaluate", "--out", "o"]):
        assert build_parser().parse_args([*cmd, "--deterministic"]).deterministic
