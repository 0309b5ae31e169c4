"""Several processes (one per GPU) of one job: the process group and the few collectives tfmq uses.

``tfmq quantize / sample / evaluate`` run unchanged under ``torchrun --nproc_per_node N`` or
``accelerate launch --num_processes N``: both set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``, and :func:`setup` starts ``torch.distributed`` from them
(NCCL on CUDA, gloo on the CPU), giving each process the GPU ``cuda:LOCAL_RANK``. Without those
variables (``WORLD_SIZE`` unset or 1) nothing here does anything: every helper returns its input
and :func:`shard` the whole range.

How work is split so that results do not depend on the number of processes:

* :func:`shard` gives each rank a contiguous block of a global index range (aligned to the batch
  size, so every batch holds the same samples as in one process); gathering blocks in rank order
  (:func:`gather_rows`, :func:`gather_objects`) restores the global order;
* random draws are seeded by global index (sample ``i`` uses ``seed + i``), never by rank;
* optimisation steps all-reduce (sum) their gradients (:func:`all_reduce_sum_`), so every rank
  applies the same update; :func:`broadcast_module_` copies rank 0's state to the others after a
  stage, so ranks cannot drift apart through non-deterministic kernels.

This is the only module of tfmq that talks to ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist


class DistributedSetupError(RuntimeError):
    """The multi-process launch cannot run as asked (e.g. more processes than GPUs)."""


# ---- who am I ---------------------------------------------------------------------------------
def launched_world_size() -> int:
    """Processes the launcher started (``WORLD_SIZE``; 1 when unset)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedSetupError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer") from None


def is_initialized() -> bool:
    """Whether a ``torch.distributed`` process group is running."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes of the job (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """Whether this process writes files and prints (rank 0)."""
    return rank() == 0


def is_distributed() -> bool:
    """Whether work is split over several processes now."""
    return world_size() > 1


def setup(device: str = "cpu") -> str:
    """Start the process group if the launcher asked for several processes; returns the device this
    process works on.

    Under ``WORLD_SIZE`` > 1: ``device`` ``cuda`` gives each process ``cuda:LOCAL_RANK`` and the NCCL
    backend; ``cpu`` the gloo backend. ``cuda:N`` is refused (the launcher decides which GPU a process
    gets), as are more processes on this host than GPUs. Without a multi-process launch, returns
    ``device`` unchanged and starts nothing. Calling it again returns the same device.
    """
    n = launched_world_size()
    if n <= 1:
        return device
    if "LOCAL_RANK" not in os.environ or "RANK" not in os.environ:
        raise DistributedSetupError("WORLD_SIZE > 1 but RANK / LOCAL_RANK are not set: start several "
                                    "processes with torchrun or accelerate launch")
    local = int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        if device != "cuda":
            raise DistributedSetupError(f"--device {device}: under a multi-process launch pass --device "
                                        "cuda; each process takes the GPU cuda:LOCAL_RANK")
        count = torch.cuda.device_count()
        per_host = int(os.environ.get("LOCAL_WORLD_SIZE", n))
        if count == 0:
            raise DistributedSetupError("--device cuda under a multi-process launch, but no CUDA GPU is "
                                        "visible")
        if local >= count or per_host > count:
            raise DistributedSetupError(f"{per_host} processes on this host but only {count} CUDA GPU(s): "
                                        f"launch at most {count} (torchrun --nproc_per_node / accelerate "
                                        "launch --num_processes)")
        mine = torch.device("cuda", local)
        torch.cuda.set_device(mine)
        if not is_initialized():
            dist.init_process_group("nccl", device_id=mine)
        return str(mine)
    if device != "cpu":
        raise DistributedSetupError(f"unknown device {device!r}")
    if not is_initialized():
        dist.init_process_group("gloo")
    return "cpu"


def shutdown(wait: bool = True) -> None:
    """End the process group (if one runs); call once at the end of a command. ``wait``: first
    wait for every rank (after a success; after an error the others may never come)."""
    if is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if is_distributed():
        dist.barrier()


# ---- splitting work -------------------------------------------------------------------------------
def shard(n: int, align: int = 1, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous block of ``range(n)``.

    Blocks start at multiples of ``align`` (the batch size: a batch never straddles two ranks, so
    each batch holds the same items as in one process) and go to ranks in order, so concatenating
    the ranks' results in rank order gives the global order. The ``ceil(n / align)`` aligned groups
    are dealt out as evenly as possible; a rank may get an empty range.
    """
    if n < 0 or align < 1:
        raise ValueError(f"shard needs n >= 0 and align >= 1, got n={n}, align={align}")
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    groups = (n + align - 1) // align
    base, extra = divmod(groups, w)
    first = r * base + min(r, extra)
    last = first + base + (1 if r < extra else 0)
    return range(min(n, first * align), min(n, last * align))


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(x):
    """Concatenate every rank's ``x`` (tensor or numpy array of one dtype, any number of rows)
    along dimension 0 in rank order; every rank gets the result. Returns ``x`` itself in one
    process. Tensors come back on ``x``'s device, arrays as arrays. A rank with no rows may pass an
    empty array of any shape: the others' trailing shape is used."""
    if not is_distributed():
        return x
    is_np = isinstance(x, np.ndarray)
    t = torch.from_numpy(np.ascontiguousarray(x)) if is_np else x
    home = t.device
    meta = gather_objects((int(t.shape[0]), tuple(t.shape[1:]), t.dtype))
    shapes = {m[1] for m in meta if m[0] > 0}
    dtypes = {m[2] for m in meta if m[0] > 0}
    if len(shapes) > 1 or len(dtypes) > 1:
        raise ValueError(f"gather_rows: ranks hold rows of different shapes / dtypes: {meta}")
    if not shapes:
        return x
    trailing, dtype = shapes.pop(), dtypes.pop()
    sizes = [m[0] for m in meta]
    dev = _comm_device()
    send = t.to(dev, dtype) if t.shape[0] else torch.zeros((0, *trailing), dtype=dtype, device=dev)
    if dtype == torch.bool:
        send = send.to(torch.uint8)
    most = max(sizes)
    if send.shape[0] < most:
        pad = torch.zeros((most - send.shape[0], *trailing), dtype=send.dtype, device=dev)
        send = torch.cat([send, pad])
    send = send.contiguous()
    parts = [torch.empty_like(send) for _ in sizes]
    dist.all_gather(parts, send)
    out = torch.cat([p[:s] for p, s in zip(parts, sizes)])
    out = (out.to(torch.bool) if dtype == torch.bool else out).to(home)
    return out.numpy() if is_np else out


