"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (gloo, CPU): a qdiff
calibration of the tiny test UNet (RANDOM weights) with its progress in ``WORK``, either stopped
on every rank after the 5th finished unit (``interrupt``) or continued from it (``resume``); the
resumed run saves its checkpoint to ``WORK/ckpt``. ``PARALLEL``: QuantConfig.recon_parallel.

    python -m torch.distributed.run --standalone --nproc_per_node 2 dist_resume_worker.py WORK MODE PARALLEL
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import tfmq  # noqa: E402
from tfmq import distributed  # noqa: E402

from conftest import tiny_ddpm_pipeline, tiny_qdiff  # noqa: E402

RESUME_SETTINGS = dict(recon_iters=15, act_learn_iters=10, recon_batch_size=4)


class Stop(Exception):
    """Stands for a killed run."""


def main(work: str, mode: str, parallel: str) -> None:
    distributed.setup("cpu")
    count = [0]

    def stop_after_five(phase, unit, stats):
        count[0] += 1
        if count[0] == 5:
            raise Stop(unit)

    pipe = tiny_ddpm_pipeline()
    config = tiny_qdiff(**RESUME_SETTINGS, recon_parallel=parallel)
    try:
        tfmq.quantize(pipe, config, progress=False, work_dir=work, resume=mode == "resume",
                      on_unit=stop_after_five if mode == "interrupt" else None)
    except Stop:
        return                                  # every rank stops after the same unit
    if distributed.is_main():
        tfmq.save(pipe, Path(work) / "ckpt")
    distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:4])
