"""Block reconstruction (BRECQ) with AdaRound, and the per-unit loop it shares with activation
step-size learning.

For each reconstruction unit (see :mod:`tfmq.models.units`), in network order:

1. the unit's inputs are cached from the *already quantized* network (units before it carry
   their learned rounding), with a forward pre-hook that stops the forward pass right there;
2. its targets are cached from the *FP* network (the same model with every quantizer
   bypassed: no second copy of the denoiser is kept);
3. the unit's learnable state is optimised on random batches of those rows to minimise
   ``||f_fp(x_fp) - f_q(x_q)||^2`` (squared error summed over channels, mean over the rest).

Settings and their cost (``QuantConfig`` fields):

  ``recon_iters``       iterations per unit (project default 2,000; the references use 20,000).
                        Cost per unit ~ iters x (forward + backward of the unit at the batch
                        size): on the GPU the small units are launch-bound (the references report
                        ~3 ms an iteration on DDIM CIFAR-10), so time scales with iters.
  ``recon_batch_size``  rows per iteration (32; the references use 32, 8 for Stable Diffusion).
  ``recon_lr``          Adam learning rate on AdaRound's ``alpha`` (project default 5e-3; the
                        references use 1e-3 with 20,000 iterations). ``alpha`` starts within about
                        +-2.4 and must pass that bound for an offset to become exactly 0 or 1, and
                        Adam moves it by about ``lr`` an iteration, so ``lr x iters`` of roughly 10
                        is needed. Measured on the random-weight tiny test UNet (W4, 500 it/unit):
                        lr 1e-3 -> 18% mean unit-error reduction, 85% of offsets still soft at the
                        end; 1e-2 -> 38%, 4% soft; 2e-2 -> 42%, 0.1% soft.
  ``recon_units``       shell patterns of the units to reconstruct (None = all).
  ``recon_rows``        at most this many calibration rows are cached per unit (None = all);
                        caching costs two partial forward passes over them per unit and memory
                        of (input + output) x rows, on the GPU while under ``recon_cache_gb``.
  ``recon_bf16``        bf16 autocast of the unit forward on CUDA.
  ``recon_cache_gb``    GPU memory for cached rows (default: half the free memory).
  ``recon_capture_rows`` rows per forward pass when caching a unit's inputs / outputs (default:
                        :func:`capture_rows`: one calibration batch on the CPU; on CUDA whole
                        calibration batches up to about 2^19 sample values, at most 256 rows, as
                        the two partial forward passes of a unit are launch-bound in small batches:
                        on an H100 they were three quarters of Q-Diffusion's per-unit time).

Each unit's statistics hold ``seconds`` (all of it), ``optimize_s`` (the iterations alone),
``loop`` (how the iterations ran: ``graph``, ``eager`` or ``eager (data-parallel)``) and the
error on fixed rows before / after (``error_before`` / ``error_after``).

The iterations run in :mod:`tfmq.calib.loop`'s ``StepLoop`` (no host synchronisation, a CUDA
graph on CUDA). Under several processes (:mod:`tfmq.distributed`) each rank caches its block of
a unit's rows (whole capture passes, so every row is computed in the same pass as in one
process); then, by ``recon_parallel`` (:func:`parallel_mode`):

* ``replicate`` (``auto`` where the loop is a CUDA graph): the blocks are gathered and every rank
  runs the whole loop on all rows, as one process does; rank 0's result is then copied to the
  others (so no rank drifts on a non-deterministic kernel). The result equals one process's.
  The iterations are not faster, the caching passes are split: on a GPU the iterations of a
  small unit are bound by kernel count, not by rows, so splitting their rows saves nothing.
* ``rows`` (``auto`` on the CPU): a data-parallel eager loop: every rank draws the same batch
  table over all rows, computes the rows of each batch it holds (weighted by their share of the
  batch), and the gradients are summed over the ranks (the loop's ``grad_hook``) before the Adam
  step; AdaRound's regulariser is counted on rank 0 only. The result equals one process's up to
  float sum order.
* ``batch``: the rows are gathered as under ``replicate``; every rank draws the same batch table
  and computes a fixed slice of the columns of every batch (rank r of W: the r-th block of
  ``batch_size / W`` columns, weighted by its share), so every iteration has the same shapes and
  the loop, with its gradient all-reduce (NCCL), is captured in a CUDA graph. It pays where an
  iteration is bound by arithmetic (large units), not by kernel count. The result equals one
  process's up to float sum order.

``RECON_PRESETS["reference"]`` holds the reference values (20,000 iterations a unit, batch 32,
5,000 activation-learning iterations at lr 4e-4).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..hooks import temporary_hooks
from ..choices import RECON_PARALLEL_MODES
from ..models.adapter import call_denoiser
from ..models.units import Unit, find_units, order_units, select_units
from ..quant.adaround import AdaRound, pack_mask, unpack_mask
from ..quant.layers import GroupActQuantizer, QuantLayer
from ..quant.model import fixed_weights, multi_set_quantizers, quant_state, row_steps, set_quant_state
from .loop import at, batch_indices, beta_table, run_steps, StepLoop, use_graphs

#: Named sets of reconstruction settings (QuantConfig fields).
RECON_PRESETS: dict[str, dict] = {
    # the values of the Q-Diffusion / TFMQ-DM reference code (CIFAR-10 / LDM; SD uses batch 8)
    "reference": {"recon_iters": 20000, "recon_batch_size": 32, "recon_lr": 1e-3,
                  "act_learn_iters": 5000, "act_learn_lr": 4e-4, "tiar_iters": 20000},
    # the project's defaults: 10x fewer iterations, with a step large enough for alpha to reach
    # hard 0 / 1 offsets within them (see the module docstring)
    "default": {"recon_iters": 2000, "recon_batch_size": 32, "recon_lr": 5e-3,
                "act_learn_iters": 500, "act_learn_lr": 4e-4, "tiar_iters": 2000},
}

EVAL_ROWS = 256          # rows on which the per-unit error before / after is measured


def preset(name: str) -> dict:
    """The config values of a reconstruction preset."""
    try:
        return dict(RECON_PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown reconstruction preset {name!r}; choose from {', '.join(RECON_PRESETS)}") from None


# ---- loss and AdaRound optimisation ------------------------------------------------------
def recon_loss(out: torch.Tensor, target: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``|out - target|^p`` summed over channels, averaged over everything else. Channels are
    dimension 1 of NCHW / [N, C] tensors and the last dimension of token tensors [N, L, C]."""
    diff = (out.float() - target.float()).abs()
    err = diff.square() if p == 2 else diff.pow(p)
    ch = -1 if out.dim() == 3 else 1
    return err.sum(dim=ch).mean() if out.dim() > 1 else err.mean()