def gather_objects(obj) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj):
    """Rank 0's picklable ``obj`` on every rank (``obj`` itself in one process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _flat_groups(tensors: list[torch.Tensor]) -> dict:
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    return groups


@torch.no_grad()
def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over the ranks, in place (one collective per dtype / device)."""
    if not is_distributed():
        return
    dev = _comm_device()
    for (dtype, home), ts in _flat_groups([t for t in tensors if t is not None]).items():
        flat = torch.cat([t.reshape(-1) for t in ts]).to(dev)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat = flat.to(home)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def sync_grads_(params: list[torch.Tensor]) -> None:
    """All-reduce (sum) the gradients of ``params`` (a missing gradient counts as zeros, so every
    rank takes part even where it computed nothing)."""
    if not is_distributed():
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum_([p.grad for p in params])


def all_reduce_min_max(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise min of ``lo`` and max of ``hi`` over the ranks (exact: no rounding)."""
    if not is_distributed():
        return lo, hi
    dev = _comm_device()
    a, b = lo.to(dev).clone(), hi.to(dev).clone()
    dist.all_reduce(a, op=dist.ReduceOp.MIN)
    dist.all_reduce(b, op=dist.ReduceOp.MAX)
    return a.to(lo.device), b.to(hi.device)


def all_reduce_float(value: float) -> float:
    """Sum of a Python float over the ranks (float64)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


@torch.no_grad()
def broadcast_module_(module: torch.nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``module`` (same structure needed),
    bit for bit: the tensors travel as raw bytes, one collective per device."""
    if not is_distributed():
        return
    tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t is not None and t.numel()]
    dev = _comm_device()
    groups: dict = {}
    for t in tensors:
        groups.setdefault(t.device, []).append(t)
    for home, ts in groups.items():
        wire = torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in ts]).to(dev)
        dist.broadcast(wire, src=0)
        wire = wire.to(home)
        offset = 0
        for t in ts:
            n = t.numel() * t.element_size()
            t.data.copy_(wire[offset:offset + n].clone().view(t.dtype).view_as(t))
            offset += n


# ---- output -------------------------------------------------------------------------------------
def progress(flag: bool = True) -> bool:
    """Whether to show progress bars: ``flag`` on the main process, never on the others."""
    return bool(flag) and is_main()


@contextlib.contextmanager
def quiet_others() -> Iterator[None]:
    """Silence stdout of every process but rank 0 (stderr stays: errors must be seen)."""
    if is_main():
        yield
        return
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        yield


def describe() -> str:
    """``rank R/N`` for messages ('' in one process)."""
    return f"rank {rank()}/{world_size()}" if is_distributed() else ""


__all__ = ["DistributedSetupError", "launched_world_size", "is_initialized", "world_size", "rank",
           "is_main", "is_distributed", "setup", "shutdown", "barrier", "shard", "gather_rows",
           "gather_objects", "broadcast_object", "all_reduce_sum_", "sync_grads_", "all_reduce_min_max",
           "all_reduce_float", "broadcast_module_", "progress", "quiet_others", "describe"]
