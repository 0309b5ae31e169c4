"""Bad input and misuse (issue 14): each refused with a clear error before any work, nothing lost.

Tiny models from conftest have RANDOM weights (plumbing only).
"""

import json

import pytest
import torch

import tfmq
from tfmq.api import QuantizedSaveError
from tfmq.cli import main
from tfmq.sampling import SamplerConfig

STEPS = SamplerConfig(steps=3)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_save_pretrained_of_a_quantized_pipeline_refuses(tiny_pipe, tmp_path):
    fp_dir = tmp_path / "fp"
    tiny_pipe.save_pretrained(fp_dir)                     # an FP pipeline saves as usual
    tfmq.quantize(tiny_pipe, wbits=4, abits=8, calib_size=2, sampler=STEPS, progress=False)
    for obj in (tiny_pipe, tiny_pipe.unet):
        with pytest.raises(QuantizedSaveError, match=r"tfmq\.save\(pipe, DIR\)"):
            obj.save_pretrained(tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    ckpt = tfmq.save(tiny_pipe, tmp_path / "ckpt")        # the tfmq way still works
    loaded = tfmq.load(ckpt)
    with pytest.raises(QuantizedSaveError, match="dense full-precision copy"):
        loaded.save_pretrained(tmp_path / "dense")
    assert not (tmp_path / "dense").exists()
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    with torch.no_grad():
        assert torch.equal(loaded.unet(x, t).sample, tiny_pipe.unet(x, t).sample)
    tfmq.load_pipeline(fp_dir).save_pretrained(tmp_path / "fp2")    # other pipelines unaffected
    assert (tmp_path / "fp2" / "model_index.json").exists()


# ---- helpers ----------------------------------------------------------------------------------
def cli(capsys, *argv):
    """Run the CLI in-process: (exit code, stderr)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:          # argparse flag errors
        rc = exc.code
    return rc, capsys.readouterr().err


QUICK = ["--method", "naive", "--steps", "3", "--calib-size", "2"]


def tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# ---- --resume and --out never destroy what tfmq did not write --------------------------------
def test_resume_refuses_a_folder_with_other_files(tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    rc, err = cli(capsys, "quantize", tiny_pipe_dir, *QUICK, "--resume", "--out", out)
    assert rc == 2 and "nothing was changed" in err and "thesis.tex" in err
    assert (out / "thesis.tex").read_text() == "years of work" and len(list(out.iterdir())) == 1
    # the same next to real progress: the user's file is not swept away by the final save
    (out / ".tfmq-progress").mkdir()
    (out / ".tfmq-progress" / "manifest.json").write_text(json.dumps({"format": "tfmq-progress"}))
    rc, err = cli(capsys, "quantize", tiny_pipe_dir, *QUICK, "--resume", "--out", out)
    assert rc == 2 and "did not write" in err and (out / "thesis.tex").exists()
    # a progress folder tfmq does not recognise is not continued either
    (out / "thesis.tex").unlink()
    (out / ".tfmq-progress" / "manifest.json").write_text("{}")
    rc, err = cli(capsys, "quantize", tiny_pipe_dir, *QUICK, "--resume", "--out", out)
    assert rc == 2 and "not a progress folder this tfmq recognises" in err


@pytest.mark.parametrize("where", ["same", "inside", "new-inside", "contains"])
@pytest.mark.parametrize("flag", ["--resume", "--overwrite", None])
def test_out_may_not_be_the_input_model(tiny_pipe_dir, tmp_path, capsys, where, flag):
    before = tree(tiny_pipe_dir)
    out = {"same": tiny_pipe_dir, "inside": tiny_pipe_dir / "unet", "new-inside": tiny_pipe_dir / "q",
           "contains": tiny_pipe_dir.parent}[where]
    rc, err = cli(capsys, "quantize", tiny_pipe_dir, *QUICK, *([flag] if flag else []), "--out", out)
    assert rc == 2
    if where == "new-inside" or flag == "--overwrite":
        assert "would destroy it" in err
    else:                               # a non-empty folder: refused before the model is even looked at
        assert "nothing was changed" in err if flag == "--resume" else "not empty" in err
    assert tree(tiny_pipe_dir) == before and not (tiny_pipe_dir / "q").exists()


def test_resume_refuses_a_finished_checkpoint_and_the_flag_pair(tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "ckpt"
    assert cli(capsys, "quantize", tiny_pipe_dir, *QUICK, "--out", out)[0] == 0
    before = tree(out)
    rc, err = cli(capsys, "quantize", tiny_pipe_dir, *QUICK, "--resume", "--out", out)
    assert rc == 2 and "finished checkpoint" in err and tree(out) == before
    rc, err = cli(capsys, "quantize", tiny_pipe_dir, *QUICK, "--resume", "--overwrite", "--out", out)
    assert rc == 2 and "pass one" in err and tree(out) == before


# ---- corrupted tensor data ---------------------------------------------------------------------
def flip_tensor_bytes(path, count=200, seed=0):
    """Flip ``count`` bytes of the tensor data (after the safetensors header), like a bad disk."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    g = torch.Generator().manual_seed(seed)
    for i in torch.randperm(len(data) - start, generator=g)[:count].tolist():
        data[start + i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupted_tensor_data_is_refused(tiny_pipe, tmp_path, capsys):
    from tfmq.checkpoint import CHECKSUMS_KEY, TENSOR_FILE, CheckpointError
    tfmq.quantize(tiny_pipe, wbits=4, abits=8, calib_size=2, sampler=STEPS, progress=False)
    ckpt = tfmq.save(tiny_pipe, tmp_path / "ckpt")
    tfmq.load(ckpt)                                               # intact: loads
    original = (ckpt / TENSOR_FILE).read_bytes()
    flip_tensor_bytes(ckpt / TENSOR_FILE)
    with pytest.raises(CheckpointError, match="changed since it was written"):
        tfmq.load(ckpt)
    rc, err = cli(capsys, "sample", ckpt, "--num-images", "1", "--out", tmp_path / "s")
    assert rc == 2 and "is corrupt" in err and not (tmp_path / "s").exists()
    # a single flipped byte is enough
    data = bytearray(original)
    data[-3] ^= 0x01
    (ckpt / TENSOR_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="changed since it was written"):
        tfmq.load(ckpt)
    # a file without checksums cannot be verified: refused, not trusted
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    (ckpt / TENSOR_FILE).write_bytes(original)
    with safe_open(str(ckpt / TENSOR_FILE), "pt") as f:
        meta = f.metadata()
    del meta[CHECKSUMS_KEY]
    save_file(load_file(str(ckpt / TENSOR_FILE)), str(ckpt / TENSOR_FILE), metadata=meta)
    with pytest.raises(CheckpointError, match="no tensor checksums"):
        tfmq.load(ckpt)


# ---- non-finite values -------------------------------------------------------------------------
@pytest.mark.parametrize("flag,value", [("--eta", "nan"), ("--guidance-scale", "inf"),
                                        ("--guidance-scale", "nan"), ("--eta", "-inf"),
                                        ("--recon-lr", "nan"), ("--act-ema", "inf")])
def test_non_finite_flags_are_usage_errors(tmp_path, capsys, flag, value):
    rc, err = cli(capsys, "quantize", "/no/such/model", "--out", tmp_path / "o", f"{flag}={value}")
    assert rc == 2 and "finite" in err and not (tmp_path / "o").exists()
    if flag in ("--eta", "--guidance-scale"):
        rc, err = cli(capsys, "sample", "/no/such/model", "--out", tmp_path / "o", f"{flag}={value}")
        assert rc == 2 and "finite" in err


def test_non_finite_sampler_and_config_values_are_refused():
    nan = float("nan")
    for bad in (SamplerConfig(eta=nan), SamplerConfig(guidance_scale=float("inf")),
                SamplerConfig(guidance_scale=nan)):
        with pytest.raises(ValueError, match="finite"):
            bad.validate()
    with pytest.raises(ValueError, match="memory_budget_gb must be finite"):
        tfmq.QuantConfig.for_method("naive", memory_budget_gb=nan)


def test_nan_weight_is_refused_before_any_work(tiny_pipe, tmp_path):
    from tfmq.finite import NonFiniteError
    with torch.no_grad():
        tiny_pipe.unet.down_blocks[0].resnets[0].conv1.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"down_blocks\.0\.resnets\.0\.conv1\.weight"):
        tfmq.quantize(tiny_pipe, wbits=4, abits=8, calib_size=2, sampler=STEPS, progress=False,
                      work_dir=tmp_path / "w")
    assert getattr(tiny_pipe.unet, "tfmq_info", None) is None and not (tmp_path / "w").exists()


def test_non_finite_fp_output_is_refused(tmp_path):
    """A Fourier time embedding takes log(t): NaN at t = 0, the last DDIM step."""
    from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel
    from tfmq.finite import NonFiniteError
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                       block_out_channels=(16, 32), norm_num_groups=8, time_embedding_type="fourier",
                       down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D")).eval()
    pipe = DDPMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000))
    with pytest.raises(NonFiniteError, match=r"timestep\(s\) 0 "):
        tfmq.quantize(pipe, wbits=8, abits=8, calib_size=2, sampler=STEPS, progress=False,
                      work_dir=tmp_path / "w")
    assert not (tmp_path / "w").exists()            # the failed start left nothing behind


