"""Resumable calibration: interrupt after some units, resume, get exactly the uninterrupted result.

Tiny models from conftest have RANDOM weights (plumbing only).
"""

import json

import pytest
import torch
import conftest
from conftest import tiny_ddpm_pipeline
from safetensors.torch import load_file

import tfmq
from tfmq.calib.resume import MANIFEST, PROGRESS_DIR, ResumeError
from tfmq.checkpoint import TENSOR_FILE


pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupt(Exception):
    """Stands for Ctrl-C / a killed process."""


def tiny_qdiff(**overrides):
    return conftest.tiny_qdiff(**{"recon_iters": 15, "act_learn_iters": 10, "recon_batch_size": 4, **overrides})


def interrupt_after(n: int, phase: str | None = None):
    count = [0]

    def callback(p, unit, stats):
        if phase is None or p == phase:
            count[0] += 1
            if count[0] == n:
                raise Interrupt(f"stopped after {unit}")
    return callback


def saved_tensors(pipe, path):
    tfmq.save(pipe, path)
    return load_file(str(path / TENSOR_FILE))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tiny_qdiff(), progress=False, work_dir=out)
    return pipe, saved_tensors(pipe, out / "ckpt")


def assert_same(tensors_a, tensors_b):
    assert tensors_a.keys() == tensors_b.keys()
    different = [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])]
    assert not different, different[:5]


@pytest.mark.parametrize("phase, after", [("weights", 5), ("act", 3)])
def test_resume_gives_the_uninterrupted_checkpoint(tmp_path, uninterrupted, phase, after):
    work = tmp_path / "run"
    with pytest.raises(Interrupt):
        tfmq.quantize(tiny_ddpm_pipeline(), tiny_qdiff(), progress=False, work_dir=work,
                      on_unit=interrupt_after(after, phase))
    manifest = json.loads((work / PROGRESS_DIR / MANIFEST).read_text())
    done = [k for k in manifest["done"] if k.startswith(phase + ":")]
    assert len(done) == after                                       # nothing of the finished units lost
    ran = []
    pipe = tiny_ddpm_pipeline()                                     # a fresh process would load it anew
    tfmq.quantize(pipe, tiny_qdiff(), progress=False, work_dir=work, resume=True,
                  on_unit=lambda p, u, s: ran.append(f"{p}:{u}"))
    assert not set(ran) & set(manifest["done"])                     # finished units were not redone
    assert_same(saved_tensors(pipe, tmp_path / "ckpt"), uninterrupted[1])
    info = pipe.unet.tfmq_info
    restored = [u for u, r in info["reconstruction"].items() if r.get("restored")]
    assert len(restored) == (after if phase == "weights" else len(info["reconstruction"]))
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 800])
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t).sample, uninterrupted[0].unet(x, t).sample)


def test_the_comparison_is_sensitive(tmp_path, uninterrupted):
    """Another seed gives another checkpoint: equality above is not vacuous."""
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tiny_qdiff(seed=1), progress=False)
    other = saved_tensors(pipe, tmp_path / "ckpt")
    assert any(not torch.equal(other[k], uninterrupted[1][k]) for k in other)


def test_resume_refuses_another_config_or_model(tmp_path):
    work = tmp_path / "run"
    with pytest.raises(Interrupt):
        tfmq.quantize(tiny_ddpm_pipeline(), tiny_qdiff(), progress=False, work_dir=work,
                      on_unit=interrupt_after(2))
    with pytest.raises(ResumeError, match="another config.*recon_iters"):
        tfmq.quantize(tiny_ddpm_pipeline(), tiny_qdiff(recon_iters=16), progress=False, work_dir=work,
                      resume=True)
    with pytest.raises(ResumeError, match="another model"):
        tfmq.quantize(tiny_ddpm_pipeline(seed=3), tiny_qdiff(), progress=False, work_dir=work, resume=True)


def test_fresh_run_discards_old_progress_and_resume_needs_work_dir(tmp_path):
    work = tmp_path / "run"
    with pytest.raises(Interrupt):
        tfmq.quantize(tiny_ddpm_pipeline(), tiny_qdiff(), progress=False, work_dir=work,
                      on_unit=interrupt_after(2))
    ran = []
    tfmq.quantize(tiny_ddpm_pipeline(), tiny_qdiff(recon_units=["conv_out"], act_learn_iters=0),
                  progress=False, work_dir=work, on_unit=lambda p, u, s: ran.append(u))
    assert ran == ["conv_out"]                                       # without resume: a new run
    manifest = json.loads((work / PROGRESS_DIR / MANIFEST).read_text())
    assert list(manifest["done"]) == ["weights:conv_out"]
    with pytest.raises(ValueError, match="work_dir"):
        tfmq.quantize(tiny_ddpm_pipeline(), tiny_qdiff(), progress=False, resume=True)
    # resume in a folder without progress simply starts
    pipe = tiny_ddpm_pipeline()
    tfmq.quantize(pipe, tiny_qdiff(recon_units=["conv_out"], act_learn_iters=0), progress=False,
                  work_dir=tmp_path / "empty", resume=True)
    assert list(pipe.unet.tfmq_info["reconstruction"]) == ["conv_out"]
