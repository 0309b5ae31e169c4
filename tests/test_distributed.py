"""Several processes (tfmq.distributed): results of 2 gloo processes on the CPU equal one process's.

The 2-process runs are real ``torchrun --standalone --nproc_per_node 2`` launches (of the CLI, or
of tests/dist_worker.py); the 1-process references run in this process.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tfmq
from tfmq import distributed

import conftest
from conftest import tiny_ddpm_pipeline

HERE = Path(__file__).parent


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    src = str(Path(tfmq.__file__).parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE)] + [p for p in [env.get("PYTHONPATH")] if p])
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(args: list[str], cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    res = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


# ---- splitting -------------------------------------------------------------------------------
@pytest.mark.parametrize("n,align,world", [(10, 1, 2), (10, 3, 2), (5, 2, 2), (7, 4, 3), (1, 4, 2),
                                           (0, 2, 2), (250, 32, 4), (1000, 250, 8)])
def test_shard_blocks_are_aligned_and_concatenate_in_order(n, align, world):
    parts = [distributed.shard(n, align, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    for p in parts:
        assert p.step == 1 and (len(p) == 0 or p.start % align == 0)
    batches = [(len(p) + align - 1) // align for p in parts]
    assert max(batches) - min(batches) <= 1        # whole batches, dealt out evenly


def test_one_process_helpers_pass_through():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    x = np.arange(6).reshape(3, 2)
    assert distributed.gather_rows(x) is x
    assert distributed.shard(5, 2) == range(5)
    assert distributed.setup("cpu") == "cpu"              # WORLD_SIZE unset: nothing starts
    assert not distributed.is_initialized()


def test_setup_refuses_cuda_index_and_missing_ranks(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(distributed.DistributedSetupError, match="torchrun or accelerate"):
        distributed.setup("cpu")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(distributed.DistributedSetupError, match="--device cuda"):
        distributed.setup("cuda:1")
    if not torch.cuda.is_available():
        with pytest.raises(distributed.DistributedSetupError, match="no CUDA GPU"):
            distributed.setup("cuda")


# ---- 2 processes ------------------------------------------------------------------------------
@pytest.mark.slow
def test_gather_features_and_data_parallel_gradients(tmp_path, one_thread):
    """Gathered rows / Inception features keep the global order; the data-parallel reconstruction
    gradients (each rank its share of the batch, summed) equal one process's up to float order."""
    import dist_worker
    torchrun([str(HERE / "dist_worker.py"), str(tmp_path)], tmp_path)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0:                                        # every rank ends with the same values
        assert torch.equal(r0[k], r1[k]), k
    # rank 0 held rows 0..2 (values 0, 1, 2), rank 1 none; arrays: rank r held r + 1 rows of r
    assert r0["gather.tensor"][:, 0].tolist() == [0.0, 1.0, 2.0]
    assert r0["gather.array"][:, 0].tolist() == [0, 1, 1]
    one = dist_worker.check_features()
    assert torch.equal(r0["features.pool"], one["pool"]) and torch.equal(r0["features.spatial"], one["spatial"])
    ref = {f"grads.{k}": v for k, v in dist_worker.check_grads().items()}
    grads = [k for k in ref if k.endswith(".grads")]
    assert len(grads) == 3
    for k in ref:     # float32 sums in another order: relative to the tensor's scale
        err = float((r0[k] - ref[k]).abs().max() / ref[k].abs().max())
        assert err < 1e-4, (k, err)
    for k in grads:                                     # real gradients, not zeros
        assert ref[k].abs().max() > 1e-7


QUANT = ["--method", "tfmq", "--wbits", "4", "--abits", "8", "--calib-size", "6", "--calib-batch-size", "2",
         "--steps", "4", "--interval-length", "2", "--recon-iters", "8", "--recon-batch-size", "4",
         "--tiar-iters", "4", "--act-learn-iters", "0", "--seed", "3"]


def quantize_one_and_two(tmp_path, opts: list[str]) -> tuple[dict, dict]:
    """``tfmq quantize`` of the tiny UNet with ``opts`` (tfmq method) under torchrun on 2 processes
    (into tmp_path/two) and through the API in this process (tmp_path/one): both checkpoints'
    tensors."""
    model = tmp_path / "tiny"
    tiny_ddpm_pipeline().save_pretrained(model)
    torchrun(["-m", "tfmq", "quantize", str(model), *opts, "--out", str(tmp_path / "two")], tmp_path)
    from tfmq.api import load_any
    from tfmq.cli import build_parser, quantize_overrides
    from tfmq.config import QuantConfig
    args = build_parser().parse_args(["quantize", str(model), *opts, "--out", "x"])
    pipe = load_any(str(model))
    tfmq.quantize(pipe, QuantConfig.for_method("tfmq", **quantize_overrides(args)), progress=False)
    tfmq.save(pipe, tmp_path / "one")
    return tuple(load_file(str(tmp_path / d / "tfmq_denoiser.safetensors")) for d in ("one", "two"))


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["rows", "replicate", "batch"])
def test_two_process_quantize_gives_the_same_checkpoint(tmp_path, one_thread, parallel):
    """tfmq (TIAR, reconstruction, FSC, activation ranges) on 2 processes: the same checkpoint
    tensors, bit for bit, as one process. With the data-parallel loops ("rows", the CPU default,
    and "batch", each rank a fixed half of every batch over all rows) activation step learning is off (its gradient sums change order: see the note of issue 13);
    with "replicate" (the CUDA-graph default) it is on: each rank caches half the rows, every rank
    runs the whole loop, and the result is exact."""
    opts = [*QUANT, "--recon-parallel", parallel]
    if parallel == "replicate":
        opts = [*opts, "--act-learn-iters", "6"]
    a, b = quantize_one_and_two(tmp_path, opts)
    assert a.keys() == b.keys() and len(a) > 100
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"
    assert list(tmp_path.glob("two/.tfmq-progress")) == []      # rank 0 cleaned up, nothing else wrote
    ran = (tmp_path / "two" / "quantization_config.json").read_text()      # the loops ran as asked
    assert ("(replicated on 2 ranks)" if parallel == "replicate" else "(data-parallel)") in ran