def test_non_finite_quantization_parameters_are_never_written(tiny_pipe, tmp_path):
    from tfmq.finite import NonFiniteError, check_finite_quant_params
    from tfmq.quant.quantizer import UniformQuantizer
    tfmq.quantize(tiny_pipe, wbits=8, abits=8, calib_size=2, sampler=STEPS, progress=False)
    check_finite_quant_params(tiny_pipe.unet)                          # a normal run: all finite
    name, q = next((n, m) for n, m in tiny_pipe.unet.named_modules()
                   if isinstance(m, UniformQuantizer) and m.scale.numel())
    q.scale.data[0] = float("inf")
    with pytest.raises(NonFiniteError, match=name):
        check_finite_quant_params(tiny_pipe.unet)
    with pytest.raises(NonFiniteError, match="refusing to write"):
        tfmq.save(tiny_pipe, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists() and not list(tmp_path.iterdir())


# ---- output folders: writable, checked first; OS errors in one line ---------------------------
def test_unwritable_out_is_refused_before_work(tiny_pipe_dir, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for cmd in (["sample", tiny_pipe_dir, "--num-images", "1"], ["quantize", tiny_pipe_dir, *QUICK],
                ["evaluate", tiny_pipe_dir, "--num-images", "2"]):
        rc, err = cli(capsys, *cmd, "--out", blocker / "sub")
        assert rc == 2 and "is a file, not a folder" in err, (cmd, err)
        rc, err = cli(capsys, *cmd, "--out", blocker)
        assert rc == 2 and "is a file, not a folder" in err, (cmd, err)
    import os
    read_only = "/proc/sys/kernel"                    # read-only even for root
    if os.path.isdir(read_only) and not os.access(read_only, os.W_OK):
        rc, err = cli(capsys, "sample", tiny_pipe_dir, "--num-images", "1", "--out", f"{read_only}/tfmq")
        assert rc == 2 and "no write permission" in err


def test_os_error_during_work_is_one_line(tiny_pipe_dir, tmp_path, capsys, monkeypatch):
    import tfmq.eval.grid as grid

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "s" / "000000.png"))
    monkeypatch.setattr(grid, "save_samples", disk_full)
    rc, err = cli(capsys, "sample", tiny_pipe_dir, "--num-images", "1", "--steps", "2", "--out", tmp_path / "s")
    last = err.rstrip().splitlines()[-1].split("\r")[-1]           # after the progress bars
    assert rc == 1 and last.startswith("error: [Errno 28] No space left on device")
    assert err.count("error:") == 1 and "Traceback" not in err


