"""Bad input and misuse (issue 14): each refused with a clear error before any work, nothing lost.

Tiny models from conftest have RANDOM weights (plumbing only).
"""

import pytest
import torch

import tfmq
from tfmq.api import QuantizedSaveError
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
