"""Non-finite values stop calibration (and checkpoint writing) before they spread.

A NaN / inf in one FP weight, or an FP model whose output is not finite at some time step (e.g. a
Fourier time embedding at t = 0 takes log(0)), would calibrate into non-finite scales and
zero-points and black images without any error. These checks run before calibration (weights),
while the calibration data are collected (the FP model's outputs), after calibration (every
quantization parameter) and before a checkpoint is written (every tensor).
"""

from __future__ import annotations

import torch
from torch import nn


class NonFiniteError(ValueError):
    """A weight, model output or quantization parameter is NaN or infinite."""


def _names(names: list[str], limit: int = 5) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@torch.no_grad()
def non_finite_tensors(tensors) -> list[str]:
    """Names of the floating-point tensors of ``tensors`` (name -> tensor pairs) that hold a NaN
    or an infinity."""
    return [name for name, t in tensors if t is not None and t.is_floating_point()
            and not bool(torch.isfinite(t).all())]


def check_finite_weights(denoiser: nn.Module) -> None:
    """Raise :class:`NonFiniteError` naming the FP denoiser's parameters / buffers that are not
    finite (checked before any calibration work)."""
    bad = non_finite_tensors(list(denoiser.named_parameters()) + list(denoiser.named_buffers()))
    if bad:
        raise NonFiniteError(f"the model's weights hold NaN or infinite values in {len(bad)} tensor(s) "
                             f"({_names(bad)}): it cannot be calibrated; check the model files")


class FiniteOutputWatch:
    """Context manager: records whether every output of ``denoiser`` is finite while it runs
    (e.g. while the calibration data are collected); :meth:`check` then raises
    :class:`NonFiniteError` naming the time steps at which an output was not.

    The flags stay on the device until :meth:`check` (no synchronisation per call).
    """

    def __init__(self, denoiser: nn.Module, what: str = "the full-precision model's output"):
        self.denoiser = denoiser
        self.what = what
        self.flags: list[torch.Tensor] = []
        self.timesteps: list[torch.Tensor] = []
        self._handle = None

    def _hook(self, module, args, kwargs, output):
        out = getattr(output, "sample", None)
        if out is None:
            out = output[0] if isinstance(output, (tuple, list)) else output
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        with torch.no_grad():
            self.flags.append(torch.isfinite(out).flatten(1).all(dim=1))
            t = torch.as_tensor(t, device=out.device).reshape(-1)
            self.timesteps.append(t.expand(out.shape[0]) if t.numel() == 1 else t)

    def __enter__(self) -> "FiniteOutputWatch":
        self._handle = self.denoiser.register_forward_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._handle.remove()

    def check(self) -> None:
        """Raise :class:`NonFiniteError` if any watched output was NaN or infinite."""
        if not self.flags:
            return
        ok = torch.cat(self.flags)
        if bool(ok.all()):
            return
        steps = sorted({int(t) for t in torch.cat(self.timesteps)[~ok].cpu().tolist()}, reverse=True)
        raise NonFiniteError(
            f"{self.what} is NaN or infinite at timestep(s) {_names([str(t) for t in steps])} of the "
            f"calibration sampler: calibrating on it would give non-finite quantization parameters. "
            f"Check the model (e.g. its time embedding at t=0) or use another sampler / step count")


def check_finite_quant_params(denoiser: nn.Module) -> None:
    """Raise :class:`NonFiniteError` if any quantizer's parameter (scale, zero-point, per-step
    sets) is not finite."""
    from .quant.quantizer import UniformQuantizer
    pairs = []
    for name, m in denoiser.named_modules():
        if isinstance(m, UniformQuantizer):
            own = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
            pairs += [(f"{name}.{attr}", t) for attr, t in own]
    bad = non_finite_tensors(pairs)
    if bad:
        raise NonFiniteError(f"calibration produced {len(bad)} non-finite quantization parameter(s) "
                             f"({_names(bad)}); nothing is written")


def check_finite_checkpoint(tensors: dict[str, torch.Tensor]) -> None:
    """Raise :class:`NonFiniteError` before a checkpoint with a non-finite tensor is written."""
    bad = non_finite_tensors(sorted(tensors.items()))
    if bad:
        raise NonFiniteError(f"refusing to write a checkpoint with {len(bad)} non-finite tensor(s) "
                             f"({_names(bad)})")