@pytest.mark.slow
def test_two_process_replicate_with_fewer_capture_passes_than_ranks(tmp_path, one_thread):
    """Two calibration rows, one capture pass: under "replicate" both ranks cache all rows (no
    rank is left without rows) and the checkpoint equals one process's."""
    opts = [*QUANT, "--calib-size", "2", "--interval-length", "4", "--act-learn-iters", "3",
            "--recon-parallel", "replicate"]
    a, b = quantize_one_and_two(tmp_path, opts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
# "rows" is left out (a minute on 2 CPU cores): its resume path is the one "batch" takes, and its
# 2-process checkpoint is checked against one process in test_two_process_quantize_gives_the_same_checkpoint
@pytest.mark.parametrize("parallel", ["replicate", "batch"])
def test_two_process_run_interrupted_and_resumed_gives_the_one_process_checkpoint(tmp_path, one_thread,
                                                                                  parallel):
    """A 2-process calibration stopped after 5 units and continued with resume (a second launch:
    rank 0 kept the progress, rank 1 reads it) ends with one uninterrupted process's checkpoint;
    exact for "replicate", for the data-parallel "batch" the weight codes are
    (activation steps: float sum order)."""
    import dist_resume_worker as worker
    work = tmp_path / "run"
    torchrun([str(HERE / "dist_resume_worker.py"), str(work), "interrupt", parallel], tmp_path)
    assert (work / ".tfmq-progress").is_dir() and not (work / "ckpt").exists()
    torchrun([str(HERE / "dist_resume_worker.py"), str(work), "resume", parallel], tmp_path)
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, conftest.tiny_qdiff(**worker.RESUME_SETTINGS), progress=False)
    tfmq.save(pipe, tmp_path / "one")
    a = load_file(str(tmp_path / "one" / "tfmq_denoiser.safetensors"))
    b = load_file(str(work / "ckpt" / "tfmq_denoiser.safetensors"))
    assert a.keys() == b.keys()
    learned_act = lambda k: k.endswith(".scale") and ("act_quantizer" in k or "tfmq_attn" in k)  # noqa: E731
    compared = [k for k in a if parallel == "replicate" or not learned_act(k)]
    differ = [k for k in compared if not torch.equal(a[k], b[k])]
    assert len(compared) > 50 and not differ, differ[:5]
    info = (work / "ckpt" / "quantization_config.json").read_text()
    assert info.count('"restored": true') == 5                  # the first run's units were kept


@pytest.mark.slow
def test_two_process_sample_gives_the_same_images(tmp_path, one_thread):
    """5 images in batches of 2 over 2 processes (3 batches: 4 images and 1): the same images,
    in the same order, as one process."""
    model = tmp_path / "tiny"
    tiny_ddpm_pipeline().save_pretrained(model)
    res = torchrun(["-m", "tfmq", "sample", str(model), "--num-images", "5", "--batch-size", "2",
                    "--steps", "3", "--seed", "7", "--out", str(tmp_path / "two")], tmp_path)
    assert res.stdout.count('"num_images"') == 1          # only rank 0 printed
    from tfmq.sampling import SamplerConfig, generate
    one = generate(tiny_ddpm_pipeline(), SamplerConfig("ddim", 3), 5, 2, 7, progress=False)
    two = np.load(tmp_path / "two" / "samples.npz")["arr_0"]
    assert two.shape == one.shape == (5, 16, 16, 3)
    assert np.array_equal(one, two)
    assert len(set(map(bytes, one))) == 5                  # five different images


def test_batch_mode_refuses_a_batch_smaller_than_the_processes_before_any_work(tiny_pipe, monkeypatch):
    """recon_parallel='batch' gives every rank a slice of each batch: with 3 processes and
    batches of 2 rows the call fails at once (the denoiser is left unwrapped, untouched)."""
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    before = {k: v.clone() for k, v in tiny_pipe.unet.state_dict().items()}
    with pytest.raises(ValueError, match="recon_batch_size=2 rows over the 3 processes"):
        tfmq.quantize(tiny_pipe, method="tfmq", wbits=4, abits=8, calib_size=2, recon_batch_size=2,
                      recon_parallel="batch", progress=False)
    after = tiny_pipe.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert getattr(tiny_pipe.unet, "tfmq_info", None) is None
