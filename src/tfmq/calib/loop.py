"""The optimisation loop shared by AdaRound (TIAR, block reconstruction) and activation step-size
learning: one static-shape step, no host-device synchronisation, capturable in a CUDA graph.

Calibration iterations are tiny (a few small layers, batch 32): on a GPU they are bound by
kernel launches and by the host waiting for the device, not by arithmetic. So everything an
iteration needs is a tensor on the model's device, decided before the loop starts:

* the iteration number is a 0-d ``long`` tensor (:class:`StepLoop.counter`) that the step
  itself increments; per-iteration values (batch row indices, the regulariser's ``beta``, the
  learning rate) are rows of tables indexed by it (:func:`at`), never Python numbers;
* the batch rows are drawn up front with the same seeded CPU generator, in the same order, as
  a per-iteration ``torch.randperm`` would draw them (:func:`batch_indices`), and sent to the
  device once;
* the optimiser is :class:`Adam` below: torch's Adam algorithm with its state and bias
  corrections as device tensors (torch's own ``capturable`` Adam refuses CPU tensors), so the
  same code runs on the CPU (tests) and in a CUDA graph;
* the loss of every iteration is written into a device buffer and read once at the end.

:func:`run_steps` calls the step ``iters`` times: eagerly on the CPU (or with
``graphs=False``), and on CUDA with ``graphs=True`` as a few eager warm-up iterations (real
iterations, on a side stream, as CUDA graph capture requires) followed by one captured
iteration replayed for the rest. Both run the same Python step function, so the CPU tests of
the eager loop test the arithmetic of the captured one.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

#: Eager iterations before a CUDA graph is captured (lazy initialisation of cuBLAS / cuDNN
#: workspaces and autograd state must happen outside the capture).
GRAPH_WARMUP = 3


def at(table: torch.Tensor, it: torch.Tensor) -> torch.Tensor:
    """Row ``it`` of ``table`` (``it``: 0-d long tensor on the table's device), without the
    host synchronisation that indexing with a 0-d tensor (``table[it]``) implies."""
    return table.index_select(0, it.reshape(1)).squeeze(0)


def batch_indices(n: int, batch_size: int, iters: int, generator: torch.Generator) -> torch.Tensor:
    """``[iters, min(batch_size, n)]`` row indices: row ``i`` is what the ``i``-th call of
    ``torch.randperm(n, generator=generator)[:batch_size]`` returns (the same draws, in the same
    order, so a seed gives the same batches as a loop drawing them one by one)."""
    if iters <= 0:
        return torch.empty((0, min(batch_size, n)), dtype=torch.long)
    return torch.stack([torch.randperm(n, generator=generator)[:batch_size] for _ in range(iters)])


def beta_table(iters: int, warmup: float, beta: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """AdaRound's regulariser schedule as tensors: ``(on, beta)``, each ``[iters]`` float32.
    ``on[i]`` is 0 during the warm-up (no rounding loss) and 1 after; ``beta[i]`` decays linearly
    ``beta[0] -> beta[1]`` after the warm-up (see :func:`tfmq.calib.reconstruction.beta_at`,
    whose values these are, rounded to float32) and holds ``beta[0]`` during the warm-up."""
    start = int(warmup * iters)
    on = torch.zeros(iters, dtype=torch.float32)
    b = torch.full((iters,), float(beta[0]), dtype=torch.float32)
    for it in range(start, iters):
        t = (it - start) / max(1, iters - start)
        b[it] = beta[1] + (beta[0] - beta[1]) * max(0.0, 1.0 - t)
        on[it] = 1.0
    return on, b


def cosine_lr_table(lr: float, iters: int) -> torch.Tensor:
    """``lr * (1 + cos(pi * it / iters)) / 2`` for every iteration (float64): the learning rate
    that ``LambdaLR`` with that factor gives iteration ``it``."""
    return torch.tensor([lr * (0.5 * (1 + math.cos(math.pi * it / iters))) for it in range(iters)],
                        dtype=torch.float64)


class Adam:
    """Adam (Kingma & Ba; torch's defaults: betas 0.9 / 0.999, eps 1e-8, no weight decay) with
    all of its state on the parameters' device, the learning rate a tensor, and no host
    synchronisation: the same update as ``torch.optim.Adam`` (checked in the tests), usable
    eagerly on the CPU and inside a CUDA graph. On CUDA it is ``torch.optim.Adam(fused=True,
    capturable=True)`` itself (one kernel for all parameters instead of about ten per parameter;
    the learning rate in float32, as that optimizer takes it); on the CPU the update is written
    out here (torch's capturable Adam refuses CPU tensors).

    ``step(grads, lr)`` takes the gradients (in parameter order) and the learning rate as a
    0-d float64 tensor on the device.
    """

    def __init__(self, params: Sequence[torch.Tensor], betas=(0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        if not self.params:
            raise ValueError("Adam needs at least one parameter")
        device = self.params[0].device
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.fused = None
        if device.type == "cuda":       # torch's own fused, capturable Adam: one kernel per step
            self._lr = torch.zeros((), dtype=torch.float32, device=device)
            self.fused = torch.optim.Adam(self.params, lr=self._lr, betas=betas, eps=eps,
                                          fused=True, capturable=True)
            return
        self.step_count = torch.zeros((), dtype=torch.float64, device=device)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], lr: torch.Tensor) -> None:
        if self.fused is not None:
            self._lr.copy_(lr)
            for p, g in zip(self.params, grads):
                p.grad = g
            self.fused.step()
            for p in self.params:
                p.grad = None
            return
        self.step_count.add_(1)
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
        # bias corrections in float64 as torch's (Python-float) Adam computes them
        bc1 = 1 - torch.pow(self.beta1, self.step_count)
        bc2_sqrt = (1 - torch.pow(self.beta2, self.step_count)).sqrt()
        neg_step = (-(lr / bc1)).float()
        bc2_sqrt = bc2_sqrt.float()
        for p, m, v in zip(self.params, self.exp_avg, self.exp_avg_sq):
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            p.add_((m * neg_step.to(p.dtype)) / denom)     # addcdiv's order: (value * m) / denom


def _grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    if not loss.requires_grad:      # a loss that reaches no parameter (a data-parallel rank with
        return [torch.zeros_like(p) for p in params]        # no rows this iteration): zeros
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    # a parameter the loss does not reach keeps still (Adam with zero moments moves it by 0)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]


class StepLoop:
    """One optimisation iteration over ``params`` as a function of the device iteration counter.

    ``loss_fn(it)`` returns ``(loss, logged)``: the scalar to minimise and the scalar recorded
    as the iteration's loss (usually the reconstruction term of ``loss``); ``it`` is the 0-d
    long counter tensor. ``lr`` is a float64 table with one learning rate per iteration.
    ``after_step()`` (optional) runs after the update, without gradient (e.g. clamping).
    ``grad_hook(grads)`` (optional) runs between the backward pass and the update, without
    gradient: it gets the gradients (in parameter order, tensors it may change in place) and
    returns those to apply (e.g. summed over the processes of a data-parallel loop: NCCL
    collectives on the device's stream are captured in a CUDA graph with the rest of the step).
    """

    def __init__(self, params: Sequence[torch.Tensor], loss_fn: Callable, lr: torch.Tensor,
                 after_step: Callable[[], None] | None = None,
                 grad_hook: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None):
        self.params = list(params)
        device = self.params[0].device
        self.device = device
        self.loss_fn = loss_fn
        self.lr = lr.to(device, torch.float64)
        self.iters = self.lr.shape[0]
        self.after_step = after_step
        self.grad_hook = grad_hook
        self.opt = Adam(self.params)
        self.counter = torch.zeros((), dtype=torch.long, device=device)
        self.losses = torch.full((max(1, self.iters),), float("nan"), device=device)

    def step(self) -> None:
        it = self.counter
        with torch.enable_grad():
            loss, logged = self.loss_fn(it)
            grads = _grads(loss, self.params)
        with torch.no_grad():
            if self.grad_hook is not None:
                grads = self.grad_hook(grads)
            self.opt.step(grads, at(self.lr, it))
            if self.after_step is not None:
                self.after_step()
            self.losses.index_copy_(0, it.reshape(1), logged.detach().float().reshape(1))
            it.add_(1)


def use_graphs(graphs: bool | None, device: torch.device) -> bool:
    """Whether :func:`run_steps` captures a CUDA graph: ``graphs`` None means "on CUDA"; True
    on a non-CUDA device is an error (there is nothing to capture)."""
    device = torch.device(device)
    if graphs is None:
        return device.type == "cuda"
    if graphs and device.type != "cuda":
        raise ValueError(f"CUDA graphs need the model on a CUDA device, not {device}")
    return bool(graphs)


def run_steps(loop: StepLoop, graphs: bool, progress: Callable[[int], None] | None = None,
              report_every: int = 100) -> str:
    """Run all ``loop.iters`` iterations; returns how (``"graph"`` or ``"eager"``).

    ``progress(n)`` is told every ``report_every`` iterations (and at the end) how many were
    done; it must not read device tensors (that would synchronise every time)."""
    iters = loop.iters
    done = 0

    def tick(n):
        nonlocal done
        done += n
        if progress is not None and (done % report_every == 0 or done == iters):
            progress(done)

    if not graphs:
        for _ in range(iters):
            loop.step()
            tick(1)
        return "eager"
    warm = min(GRAPH_WARMUP, iters)
    side = torch.cuda.Stream(device=loop.device)
    side.wait_stream(torch.cuda.current_stream(loop.device))
    with torch.cuda.stream(side):
        for _ in range(warm):
            loop.step()
            tick(1)
    torch.cuda.current_stream(loop.device).wait_stream(side)
    if iters - warm <= 0:
        return "eager"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loop.step()                     # recorded, not run: the counter does not move here
    for _ in range(iters - warm):
        graph.replay()
        tick(1)
    del graph
    return "graph"
