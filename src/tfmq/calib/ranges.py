"""Range calibration: weight ranges from the weights, activation ranges from calibration data.

Activation ranges are observed with forward pre-hooks on the activation quantizers while the
calibration data run through the (weight-quantized) denoiser with activation quantization off.
Each observer keeps the exact min / max and a seeded random subsample of the values; ``minmax``
uses the former (or their EMA, Q-Diffusion's running statistics), ``mse`` and ``percentile``
the subsample (with the exact extremes added).

Under several processes each rank runs its share of the calibration batches and the observers'
per-batch entries are gathered and folded in batch order (:class:`Observer`), so the ranges equal
one process's exactly; the range searches themselves are split over the ranks (quantizer i on
rank i mod N) and their results exchanged.

With ``per_step=True`` every multi-set quantizer gets one parameter set per sampling step
(finite set calibration, FSC); otherwise one set for all steps.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..hooks import temporary_hooks
from ..models.adapter import call_denoiser
from ..quant.model import act_quantizers, fixed_weights, quant_state, weight_quantizers
from ..quant.quantizer import UniformQuantizer, init_range
from .data import CalibrationData

SAMPLE_PER_CALL = 2048       # values kept from each observed tensor
SAMPLE_CAP = 1 << 17         # values kept per observer in total


class Observer:
    """Running statistics of one activation quantizer's input.

    Each observed batch leaves one entry: its exact min / max and a random subsample of its values
    drawn with a generator seeded by (``seed``, batch index), so the entries do not depend on which
    process observed which batch. :meth:`merge` folds entries (all ranks', see :meth:`packed`) in
    batch order: min / max (or their EMA, Q-Diffusion's running statistics) and the subsample, kept
    up to ``SAMPLE_CAP`` values.

    Everything stays on the input's device until :meth:`apply` (one host synchronisation per
    quantizer, not one per observed call): the sample positions come from the CPU generator (sent
    without waiting), the min / max and the kept values are device tensors. Under several processes
    a rank's entries travel as four tensors (:meth:`packed`), not one small tensor per batch:
    pickling tens of thousands of 0-d tensors cost more than the observation itself.
    """

    def __init__(self, seed: int, ema: float | None = None):
        self.seed = seed
        self.ema = ema
        self._batches: list[int] = []
        self._extremes: list[torch.Tensor] = []     # [2] (min, max) per observed batch
        self._samples: list[torch.Tensor] = []      # kept subsamples, in observation order
        self._lengths: list[int] = []               # values kept from each batch (0: none)
        self.kept = 0
        self.lo = None
        self.hi = None
        self.samples: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, x: torch.Tensor, batch_index: int) -> None:
        x = x.detach().float()
        self._batches.append(batch_index)
        self._extremes.append(torch.stack([x.min(), x.max()]))
        if self.kept < SAMPLE_CAP:       # a batch beyond the cap on this rank is beyond it globally
            flat = x.reshape(-1)
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + batch_index) % (2 ** 63))
            idx = torch.randint(0, flat.numel(), (min(SAMPLE_PER_CALL, flat.numel()),),
                                generator=gen).to(flat.device, non_blocking=True)
            sample = torch.cat([flat[idx], self._extremes[-1]])
            self._samples.append(sample)
            self._lengths.append(sample.numel())
            self.kept += sample.numel()
        else:
            self._lengths.append(0)

    def packed(self, host: bool = False) -> dict[str, torch.Tensor]:
        """This observer's entries as four tensors: ``batches`` [n] (batch indices), ``extremes``
        [n, 2] (each batch's min, max), ``lengths`` [n] (values kept from each batch) and
        ``samples`` (the kept values, batch after batch); ``host`` moves them to the CPU (to send
        to the other ranks: two device-to-host copies)."""
        if self._extremes:
            extremes = torch.stack(self._extremes)
            device = extremes.device
        else:
            extremes, device = torch.empty(0, 2), torch.device("cpu")
        samples = torch.cat(self._samples) if self._samples else torch.empty(0, device=device)
        out = {"batches": torch.tensor(self._batches, dtype=torch.long),
               "extremes": extremes, "lengths": torch.tensor(self._lengths, dtype=torch.long),
               "samples": samples}
        if host:
            out["extremes"], out["samples"] = out["extremes"].cpu(), out["samples"].cpu()
        return out

    @torch.no_grad()
    def merge(self, parts: list[dict[str, torch.Tensor]]) -> None:
        """Fold packed entries (:meth:`packed`, from every rank, any order) in batch order into the
        statistics (on the entries' device: no host synchronisation)."""
        parts = [p for p in parts if p["batches"].numel()]
        self._batches, self._extremes, self._samples, self._lengths = [], [], [], []
        if not parts:
            return
        batches = torch.cat([p["batches"] for p in parts])
        extremes = torch.cat([p["extremes"] for p in parts])
        lengths = torch.cat([p["lengths"] for p in parts])
        starts = []         # where each entry's values start in its part's samples
        for p in parts:
            ends = p["lengths"].cumsum(0)
            starts.append(ends - p["lengths"])
        starts = torch.cat(starts)
        owner = torch.cat([torch.full((p["batches"].numel(),), i, dtype=torch.long)
                           for i, p in enumerate(parts)])
        order = torch.argsort(batches, stable=True).tolist()
        if self.ema is None:        # min / max are exact whatever the order
            first = extremes.amin(dim=0)[0], extremes.amax(dim=0)[1]
            self.lo = first[0] if self.lo is None else torch.minimum(self.lo, first[0])
            self.hi = first[1] if self.hi is None else torch.maximum(self.hi, first[1])
        else:
            for i in order:
                lo, hi = extremes[i, 0], extremes[i, 1]
                if self.lo is None:
                    self.lo, self.hi = lo, hi
                else:
                    self.lo = self.ema * self.lo + (1 - self.ema) * lo
                    self.hi = self.ema * self.hi + (1 - self.ema) * hi
        kept = 0
        lengths, starts, owner = lengths.tolist(), starts.tolist(), owner.tolist()
        for i in order:
            if kept >= SAMPLE_CAP:
                break
            if lengths[i] == 0:
                raise RuntimeError("an observer dropped a batch sample that the global cap keeps")
            self.samples.append(parts[owner[i]]["samples"][starts[i]:starts[i] + lengths[i]])
            kept += lengths[i]

    def apply(self, quantizer: UniformQuantizer, method: str, set_index: int | None) -> None:
        if self.lo is None:
            raise RuntimeError("an activation quantizer saw no data during calibration")
        like = torch.zeros(1)
        if method == "minmax":
            quantizer.set_range(self.lo.cpu().reshape(1), self.hi.cpu().reshape(1), like, set_index=set_index)
        else:       # the search runs where the quantizer lives (the GPU when calibrating on one)
            init_range(quantizer, torch.cat(self.samples).to(quantizer.initialized.device), method,
                       set_index=set_index)


@torch.no_grad()
def init_weight_ranges(model: nn.Module, method: str = "mse", progress: bool = True) -> None:
    """Per-output-channel weight ranges of every quantized layer."""
    items = list(weight_quantizers(model).items())
    layers = dict(model.named_modules())
    for name, q in tqdm(items, desc="weight ranges", disable=not progress, leave=False):
        init_range(q, layers[name].weight, method)


def _forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    call_denoiser(model, batch)


@torch.no_grad()
def calibrate_activations(model: nn.Module, data: CalibrationData, method: str = "mse",
                          per_step: bool = False, rows_per_step: int | None = None,
                          batch_size: int = 64, ema: float | None = None, seed: int = 0,
                          steps: list[int] | None = None, progress: bool = True,
                          only: dict[str, UniformQuantizer] | None = None) -> None:
    """Set activation quantizer ranges from calibration data.

    Args:
        method: ``minmax``, ``mse`` or ``percentile``.
        per_step: one parameter set per step for quantizers that have several (FSC).
        rows_per_step: rows used from each step (all by default).
        ema: momentum of running min / max (Q-Diffusion's ``--running_stat``), None = exact.
        steps: which step indices to use (all by default).
        only: restrict to these quantizers (by name); others are left untouched.
    """
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    quantizers = only if only is not None else act_quantizers(model)
    if not quantizers:
        return
    steps = list(range(len(data))) if steps is None else steps
    gen = torch.Generator().manual_seed(seed)
    groups = [[s] for s in steps] if per_step else [steps]
    with quant_state(model, act=False), fixed_weights(model):
        for g_index, group in enumerate(tqdm(groups, desc="activation ranges", disable=not progress,
                                             leave=False)):
            # the group's batches, numbered globally; this process observes its share of them
            counts = [data.rows(s) if rows_per_step is None else min(rows_per_step, data.rows(s))
                      for s in group]
            n_batches = [(c + batch_size - 1) // batch_size for c in counts]
            mine = distributed.shard(sum(n_batches))
            observers = {n: Observer(seed * 7_919 + g_index * 104_729 + q_index, ema)
                         for q_index, n in enumerate(quantizers)}
            current = [0]
            with temporary_hooks((q, lambda m, a, o=observers[n]: o.update(a[0], current[0]))
                                 for n, q in quantizers.items()):
                first = 0
                for s, count, nb in zip(group, counts, n_batches):
                    local = [b for b in range(first, first + nb) if b in mine]
                    if not local:       # draw the same rows as the processes that read this step
                        if rows_per_step is not None and rows_per_step < data.rows(s):
                            torch.randperm(data.rows(s), generator=gen)
                        first += nb
                        continue
                    d = data.batch([s], rows_per_step, gen)
                    for b in local:
                        i = (b - first) * batch_size
                        current[0] = b
                        batch = {k: (v[i:i + batch_size].to(device) if v.dtype == torch.long
                                     else v[i:i + batch_size].to(device, dtype)) for k, v in d.items()}
                        _forward(model, batch)
                    first += nb
            if distributed.is_distributed():     # every rank's entries, on the host
                parts = distributed.gather_objects({n: o.packed(host=True) for n, o in observers.items()})
                entries = {n: [part[n] for part in parts] for n in quantizers}
            else:                                 # one process: the entries stay on the device
                entries = {n: [o.packed()] for n, o in observers.items()}
            for n in quantizers:
                observers[n].merge(entries[n])
            # the range searches are split over the ranks
            _apply_shared(quantizers, observers, method, group[0] if per_step else None)


def _apply_shared(quantizers: dict[str, UniformQuantizer], observers: dict[str, Observer], method: str,
                  step: int | None) -> None:
    """Set every quantizer's range from its merged observer (``step``: the parameter set of
    multi-set quantizers, None for all sets). Under several processes rank r searches the ranges
    of quantizers r, r + N, ... and the results are exchanged, so every rank ends with the same
    tensors, bit for bit, as if it had searched them all."""
    world, me = distributed.world_size(), distributed.rank()
    mine = [n for i, n in enumerate(quantizers) if i % world == me]
    for n in mine:
        q = quantizers[n]
        observers[n].apply(q, method, step if q.n_sets > 1 else None)
    if world == 1:
        return
    owned = {n: (quantizers[n].scale.detach().cpu(), quantizers[n].zero_point.cpu(),
                 quantizers[n].initialized.cpu()) for n in mine}
    for part in distributed.gather_objects(owned):
        for n, (scale, zero, init) in part.items():
            if n in owned:
                continue
            q = quantizers[n]
            q.scale.data = scale.to(q.initialized.device)
            q.zero_point = zero.to(q.initialized.device)
            q.initialized.copy_(init.to(q.initialized.device))