def beta_at(it: int, iters: int, warmup: float, beta: tuple[float, float]) -> float | None:
    """Regulariser exponent at iteration ``it``: None during warm-up (no rounding loss), then a
    linear decay from ``beta[0]`` to ``beta[1]``."""
    start = int(warmup * iters)
    if it < start:
        return None
    t = (it - start) / max(1, iters - start)
    return beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - t)


def attach_rounding(layers: list[QuantLayer]) -> list[AdaRound]:
    """Give each layer an AdaRound module (kept if it already has one) in soft mode."""
    out = []
    for layer in layers:
        if layer.weight_quantizer is None:
            raise ValueError("AdaRound needs a layer with a quantized weight")
        if not isinstance(layer.rounding, AdaRound):
            layer.rounding = AdaRound(layer.weight, layer.weight_quantizer)
        layer.rounding.hard = False
        out.append(layer.rounding)
    return out


def optimize_rounding(layers: list[QuantLayer], loss_fn: Callable[[torch.Tensor], torch.Tensor], iters: int,
                      lr: float = 1e-3, reg_weight: float = 0.01, warmup: float = 0.2,
                      beta: tuple[float, float] = (20.0, 2.0), desc: str = "adaround",
                      progress: bool = True, graphs: bool | None = False,
                      data_parallel: bool = False) -> dict:
    """Learn the rounding of ``layers``' weights.

    Attaches :class:`AdaRound` to each layer, then runs ``iters`` Adam steps on the ``alpha``s
    only, minimising ``loss_fn(it) + reg_weight * sum(regularizer(beta))`` with ``beta``
    decaying linearly ``beta[0] -> beta[1]`` after a warm-up of ``warmup * iters`` iterations
    without the rounding term. Rounding is hard at the end.

    ``loss_fn(it)`` gets the iteration as a 0-d long tensor on the layers' device (see
    :mod:`tfmq.calib.loop`: the loop never synchronises with the device, and with
    ``graphs=True``, or None on CUDA, one iteration is captured in a CUDA graph and replayed, so
    ``loss_fn`` must then compute from device tensors only).

    Returns ``initial_loss`` / ``final_loss`` (the reconstruction term at the first / last
    iteration), ``undecided``: the fraction of weights whose soft offset is not exactly 0 or 1
    at the end (0 means hard rounding equals the soft result), and ``loop`` (graph or eager).

    ``data_parallel`` (under several processes, :mod:`tfmq.distributed`): ``loss_fn`` returns this
    rank's share of the batch loss (see :func:`run_units`; a rank without rows of the batch a
    zero tensor without a graph); the regulariser is counted once (rank 0) and the gradients are
    summed over the ranks before each Adam step (the loop's ``grad_hook``), so every rank takes
    the same step, equal to one process's up to the order of the float sums (``loop``: ``...
    (data-parallel)``); the losses reported are the ranks' sums.
    """
    if iters < 0:
        raise ValueError(f"iterations must be >= 0, got {iters}")
    roundings = attach_rounding(layers)
    stats = {"iters": iters, "initial_loss": None, "final_loss": None}
    if iters > 0 and roundings:
        device = roundings[0].alpha.device
        split = data_parallel and distributed.is_distributed()
        captured = use_graphs(graphs, device)   # "rows" sets graphs=False; "batch" captures NCCL
        on, betas = beta_table(iters, warmup, beta)
        coef = (on * reg_weight).to(device)          # 0 during the warm-up: no rounding loss
        betas = betas.to(device)
        with_reg = not split or distributed.is_main()   # data-parallel: the regulariser once

        def step_loss(it):
            rec = loss_fn(it)
            if not with_reg:
                return rec, rec
            reg = sum(r.regularizer(at(betas, it)) for r in roundings)
            return rec + at(coef, it) * reg, rec

        bar = tqdm(total=iters, desc=desc, disable=not progress, leave=False)
        with contextlib.ExitStack() as stack:
            for layer, r in zip(layers, roundings):
                stack.enter_context(r.fixed_grid(layer.weight, layer.weight_quantizer))
            for r in roundings:
                r.alpha.requires_grad_(True)
            loop = StepLoop([r.alpha for r in roundings], step_loss,
                            torch.full((iters,), float(lr), dtype=torch.float64),
                            grad_hook=sum_grads_over_ranks if split else None)
            stats["loop"] = run_steps(loop, captured, lambda n: bar.update(n - bar.n),
                                      report_every=max(1, iters // 100))
        stats["initial_loss"], stats["final_loss"] = loop_losses(loop, split)
        if split:
            stats["loop"] = f"{stats['loop']} (data-parallel)"
        bar.set_postfix(loss=f"{stats['final_loss']:.4g}")
        bar.close()
    with torch.no_grad():
        total = sum(r.alpha.numel() for r in roundings)
        soft = int(sum(((r.h() > 0) & (r.h() < 1)).sum() for r in roundings)) if roundings else 0
    stats["undecided"] = soft / total if total else 0.0
    for r in roundings:
        r.hard = True
        r.alpha.requires_grad_(False)
    return stats


def sum_grads_over_ranks(grads: list[torch.Tensor]) -> list[torch.Tensor]:
    """A data-parallel loop's ``grad_hook`` (:class:`~tfmq.calib.loop.StepLoop`): the gradients
    summed over the ranks (every rank gets the same sums; a no-op in one process)."""
    grads = [g.clone(memory_format=torch.contiguous_format) for g in grads]   # writable, dense
    distributed.all_reduce_sum_(grads)
    return grads


def loop_losses(loop: StepLoop, split: bool) -> tuple[float, float]:
    """The first and last iterations' logged losses of a finished loop (the one synchronisation
    of the loop); data-parallel (``split``): the ranks' shares summed, i.e. the batch's loss."""
    losses = loop.losses.cpu()
    first, last = float(losses[0]), float(losses[loop.iters - 1])
    if split:
        first, last = distributed.all_reduce_float(first), distributed.all_reduce_float(last)
    return first, last


# ---- calibration rows -------------------------------------------------------------------
def calibration_steps(num_steps: int, pick: int | None) -> list[int]:
    """``pick`` step indices spread uniformly over ``num_steps`` (Q-Diffusion's time-step-aware
    calibration, its ``--cali_st``), first and last included; all steps when ``pick`` is None or
    not smaller."""
    if pick is None or pick >= num_steps:
        return list(range(num_steps))
    if pick < 1:
        raise ValueError(f"number of calibration steps must be >= 1, got {pick}")
    if pick == 1:
        return [num_steps // 2]
    return sorted({round(i * (num_steps - 1) / (pick - 1)) for i in range(pick)})


def reconstruction_steps(config, num_steps: int) -> list[int]:
    """Steps whose data feed reconstruction: ``calib_steps`` spread uniformly when set
    (Q-Diffusion), else every ``interval_length``-th step (TFMQ-DM; 1 = every step)."""
    if config.calib_steps is not None:
        return calibration_steps(num_steps, config.calib_steps)
    return list(range(0, num_steps, max(1, getattr(config, "interval_length", 1))))


class CalibRows:
    """Denoiser inputs (``sample``, ``timestep``, conditioning) of the rows used for
    reconstruction, kept on the CPU, served in batches on the model's device / dtype.
    ``steps`` holds each row's sampling-step index (the parameter set of per-step quantizers)."""

    def __init__(self, inputs: dict[str, torch.Tensor], batch_size: int, device, dtype,
                 steps: torch.Tensor | None = None, capture_size: int | None = None):
        self.inputs = inputs
        self.batch_size = batch_size
        self.capture_size = batch_size if capture_size is None else capture_size
        if self.capture_size < 1:
            raise ValueError(f"capture_size must be >= 1, got {capture_size!r}")
        self.device = device
        self.dtype = dtype
        if steps is not None and steps.shape != (len(self),):
            raise ValueError(f"steps must hold one index per row ({len(self)}), got {tuple(steps.shape)}")
        self.steps = steps

    def __len__(self) -> int:
        return self.inputs["sample"].shape[0]

    def _to(self, v: torch.Tensor) -> torch.Tensor:
        if v.is_floating_point():
            return v.to(self.device, self.dtype)
        return v.to(self.device)

    def batches(self, size: int | None = None):
        """``(batch, steps)`` of ``size`` rows (default ``batch_size``) in row order: the inputs on
        the model's device / dtype and the rows' step indices (None without ``steps``)."""
        size = self.batch_size if size is None else size
        for i in range(0, len(self), size):
            sl = slice(i, i + size)
            yield ({k: self._to(v[sl]) for k, v in self.inputs.items()},
                   None if self.steps is None else self.steps[sl])

    def example(self) -> dict[str, torch.Tensor]:
        return {k: self._to(v[:1]) for k, v in self.inputs.items()}

    def subset(self, rows: range) -> "CalibRows":
        """Rows ``rows`` (a contiguous range) only: one process's share."""
        sl = slice(rows.start, rows.stop)
        return CalibRows({k: v[sl] for k, v in self.inputs.items()}, self.batch_size, self.device,
                         self.dtype, None if self.steps is None else self.steps[sl], self.capture_size)


#: Sample values (rows x values a row) of one capture pass on CUDA by default.
CAPTURE_VALUES = 1 << 19
#: Most rows of one capture pass by default.
CAPTURE_MAX_ROWS = 256


def capture_rows(batch_size: int, sample_values: int, device, requested: int | None = None) -> int:
    """Rows per forward pass when caching a unit's inputs / outputs: ``requested`` if given;
    ``batch_size`` on the CPU (larger passes are not faster there); on CUDA as many whole batches
    as keep a pass under :data:`CAPTURE_VALUES` sample values and :data:`CAPTURE_MAX_ROWS` rows
    (at least one batch). Every row's forward is independent of its batch-mates, so this changes
    only how many rows share a launch."""
    if requested is not None:
        return requested
    if torch.device(device).type != "cuda":
        return batch_size
    rows = min(CAPTURE_MAX_ROWS, CAPTURE_VALUES // max(1, sample_values))
    return max(batch_size, rows // batch_size * batch_size)


def calibration_rows(data, steps: list[int], max_rows: int | None, seed: int, batch_size: int,
                     device, dtype, capture_size: int | None = None) -> CalibRows:
    """The rows of the chosen steps (all trajectories), at most ``max_rows`` of them (a seeded
    random subset, in original order), with each row's step index. ``capture_size``: rows per
    capture pass (None: :func:`capture_rows`'s default)."""
    inputs = data.batch(steps)
    n = inputs["sample"].shape[0]
    row_steps = torch.cat([torch.full((data.rows(s),), s, dtype=torch.long) for s in steps])
    if row_steps.shape[0] != n:
        raise RuntimeError("calibration data rows do not add up over the chosen steps")
    if max_rows is not None and max_rows < n:
        idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values
        inputs = {k: v[idx] for k, v in inputs.items()}
        row_steps = row_steps[idx]
    values = inputs["sample"][0].numel() if n else 1
    return CalibRows(inputs, batch_size, device, dtype, row_steps,
                     capture_rows(batch_size, values, device, capture_size))


# ---- caching unit inputs / outputs -------------------------------------------------------
class _Stop(Exception):
    """Raised by a capture hook to end the forward pass once the unit has been reached."""


class UnitTensors:
    """What a unit received (positional and keyword arguments) or returned, over all rows.

    Tensors whose first dimension is the batch are concatenated over batches ("row" values);
    everything else must be identical in every batch and is kept once ("static" values).
    """

    def __init__(self, name: str, budget_bytes: int, device):
        self.name = name
        self.budget = budget_bytes
        self.device = device            # where rows are kept (the model's device if they fit)
        self.kinds: dict = {}
        self.parts: dict = {}
        self.static: dict = {}
        self.rows = 0

    def add(self, values: dict, rows: int, total_rows: int) -> None:
        if not self.kinds:
            per_row = sum(v.numel() // max(1, rows) * v.element_size() for v in values.values()
                          if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows)
            if per_row * total_rows > self.budget:
                self.device = torch.device("cpu")
            for k, v in values.items():
                self.kinds[k] = "row" if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows else "static"
        for k, v in values.items():
            kind = self.kinds.get(k)
            if kind == "row":
                if not (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == rows):
                    raise RuntimeError(f"unit {self.name}: argument {k!r} changed shape between batches")
                self.parts.setdefault(k, []).append(v.detach().to(self.device).contiguous())
            elif kind == "static":
                if k not in self.static:
                    self.static[k] = v
                elif not _same(self.static[k], v):
                    raise RuntimeError(f"unit {self.name}: argument {k!r} differs between batches but "
                                       f"is not per-row; cannot cache it")
            else:
                raise RuntimeError(f"unit {self.name}: unexpected argument {k!r} in a later batch")
        self.rows += rows

    def finish(self) -> "UnitTensors":
        self.data = {k: torch.cat(v).contiguous() for k, v in self.parts.items()}
        self.parts = {}
        return self

    def gathered(self) -> "UnitTensors":
        """Every rank's rows concatenated in rank order (several processes; every rank must hold
        rows of the same kinds, and its static values must equal rank 0's); itself in one process."""
        if not distributed.is_distributed():
            return self
        kinds = distributed.gather_objects(self.kinds)
        if any(k != kinds[0] for k in kinds):
            raise RuntimeError(f"unit {self.name}: the ranks cached different arguments: {kinds}")
        self.data = {k: distributed.gather_rows(v) for k, v in self.data.items()}
        self.rows = sum(distributed.gather_objects(self.rows))
        return self

    def select(self, idx: torch.Tensor, device) -> dict:
        """Values for rows ``idx`` (row values indexed, static values as they are)."""
        out = dict(self.static)
        for k, v in self.data.items():
            out[k] = v.index_select(0, idx.to(v.device)).to(device, non_blocking=True)
        return out


def _same(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))
    try:
        return bool(a == b)
    except Exception:   # incomparable objects: treat as different
        return a is b


def _flatten_call(args: tuple, kwargs: dict) -> dict:
    values = {i: a for i, a in enumerate(args)}
    values.update(kwargs)
    return values


def _call_args(values: dict) -> tuple[tuple, dict]:
    pos = [values[i] for i in sorted(k for k in values if isinstance(k, int))]
    kw = {k: v for k, v in values.items() if not isinstance(k, int)}
    return tuple(pos), kw


def unit_output(out) -> torch.Tensor:
    """The main tensor of a module's output (tensor, tuple or diffusers output object)."""
    if torch.is_tensor(out):
        return out
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise TypeError(f"cannot take a tensor from a unit output of type {type(out).__name__}")


def _model_forward(model: nn.Module, batch: dict) -> None:
    call_denoiser(model, batch)


@torch.no_grad()
def capture(model: nn.Module, unit: Unit, rows: CalibRows, what: str, budget_bytes: int) -> UnitTensors:
    """Cache the unit's inputs (``what="input"``) or output (``"output"``) over all rows, under the
    model's current quantization state. The forward pass stops at the unit."""
    store = UnitTensors(unit.name, budget_bytes, rows.device)
    total = len(rows)

    if what == "input":
        def hook(module, args, kwargs):
            store.add(_flatten_call(args, kwargs), current[0], total)
            raise _Stop
        hooks = temporary_hooks([(unit.module, hook)], with_kwargs=True)
    elif what == "output":
        def hook(module, args, output):
            out = unit_output(output)
            store.add({"out": out}, out.shape[0], total)
            raise _Stop
        hooks = temporary_hooks([(unit.module, hook)], pre=False)
    else:
        raise ValueError(f"what must be 'input' or 'output', not {what!r}")
    current = [0]
    with hooks, fixed_weights(model):      # no weight changes while the rows run
        for batch, steps in rows.batches(rows.capture_size):
            current[0] = batch["sample"].shape[0]
            try:
                with row_steps(model, steps):
                    _model_forward(model, batch)
            except _Stop:
                continue
            raise RuntimeError(f"unit {unit.name} did not run in the forward pass")
    return store.finish()


# ---- the per-unit loop -------------------------------------------------------------------
@dataclass
class UnitSettings:
    """Settings of one pass over the units."""
    iters: int
    batch_size: int
    lr: float
    seed: int = 0
    bf16: bool = False
    cache_gb: float | None = None  # None: half the free GPU memory (CPU: no limit beyond RAM)
    p: float = 2.0                 # loss exponent during optimisation (2 = squared error)
    progress: bool = True
    graphs: bool | None = None     # capture each iteration in a CUDA graph (None: on CUDA)
    note: str | None = None        # how a unit's loop ran when not as asked (set per unit)
    data_parallel: bool = False    # the loss is this rank's share of the batch (set per unit)
    parallel: str = "auto"         # several processes: "replicate", "rows", "batch" or "auto" (parallel_mode)


def parallel_mode(requested: str, graphs: bool | None, device) -> str:
    """How the per-unit loops share work over several processes: ``"replicate"``, ``"rows"`` or
    ``"batch"`` (see the module docstring); ``"auto"`` is ``"replicate"`` where the loop runs as a CUDA graph
    (``graphs`` not False on a CUDA device) and ``"rows"`` elsewhere."""
    if requested not in RECON_PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {', '.join(RECON_PARALLEL_MODES)}, got {requested!r}")
    if requested != "auto":
        return requested
    return "replicate" if use_graphs(graphs, device) else "rows"


class UnitWork:
    """What a pass does to each unit; subclasses: weight rounding, activation steps."""
    phase = "unit"
    quant_state = (True, False)        # (weights, activations) of the quantized network

    def applies(self, unit: Unit) -> bool:
        raise NotImplementedError

    def run(self, unit: Unit, loss_fn, settings: UnitSettings) -> dict:
        raise NotImplementedError

    def state(self, unit: Unit) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def restore(self, unit: Unit, tensors: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class WeightRounding(UnitWork):
    """BRECQ weight reconstruction: AdaRound on the unit's weight-quantized layers."""
    phase = "weights"
    quant_state = (True, False)

    def __init__(self, reg_weight=0.01, warmup=0.2, beta=(20.0, 2.0), exclude=()):
        self.reg_weight, self.warmup, self.beta = reg_weight, warmup, tuple(beta)
        self.exclude = set(exclude)

    def layers(self, unit: Unit) -> dict[str, QuantLayer]:
        return {n: l for n, l in unit.weight_layers(self.exclude).items()
                if l.weight_quantizer.enabled and not l.frozen}

    def applies(self, unit: Unit) -> bool:
        return bool(self.layers(unit))

    def run(self, unit, loss_fn, settings):
        return optimize_rounding(list(self.layers(unit).values()), loss_fn, settings.iters, settings.lr,
                                 self.reg_weight, self.warmup, self.beta, desc=unit.name,
                                 progress=settings.progress, graphs=settings.graphs,
                                 data_parallel=settings.data_parallel)

    def state(self, unit):
        return {f"{n}.up": pack_mask(l.rounding.alpha >= 0) for n, l in self.layers(unit).items()}

    def restore(self, unit, tensors):
        layers = self.layers(unit)
        missing = [n for n in layers if f"{n}.up" not in tensors]
        if missing:
            raise RuntimeError(f"saved progress of unit {unit.name} lacks layers {missing[:3]}")
        for n, l in layers.items():
            attach_rounding([l])
            l.rounding.set_hard_offsets(unpack_mask(tensors[f"{n}.up"], l.weight.shape))
            l.rounding.alpha.requires_grad_(False)


def _autocast(settings: UnitSettings, device: torch.device, graphs: bool = False):
    if settings.bf16 and device.type == "cuda":
        # no cast cache inside a captured graph (torch's advice for autocast + CUDA graphs)
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=not graphs)
    return contextlib.nullcontext()


@torch.no_grad()
def unit_error(unit: Unit, inputs: UnitTensors, targets: UnitTensors, device, batch_size: int,
               steps: torch.Tensor | None = None, total_rows: int | None = None, offset: int = 0) -> float:
    """Mean squared error (summed over channels) of the unit on up to EVAL_ROWS fixed rows
    (``steps``: each row's step index, for per-step quantizers).

    Under several processes ``inputs`` / ``targets`` hold rows ``offset ..`` of ``total_rows``:
    each rank measures the fixed rows it holds and the sums are added over the ranks (every rank
    must call it)."""
    n = inputs.rows if total_rows is None else total_rows
    idx = torch.linspace(0, n - 1, min(n, EVAL_ROWS)).round().long().unique()
    local = idx if inputs.rows == n else idx[(idx >= offset) & (idx < offset + inputs.rows)]
    total = 0.0
    for i in range(0, len(local), batch_size):
        sel = local[i:i + batch_size]
        args, kw = _call_args(inputs.select(sel - offset, device))
        with row_steps(unit.module, None if steps is None else steps[sel]):
            out = unit_output(unit.module(*args, **kw))
        total += float(recon_loss(out, targets.select(sel - offset, device)["out"])) * len(sel)
    if total_rows is not None and distributed.is_distributed():
        total = distributed.all_reduce_float(total)
    return total / len(idx)


def _unit_loss(unit: Unit, inputs: UnitTensors, targets: UnitTensors, steps: torch.Tensor | None,
               gen: torch.Generator, settings: UnitSettings, device,
               shard: range | None = None, total_rows: int | None = None,
               columns: range | None = None) -> tuple[Callable, UnitSettings]:
    """The unit's loss as a function of the loop's iteration tensor, and the settings to run it
    with. Every iteration's batch rows are drawn here, up front, by the same calls of
    ``torch.randperm(rows, generator=gen)`` a one-by-one loop would make. When the cached rows
    are on the model's device, the rows, their step indices and the batch table are too, and the
    loss reads them by the iteration tensor (graph-capturable); rows kept on the CPU (over
    ``recon_cache_gb``) are served eagerly, and the unit's stats say so (``loop_note``).

    Data-parallel (``shard``: the rows ``inputs`` / ``targets`` hold, of ``total_rows``; several
    processes): the table is drawn over all ``total_rows`` rows, as one process draws it, and
    every rank computes the rows of each iteration's batch it holds (shifted to its local
    indices), weighted by their share of the batch, so the ranks' losses add up to the batch
    loss; a rank holding none of a batch's rows returns a zero without a graph. The loop then
    runs eagerly (the settings say ``data_parallel``; its gradients are summed over the ranks).

    ``columns`` (``recon_parallel="batch"``; every rank holds all rows): this rank's block of
    every batch's columns, a static slice of the table, weighted by its share of the batch; the
    loop keeps its CUDA graph (the gradient sum over the ranks is captured with it).

    ``it`` may also be a Python int (the iteration itself)."""
    device = torch.device(device)
    n = inputs.rows if shard is None else total_rows
    table = batch_indices(n, settings.batch_size, settings.iters, gen)
    if steps is not None and len(table):
        _check_steps(unit.module, steps)
    if shard is not None:
        return (_shard_loss(unit, inputs, targets, steps, table, shard, settings, device),
                dataclasses.replace(settings, graphs=False, data_parallel=True,
                                    note=None if torch.device(inputs.device) == device and torch.device(targets.device) == device
                                    else "rows kept on the CPU"))
    weight = 1.0
    if columns is not None:
        drawn = table.shape[1]
        table = table[:, columns.start:columns.stop].contiguous()
        weight = len(columns) / drawn
        settings = dataclasses.replace(settings, data_parallel=True)
    resident = torch.device(inputs.device) == device and torch.device(targets.device) == device
    if resident:
        table = table.to(device)
        steps = None if steps is None else steps.to(device)
        graphs = use_graphs(settings.graphs, device)
        counter = None
    else:
        graphs, counter = False, [0]
        if use_graphs(settings.graphs, device):
            warnings.warn(f"unit {unit.name}: cached rows are kept on the CPU (over recon_cache_gb), "
                          "so its iterations run eagerly, without CUDA graphs")

    def loss_fn(it):
        if not torch.is_tensor(it):             # a Python iteration number
            idx = table[it]
        elif counter is None:
            idx = at(table, it)
        else:                                   # rows on the CPU: the table stays there too
            idx = table[counter[0]]
            counter[0] += 1
        args, kw = _call_args(inputs.select(idx, device))
        row = None if steps is None else steps.index_select(0, idx.to(steps.device))
        with _autocast(settings, device, graphs), row_steps(unit.module, row, check=False):
            out = unit_output(unit.module(*args, **kw))
        loss = recon_loss(out, targets.select(idx, device)["out"], settings.p)
        return loss if weight == 1.0 else loss * weight

    note = None if resident else "rows kept on the CPU: eager loop"
    return loss_fn, dataclasses.replace(settings, graphs=graphs, note=note)


def _shard_loss(unit: Unit, inputs: UnitTensors, targets: UnitTensors, steps: torch.Tensor | None,
                table: torch.Tensor, shard: range, settings: UnitSettings, device) -> Callable:
    """The data-parallel loss of :func:`_unit_loss` (eager: the batch table stays on the CPU)."""
    counter = [0]

    def loss_fn(it):
        if torch.is_tensor(it):                 # the loop's counter: follow it on the host
            i = counter[0]
            counter[0] += 1
        else:
            i = it
        idx = table[i]
        drawn = len(idx)
        idx = idx[(idx >= shard.start) & (idx < shard.stop)]        # this rank's rows of the batch
        if len(idx) == 0:
            return torch.zeros((), device=device)
        local = idx - shard.start
        args, kw = _call_args(inputs.select(local, device))
        row = None if steps is None else steps.index_select(0, idx.to(steps.device))
        with _autocast(settings, device), row_steps(unit.module, row, check=False):
            out = unit_output(unit.module(*args, **kw))
        return recon_loss(out, targets.select(local, device)["out"], settings.p) * (len(idx) / drawn)

    return loss_fn


def _check_steps(module: nn.Module, steps: torch.Tensor) -> None:
    """The bounds check of :func:`row_steps`, once for all rows instead of every batch."""
    multi = multi_set_quantizers(module)
    if multi and int(steps.max()) >= min(q.n_sets for q in multi):
        raise IndexError(f"step index {int(steps.max())} outside the calibrated steps")


def cache_budget(cache_gb: float | None, device) -> int:
    """Bytes of cached unit tensors allowed on ``device`` (beyond it they stay on the CPU)."""
    if cache_gb is not None:
        return int(cache_gb * (1 << 30))
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return 1 << 62          # the CPU holds them anyway


def unit_seed(seed: int, phase: str, index: int) -> int:
    """Seed of a unit's random stream: depends only on the run's seed, the pass and the unit's
    position, so a resumed run draws the same batches as an uninterrupted one."""
    return (seed * 1_000_003 + index * 7 + {"weights": 1, "act": 2}.get(phase, 3)) % (2 ** 63)


def run_units(model: nn.Module, units: list[Unit], rows: CalibRows, work: UnitWork,
              settings: UnitSettings, store=None, timer=None, stage: str = "reconstruct",
              on_unit: Callable[[str, str, dict], None] | None = None) -> dict[str, dict]:
    """Run ``work`` on every unit in order; returns per-unit statistics.

    ``store`` (a :class:`~tfmq.calib.resume.ProgressStore`) skips finished units and records each
    new one. ``timer`` (a :class:`~tfmq.recipes.StageTimer`) gets each unit's wall time under
    ``stage``. ``on_unit(phase, unit_name, stats)`` is called after each unit is done (and
    saved); an exception from it stops the run with the progress kept.
    """
    device = rows.device
    budget = cache_budget(settings.cache_gb, device) // 2     # half for inputs, half for targets
    results: dict[str, dict] = {}
    outer = tqdm(total=len(units), desc=stage, unit="unit", disable=not settings.progress)
    # several processes: each caches its share of the rows (whole capture passes); then either
    # every rank runs the whole loop on the gathered rows ("replicate") or each computes the rows
    # of every iteration's batch it holds ("rows"), the batches drawn from all rows as in one process
    split = distributed.is_distributed()
    mode = parallel_mode(settings.parallel, settings.graphs, device) if split else None
    gather = mode in ("replicate", "batch")         # every rank runs the loop on all rows
    n = len(rows)
    if mode == "batch" and min(settings.batch_size, n) < distributed.world_size():
        raise ValueError(f"recon_parallel='batch' splits every batch over the {distributed.world_size()} "
                         f"processes; a batch of {min(settings.batch_size, n)} rows is too small")
    # gather: fewer capture passes than ranks and every rank caches all rows (none is idle-empty)
    share = split and not (gather and -(-n // rows.capture_size) < distributed.world_size())
    mine = distributed.shard(n, align=rows.capture_size if gather else rows.batch_size) if share else range(n)
    local_rows = rows.subset(mine) if share else rows
    if gather and share:        # the gathered rows must fit where one process would keep them
        budget = budget * max(1, len(mine)) // max(1, n)
    with outer, quant_state(model):        # every quantizer's flag as it was, at the end
        for index, unit in enumerate(units):
            outer.update(1)
            if not work.applies(unit):
                continue
            key = f"{work.phase}:{unit.name}"
            if store is not None and store.done(key):
                work.restore(unit, store.load(key))
                results[unit.name] = {**store.meta(key), "restored": True}
                if timer is not None:
                    timer.add_unit(stage, unit.name, store.seconds(key))
                continue
            t0 = time.perf_counter()
            w_on, a_on = work.quant_state
            set_quant_state(model, w_on, a_on)
            inputs = capture(model, unit, local_rows, "input", budget)
            with quant_state(model, weight=False, act=False):
                targets = capture(model, unit, local_rows, "output", budget)
            if gather and share:
                inputs, targets = inputs.gathered(), targets.gathered()
            dp = mode == "rows"                     # the eager data-parallel loop
            # per-step (FSC) quantizers take each row's own step while activations are quantized
            steps = None
            if a_on and multi_set_quantizers(unit.module):
                if rows.steps is None:
                    raise ValueError(f"unit {unit.name} has per-step activation quantizers but the "
                                     "calibration rows carry no step indices")
                steps = rows.steps      # on the CPU: the bounds check of row_steps needs no GPU sync
            held = (n, mine.start) if dp else (None, 0)
            before = unit_error(unit, inputs, targets, device, settings.batch_size, steps, *held)

            gen = torch.Generator().manual_seed(unit_seed(settings.seed, work.phase, index))
            columns = distributed.shard(min(settings.batch_size, n)) if mode == "batch" else None
            loss_fn, unit_settings = _unit_loss(unit, inputs, targets, steps, gen, settings, device,
                                                shard=mine if dp else None, total_rows=n,
                                                columns=columns)

            frozen = [(p, p.requires_grad) for p in unit.module.parameters()]
            for p, _ in frozen:                 # only what the work creates is learned
                p.requires_grad_(False)
            t_opt = time.perf_counter()
            try:
                stats = work.run(unit, loss_fn, unit_settings)
                stats["optimize_s"] = round(time.perf_counter() - t_opt, 4)
            finally:
                for p, flag in frozen:
                    p.requires_grad_(flag)
            if gather:          # rank 0's result everywhere, bit for bit
                distributed.broadcast_module_(unit.module)
                if mode == "replicate":
                    stats["loop"] = f"{stats.get('loop', 'none')} (replicated on {distributed.world_size()} ranks)"
            after = unit_error(unit, inputs, targets, device, settings.batch_size, steps, *held)
            del inputs, targets
            seconds = time.perf_counter() - t0
            stats = {**stats, "error_before": before, "error_after": after, "seconds": round(seconds, 3)}
            if unit_settings.note:
                stats["loop_note"] = unit_settings.note
            results[unit.name] = stats
            if timer is not None:
                timer.add_unit(stage, unit.name, seconds)
            if store is not None:
                store.save(key, work.state(unit), seconds,
                           {k: v for k, v in stats.items() if isinstance(v, (int, float, type(None)))})
            outer.set_postfix(unit=unit.name, error=f"{before:.3g}->{after:.3g}")
            if on_unit is not None:
                on_unit(work.phase, unit.name, stats)
    return results


# ---- the recipe stage ---------------------------------------------------------------------
def prepare_units(ctx) -> tuple[list[Unit], CalibRows]:
    """The units (ordered, selected by ``recon_units``) and the calibration rows of a recipe
    context; computed once and shared by the reconstruction passes."""
    if ctx.units is not None:
        return ctx.units, ctx.rows
    c = ctx.config
    param = next(ctx.denoiser.parameters())
    steps = reconstruction_steps(c, len(ctx.data))
    rows = calibration_rows(ctx.data, steps, c.recon_rows, c.seed, c.calib_batch_size,
                            param.device, param.dtype, c.recon_capture_rows)
    units = order_units(ctx.denoiser, find_units(ctx.denoiser), rows.example())
    units = select_units(units, c.recon_units)
    ctx.units, ctx.rows = units, rows
    return units, rows


def graph_setting(config) -> bool | None:
    """The loops' ``graphs`` argument from a config: None (CUDA graphs on CUDA, eager elsewhere)
    unless ``recon_cuda_graphs`` is off."""
    return None if getattr(config, "recon_cuda_graphs", True) else False


def _check_bf16(ctx) -> None:
    if ctx.config.recon_bf16 and next(ctx.denoiser.parameters()).device.type != "cuda":
        raise ValueError("recon_bf16 (bf16 autocast) needs the model on a CUDA device")


def reconstruct_weights(ctx) -> dict[str, dict]:
    """Recipe stage: BRECQ weight reconstruction of every selected unit with AdaRound.

    Layers named in ``ctx.recon_exclude`` (e.g. TFMQ-DM's temporal layers, which TIAR
    has already rounded) are not touched. Per-unit results go to
    ``tfmq_info["reconstruction"]``.
    """
    c = ctx.config
    _check_bf16(ctx)
    units, rows = prepare_units(ctx)
    work = WeightRounding(c.recon_reg_weight, c.recon_warmup, c.recon_beta,
                          ctx.recon_exclude)
    settings = UnitSettings(c.recon_iters, c.recon_batch_size, c.recon_lr, c.seed, c.recon_bf16,
                            c.recon_cache_gb, 2.0, ctx.progress, graph_setting(c),
                            parallel=c.recon_parallel)
    results = run_units(ctx.denoiser, units, rows, work, settings, ctx.store, ctx.timer,
                        "reconstruct", ctx.on_unit)
    info = ctx.info
    info["reconstruction"] = results
    # which layers really got split input quantizers (none where the policy keeps those inputs FP)
    info["split_shortcut_layers"] = sorted(
        n for n, m in ctx.denoiser.named_modules()
        if isinstance(m, QuantLayer) and isinstance(m.act_quantizer, GroupActQuantizer))
    return results
