"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU), and in one
process for the reference values: writes what it computed to ``OUT/rank<R>.pt``.

Checks, each computing the same thing whatever the number of processes:

* ``gather``: :func:`tfmq.distributed.gather_rows` of uneven per-rank blocks (one rank may hold
  none) gives the global rows in order;
* ``features``: the evaluation's Inception-feature path (:meth:`_Metrics._features`) with a
  stand-in network whose features are a fixed function of each image: gathered in sample order;
* ``grads``: the data-parallel reconstruction step (:func:`tfmq.calib.reconstruction.run_units`):
  each rank's share of the batch loss, gradients of AdaRound's alphas summed over the ranks.
"""

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tfmq import distributed  # noqa: E402


class FakeNet:
    """Features = per-image statistics (a stand-in for the Inception network)."""

    def extract(self, images, spatial=False):
        from tfmq.eval.inception import InceptionOutput
        x = np.asarray(images, dtype=np.float64).reshape(len(images), -1)
        pool = np.stack([x.mean(1), x.std(1), x[:, 0], np.arange(len(x)) * 0.0], 1) if len(x) else np.zeros((0, 4))
        return InceptionOutput(pool, pool[:, :2] * 2 if spatial else None)


def check_gather() -> dict:
    r = distributed.rank()
    block = torch.arange(r * 10, r * 10 + (3 if r == 0 else 0 if r == 1 else 2), dtype=torch.float64)
    out = distributed.gather_rows(block.reshape(-1, 1).repeat(1, 2))
    arr = distributed.gather_rows(np.full((r + 1, 3), r, dtype=np.uint8))
    return {"tensor": out, "array": torch.from_numpy(arr)}


def check_features() -> dict:
    from tfmq.eval.evaluate import EvalSettings, _Metrics
    images = np.random.default_rng(0).integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    m = _Metrics(EvalSettings(batch_size=2, reference=None), progress=False)
    m.net = FakeNet()
    feats = m._features(images, spatial=True)
    return {"pool": torch.from_numpy(feats.pool), "spatial": torch.from_numpy(feats.spatial)}


def check_grads() -> dict:
    from conftest import tiny_ddpm_pipeline
    from tfmq.calib.data import collect_calibration_data
    from tfmq.calib.reconstruction import (CalibRows, UnitSettings, WeightRounding, attach_rounding,
                                           calibration_rows, run_units)
    from tfmq.calib.ranges import init_weight_ranges
    from tfmq.models.adapter import get_denoiser
    from tfmq.models.units import find_units, order_units
    from tfmq.quant.model import WrapSpec, wrap_denoiser
    from tfmq.sampling import SamplerConfig

    pipe = tiny_ddpm_pipeline()
    data = collect_calibration_data(pipe, SamplerConfig("ddim", 3), 6, batch_size=2, progress=False)
    unet = get_denoiser(pipe)
    wrap_denoiser(unet, WrapSpec(wbits=4, abits=32, softmax_bits=32))
    init_weight_ranges(unet, "minmax", progress=False)
    rows = calibration_rows(data, [0, 1, 2], None, 0, 4, torch.device("cpu"), torch.float32)
    assert isinstance(rows, CalibRows)
    units = order_units(unet, find_units(unet), rows.example())[:3]

    class OneStep(WeightRounding):
        """The data-parallel loss and its summed gradients, no optimiser step."""

        def run(self, unit, loss_fn, settings):
            layers = list(self.layers(unit).values())
            roundings = attach_rounding(layers)
            grads = []
            for it in range(2):
                for r in roundings:
                    r.alpha.grad = None
                loss = loss_fn(it)
                if loss.requires_grad or not distributed.is_distributed():
                    loss.backward()
                distributed.sync_grads_([r.alpha for r in roundings])
                grads.append(torch.cat([r.alpha.grad.reshape(-1) for r in roundings]).clone())
                loss_total = distributed.all_reduce_float(float(loss.detach()))
            for r in roundings:
                r.hard = True
                r.alpha.requires_grad_(False)
            return {"grads": torch.stack(grads), "loss": loss_total}

    settings = UnitSettings(iters=2, batch_size=5, lr=1e-3, seed=3, progress=False)
    results = run_units(unet, units, rows, OneStep(), settings)
    out = {}
    for name, stats in results.items():
        out[f"{name}.grads"] = stats["grads"]
        out[f"{name}.loss"] = torch.tensor(stats["loss"], dtype=torch.float64)
        out[f"{name}.error_before"] = torch.tensor(stats["error_before"], dtype=torch.float64)
    return out


def main(out: str) -> None:
    torch.set_num_threads(1)
    distributed.setup("cpu")
    result = {}
    for name, fn in (("gather", check_gather), ("features", check_features), ("grads", check_grads)):
        result.update({f"{name}.{k}": v for k, v in fn().items()})
    torch.save(result, Path(out) / f"rank{distributed.rank()}.pt")
    distributed.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
