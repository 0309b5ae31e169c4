"""Calibration data in one pass: O(T), not the reference code's O(T^2).

The FP pipeline's sampler runs over N trajectories once; at every step the denoiser's inputs
(``x_t``, ``t`` and the conditioning, guidance batch included) are recorded. The data stay in
memory up to a budget, beyond which each step is spilled to a safetensors file on disk.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .. import distributed
from ..models.adapter import get_denoiser
from ..sampling import Conditioning, SamplerConfig, build_conditioning, denoise, select_rows


@dataclass
class CalibrationData:
    """Denoiser inputs per sampling step.

    ``step(i)`` maps ``sample`` / ``timestep`` and the conditioning inputs (``class_labels``,
    ``encoder_hidden_states``, ... as :class:`~tfmq.models.base.Conditioning` names them) to tensors whose first dimension is the number of recorded denoiser rows at step ``i``
    (N, or 2N with guidance). A step is stored as chunks (one per sampling batch); chunks
    spilled to disk are loaded on access.
    """
    sampler: SamplerConfig
    timesteps: list[int]
    num_trajectories: int
    chunks: list[list[dict[str, torch.Tensor] | Path]] = field(default_factory=list)
    spill_dir: Path | None = None

    def __len__(self) -> int:
        return len(self.chunks)

    def step(self, i: int) -> dict[str, torch.Tensor]:
        parts = [load_file(str(c)) if isinstance(c, Path) else c for c in self.chunks[i]]
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    @property
    def spilled(self) -> bool:
        return any(isinstance(c, Path) for chunks in self.chunks for c in chunks)

    def rows(self, i: int) -> int:
        """Rows of step ``i``, read from the shapes (a spilled step is not loaded)."""
        n = 0
        for c in self.chunks[i]:
            if isinstance(c, Path):
                with safe_open(str(c), "pt") as f:
                    n += f.get_slice("sample").get_shape()[0]
            else:
                n += c["sample"].shape[0]
        return n

    def batch(self, step_indices, rows: int | None = None, generator: torch.Generator | None = None,
              device="cpu") -> dict[str, torch.Tensor]:
        """Concatenate the data of several steps (optionally ``rows`` random rows of each)."""
        parts = []
        for i in step_indices:
            d = self.step(i)
            if rows is not None and rows < d["sample"].shape[0]:
                idx = torch.randperm(d["sample"].shape[0], generator=generator)[:rows]
                d = {k: v[idx] for k, v in d.items()}
            parts.append(d)
        return {k: torch.cat([p[k] for p in parts]).to(device) for k in parts[0]}

    def nbytes(self) -> int:
        return sum(sum(v.numel() * v.element_size() for v in self.step(i).values()) for i in range(len(self)))

    def cleanup(self) -> None:
        """Remove spilled files."""
        if self.spill_dir is not None and self.spill_dir.exists():
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def collect_calibration_data(pipe, sampler: SamplerConfig, num_trajectories: int, batch_size: int = 32,
                             seed: int = 0, class_labels=None, prompts=None,
                             memory_budget_bytes: int = 4 << 30, spill_dir: str | Path | None = None,
                             progress: bool = True) -> CalibrationData:
    """Run the FP sampler once over ``num_trajectories`` and record every step's denoiser inputs.

    Each trajectory contributes exactly one record to every step. Seeded like sampling (sample i
    starts from seed + i), so the same arguments give the same data.

    Under several processes (:mod:`tfmq.distributed`) each rank runs its share of the
    trajectories (whole sampling batches) and the steps' rows are gathered in global order: every
    rank ends with the same data as one process would.
    """
    if num_trajectories < 1:
        raise ValueError(f"calibration size must be >= 1, got {num_trajectories}")
    denoiser = get_denoiser(pipe)
    device = next(denoiser.parameters()).device
    cond: Conditioning = build_conditioning(pipe, num_trajectories, seed, class_labels, prompts,
                                            sampler.guidance_scale, device)
    data = CalibrationData(sampler=sampler, timesteps=[], num_trajectories=num_trajectories)
    per_step: dict[int, list] = {}
    timesteps: dict[int, int] = {}
    used = 0

    def record(i: int, t: int, model_in: torch.Tensor, kwargs: dict) -> None:
        row = {"sample": model_in.detach().cpu(),
               "timestep": torch.full((model_in.shape[0],), t, dtype=torch.long)}
        row.update({k: v.detach().cpu() for k, v in kwargs.items()})
        keep(i, t, row)

    def keep(i: int, t: int, row: dict) -> None:
        nonlocal used
        size = sum(v.numel() * v.element_size() for v in row.values())
        chunks = per_step.setdefault(i, [])
        if used + size > memory_budget_bytes:
            if data.spill_dir is None:
                data.spill_dir = Path(tempfile.mkdtemp(prefix="tfmq-calib-", dir=spill_dir))
            path = data.spill_dir / f"step{i:05d}_chunk{len(chunks):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in row.items()}, str(path))
            chunks.append(path)
        else:
            used += size
            chunks.append(row)
        timesteps[i] = t

    part = distributed.shard(num_trajectories, align=batch_size)      # all of them in one process
    if len(part):                      # a process may have no share (more processes than batches)
        denoise(pipe, sampler, len(part), batch_size, seed, select_rows(cond, slice(part.start, part.stop)),
                on_step=record, progress=progress, desc="calibration data", first_index=part.start)
    if distributed.is_distributed():
        used = 0                          # the budget counts the gathered rows
        _gather_steps(data, per_step, timesteps, keep, sampler)
    data.timesteps = [timesteps[i] for i in sorted(timesteps)]
    data.chunks = [per_step[i] for i in sorted(per_step)]
    return data


def _gather_steps(data: CalibrationData, per_step: dict, timesteps: dict, keep, sampler) -> None:
    """Replace this rank's rows of every step by all ranks' rows, in rank (= global) order."""
    local = CalibrationData(sampler, [], 0, [per_step[i] for i in sorted(per_step)], data.spill_dir)
    n_steps = max(distributed.gather_objects(len(local)))
    keys = sorted(set().union(*distributed.gather_objects(sorted(local.step(0)) if len(local) else [])))
    ts = distributed.gather_objects([timesteps[i] for i in sorted(timesteps)])
    ts = next(t for t in ts if len(t) == n_steps)
    rows = [local.step(i) if len(local) else {} for i in range(n_steps)]
    local.cleanup()                       # this rank's spilled files (if any): read above
    per_step.clear()
    timesteps.clear()
    data.spill_dir = None
    for i in range(n_steps):
        empty = torch.zeros(0)
        keep(i, ts[i], {k: distributed.gather_rows(rows[i].get(k, empty)) for k in keys})
        rows[i] = None