def test_early_error_leaves_no_progress_folder(tiny_pipe_dir, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["quantize", tiny_pipe_dir, *QUICK, "--out", out]
    rc, err = cli(capsys, *argv, "--guidance-scale", "2")           # unconditional model
    assert rc == 2 and "guidance needs a conditional model" in err
    assert not out.exists()                                         # nothing created, nothing left
    out.mkdir()
    rc, err = cli(capsys, *argv, "--guidance-scale", "2")
    assert rc == 2 and out.is_dir() and not any(out.iterdir())      # a folder it did not create stays
    assert cli(capsys, *argv)[0] == 0                               # the corrected command runs


# ---- messages ----------------------------------------------------------------------------------
def test_messages_for_incomplete_checkpoints_killed_runs_and_paths(tiny_pipe_dir, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    assert cli(capsys, "quantize", tiny_pipe_dir, *QUICK, "--out", ckpt)[0] == 0
    (ckpt / "quantization_config.json").unlink()
    rc, err = cli(capsys, "sample", ckpt, "--out", tmp_path / "s")
    assert rc == 2 and "incomplete tfmq checkpoint" in err and "quantization_config.json" in err
    assert ".bin" not in err
    killed = tmp_path / "killed"
    (killed / ".tfmq-progress").mkdir(parents=True)
    (killed / ".tfmq-progress" / "manifest.json").write_text(json.dumps({"format": "tfmq-progress"}))
    rc, err = cli(capsys, "sample", killed, "--out", tmp_path / "s")
    assert rc == 2 and "unfinished `tfmq quantize` run" in err and "--resume" in err
    rc, err = cli(capsys, "quantize", tiny_pipe_dir, *QUICK, "--out", killed)
    assert rc == 2 and "unfinished" in err and "--resume" in err
    rc, err = cli(capsys, "sample", tmp_path / "no" / "such" / "model", "--out", tmp_path / "s")
    assert rc == 2 and "no such local folder" in err and "hub id" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_usage_errors_exit_2(tiny_pipe_dir, tmp_path, capsys):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv in (["sample", tiny_pipe_dir, "--device", "cuda", "--out", tmp_path / "o"],
                 ["quantize", tiny_pipe_dir, "--out", tmp_path / "full"],
                 ["quantize", tiny_pipe_dir, "--wbits", "1", "--out", tmp_path / "o"],
                 ["evaluate", tiny_pipe_dir, "--class-labels", "1", "--out", tmp_path / "o"],
                 ["analyze", tmp_path / "missing", "--out", tmp_path / "o"]):
        rc, err = cli(capsys, *argv)
        assert rc == 2 and err.startswith(("error:", "usage:")), (argv, err)


# ---- sample --overwrite -------------------------------------------------------------------------
def test_sample_overwrite_leaves_no_stale_pngs(tiny_pipe_dir, tmp_path, capsys):
    import numpy as np
    out = tmp_path / "s"
    base = ["sample", tiny_pipe_dir, "--steps", "2", "--out", out]
    assert cli(capsys, *base, "--num-images", "4")[0] == 0
    (out / "notes.txt").write_text("mine")
    assert cli(capsys, *base, "--num-images", "2", "--overwrite", "--seed", "9")[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["000000.png", "000001.png", "grid.png", "notes.txt",
                                                     "samples.npz"]
    assert np.load(out / "samples.npz")["arr_0"].shape[0] == 2 and (out / "notes.txt").read_text() == "mine"


# ---- interruptions: Ctrl-C and SIGKILL, then --resume -------------------------------------------
def qdiff_argv(model, iters=5):
    return ["quantize", model, "--method", "qdiff", "--layer-policy", "all", "--wbits", "4", "--abits", "8",
            "--steps", "4", "--calib-size", "2", "--calib-steps", "2", "--recon-iters", str(iters),
            "--act-learn-iters", str(iters), "--recon-batch-size", "2", "--seed", "3"]


def assert_same_checkpoint(a, b):
    """Same tensors bit for bit (dtype and bytes) and the same metadata (whose order in the file
    header is the safetensors library's hash-map order, not ours)."""
    from safetensors import safe_open
    from tfmq.checkpoint import TENSOR_FILE
    with safe_open(str(a / TENSOR_FILE), "pt") as fa, safe_open(str(b / TENSOR_FILE), "pt") as fb:
        assert fa.metadata() == fb.metadata() and sorted(fa.keys()) == sorted(fb.keys())
        for k in fa.keys():
            ta, tb = fa.get_tensor(k), fb.get_tensor(k)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k


def test_ctrl_c_is_one_line_and_resume_gives_the_same_checkpoint(tiny_pipe_dir, tmp_path, capsys,
                                                                 monkeypatch):
    import tfmq.cli as cli_module
    from tfmq.checkpoint import TENSOR_FILE
    argv = qdiff_argv(tiny_pipe_dir)
    assert cli(capsys, *argv, "--out", tmp_path / "ref")[0] == 0
    real = cli_module._extra_quantize_kwargs

    def interrupting(args):
        done = []

        def on_unit(phase, unit, stats):
            done.append(unit)
            if len(done) == 3:
                raise KeyboardInterrupt
        return {**real(args), "on_unit": on_unit}
    monkeypatch.setattr(cli_module, "_extra_quantize_kwargs", interrupting)
    out = tmp_path / "run"
    rc, err = cli(capsys, *argv, "--out", out)
    assert rc == 130 and "Traceback" not in err
    assert err.rstrip().splitlines()[-1] == (f"interrupted: the finished units are kept in "
                                             f"{out / '.tfmq-progress'}; continue with the same command "
                                             f"plus --resume")
    monkeypatch.undo()
    assert cli(capsys, *argv, "--resume", "--out", out)[0] == 0
    assert_same_checkpoint(out, tmp_path / "ref")
    assert not (out / ".tfmq-progress").exists()


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_bit_identical_checkpoint(tiny_pipe_dir, tmp_path, capsys):
    """A real process killed with SIGKILL mid-reconstruction, then `--resume` in the same --out."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from tfmq.checkpoint import TENSOR_FILE
    argv = [str(a) for a in qdiff_argv(tiny_pipe_dir, iters=40)]
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tfmq", *argv, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    manifest = out / ".tfmq-progress" / "manifest.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if json.loads(manifest.read_text())["done"]:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / TENSOR_FILE).exists() and json.loads(manifest.read_text())["done"]
    assert cli(capsys, *argv, "--resume", "--out", out)[0] == 0
    assert cli(capsys, *argv, "--out", tmp_path / "ref")[0] == 0
    assert_same_checkpoint(out, tmp_path / "ref")


# ---- what held and must keep holding -------------------------------------------------------------
class _Trap:
    """Unpickling this creates a marker folder: it shows whether anything unpickled the file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.mkdir, (self.marker,))


def test_loading_a_checkpoint_never_unpickles(tiny_sd, tmp_path):
    import pickle
    tfmq.quantize(tiny_sd, wbits=8, abits=8, calib_size=1, sampler=SamplerConfig(steps=2),
                  prompts=["a cat"], progress=False)
    ckpt = tfmq.save(tiny_sd, tmp_path / "ckpt")
    tfmq.load(ckpt)
    marker = tmp_path / "unpickled"
    for component in ("vae", "text_encoder"):                  # swap safetensors for a pickle
        for f in (ckpt / component).glob("*.safetensors"):
            f.unlink()
        (ckpt / component / ("diffusion_pytorch_model.bin" if component == "vae" else "pytorch_model.bin")
         ).write_bytes(pickle.dumps({"weight": _Trap(str(marker))}))
    with pytest.raises(OSError, match="safetensors"):               # safetensors only, no .bin
        tfmq.load(ckpt)
    assert not marker.exists()
