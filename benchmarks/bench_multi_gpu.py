"""Several GPUs (issue 13): sampling throughput and calibration time on 1 vs N processes, and the
equality of their results.

For each model (the bundled ``fmnist-ddpm``, and a UNet2DModel with google/ddpm-cifar10-32's
config and RANDOM weights, see benchmarks/bench_calibration.py) and each process count (1 and
``--nproc``), this script launches ``torchrun --standalone --nproc_per_node P`` on itself in worker
mode and times:

* ``sample``: ``--num-images`` images, DDIM ``--steps``, batch ``--batch-size``, split by rank
  (whole batches; sample i keeps seed ``seed + i``) and gathered in order; timed after a warm-up,
  from a barrier to the gathered result on rank 0;
* ``quantize``: ``tfmq.quantize`` with the tfmq method at reduced iterations (``--recon-iters`` ...),
  calibration data / activation ranges / reconstruction rows split by rank; the wall time of the
  whole call and of each stage.

Then it compares the results of 1 and N processes: the images (``np.array_equal``, else the
number of differing pixels and the largest difference) and every tensor of the two checkpoints
(equal, else how many elements differ and by how much); with ``--repeat-one`` also two 1-process
runs (the run-to-run spread), and with ``--compare-outputs N`` the samples of the FP model and of
every checkpoint (same noise): the N-process result is "equal" when it is as close to the 1-process
one as a second 1-process run is, both far inside the quantization error. It prints a table and writes it with
everything else as JSON (``--json``).

GPU (one host, NCCL; the lead runs scripts/gpu_multi_check.sh)::

    python benchmarks/bench_multi_gpu.py --device cuda --nproc 2 --json OUT/bench_multi_gpu.json

CPU smoke test (gloo, tiny settings)::

    OMP_NUM_THREADS=1 python benchmarks/bench_multi_gpu.py --device cpu --nproc 2 --models fmnist-ddpm \\
        --num-images 8 --batch-size 2 --steps 4 --calib-size 4 --calib-batch-size 2 --recon-iters 2 \\
        --tiar-iters 2 --act-iters 1 --json /tmp/bench_multi.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tfmq.choices import RECON_PARALLEL_MODES   # names only: no torch import

HERE = Path(__file__).resolve().parent
MODELS = ("fmnist-ddpm", "cifar10-random")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--nproc", type=int, default=2, help="processes (GPUs) of the parallel runs (default 2)")
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {', '.join(MODELS)}")
    p.add_argument("--tasks", default="sample,quantize", help="comma-separated: sample, quantize")
    p.add_argument("--num-images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps of sampling and calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calib-size", type=int, default=256)
    p.add_argument("--calib-batch-size", type=int, default=64)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=8)
    p.add_argument("--recon-iters", type=int, default=200)
    p.add_argument("--recon-batch-size", type=int, default=32)
    p.add_argument("--tiar-iters", type=int, default=200)
    p.add_argument("--act-iters", type=int, default=50)
    p.add_argument("--calib-defaults", action="store_true",
                   help="quantize with the project's default calibration settings (DDIM 100, 256 "
                        "trajectories, 2,000 / 500 / 2,000 iterations; only --wbits / --abits / --seed "
                        "apply) instead of the reduced ones above")
    p.add_argument("--recon-parallel", default="auto", choices=RECON_PARALLEL_MODES,
                   help="QuantConfig.recon_parallel of the multi-process quantize runs (default auto)")
    p.add_argument("--deterministic", action="store_true",
                   help="quantize with torch.use_deterministic_algorithms (and deterministic cuDNN): "
                        "without it the GPU's atomics-based kernels make even two 1-GPU runs differ")
    p.add_argument("--repeat-one", action="store_true",
                   help="quantize: launch the 1-process job a second time; the two 1-process checkpoints' "
                        "difference is the run-to-run spread the N-process result is judged against (on a "
                        "machine with 2+ GPUs the two 1-process runs go side by side on GPUs 0 and 1)")
    p.add_argument("--compare-outputs", type=int, default=0, metavar="N",
                   help="quantize: sample N images (the calibrated sampler, seeds 0..N-1) with the FP "
                        "model and with every checkpoint on the first GPU, and report the outputs' "
                        "pairwise PSNR and relative L2 (0: only compare tensors)")
    p.add_argument("--work", type=Path, default=None, help="folder for checkpoints / images (default: a temp folder)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    p.add_argument("--timeout", type=int, default=900, help="seconds per torchrun launch")
    # worker mode (set by the driver)
    p.add_argument("--worker", choices=["sample", "quantize"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---- worker -----------------------------------------------------------------------------------
def build_pipeline(model: str, device: str, seed: int = 0):
    import torch
    if model == "fmnist-ddpm":
        from tfmq.api import default_model_path, load_pipeline
        return load_pipeline(default_model_path(), device)
    if model == "cifar10-random":
        sys.path.insert(0, str(HERE))
        from bench_calibration import build_pipeline as cifar
        with torch.random.fork_rng():
            return cifar(seed, device)
    raise ValueError(f"unknown model {model!r}")


def _sync(device: str) -> None:
    import torch
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args) -> None:
    import numpy as np
    import torch

    import tfmq
    from tfmq import distributed
    from tfmq.models.adapter import get_denoiser
    from tfmq.sampling import SamplerConfig, generate

    if args.deterministic:
        tfmq.use_deterministic_algorithms()
    device = distributed.setup(args.device)
    if args.device == "cpu":
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    pipe = build_pipeline(args.model, device)
    sampler = SamplerConfig("ddim", args.steps)
    out: dict = {"model": args.model, "processes": distributed.world_size(), "device": device,
                 "parameters": sum(p.numel() for p in get_denoiser(pipe).parameters())}
    if args.worker == "sample":
        generate(pipe, SamplerConfig("ddim", 2), min(args.batch_size, 8), args.batch_size, args.seed,
                 progress=False)                                    # warm-up (kernels, allocator)
        part = distributed.shard(args.num_images, align=args.batch_size) if distributed.is_distributed() else None
        distributed.barrier()
        _sync(device)
        t0 = time.perf_counter()
        images = generate(pipe, sampler, args.num_images, args.batch_size, args.seed, progress=False,
                          indices=part)
        _sync(device)
        local_s = time.perf_counter() - t0
        images = distributed.gather_rows(images)
        seconds = time.perf_counter() - t0
        out.update({"seconds": seconds, "local_seconds": distributed.gather_objects(local_s),
                    "images": len(images), "images_per_s": len(images) / seconds,
                    "steps": args.steps, "batch_size": args.batch_size})
        if distributed.is_main():
            np.save(args.result.with_suffix(".npy"), images)
    else:
        from tfmq.config import QuantConfig
        if args.calib_defaults:
            config = QuantConfig.for_method("tfmq", wbits=args.wbits, abits=args.abits, seed=args.seed,
                                            recon_parallel=args.recon_parallel)
        else:
            config = QuantConfig.for_method(
                "tfmq", wbits=args.wbits, abits=args.abits, sampler=sampler, calib_size=args.calib_size,
                calib_batch_size=args.calib_batch_size, seed=args.seed, recon_iters=args.recon_iters,
                recon_batch_size=args.recon_batch_size, tiar_iters=args.tiar_iters,
                act_learn_iters=args.act_iters, interval_length=max(1, args.steps // 5),
                recon_parallel=args.recon_parallel)
        distributed.barrier()
        _sync(device)
        t0 = time.perf_counter()
        tfmq.quantize(pipe, config, progress=False)
        _sync(device)
        seconds = time.perf_counter() - t0
        info = get_denoiser(pipe).tfmq_info
        out.update({"seconds": seconds, "stages_s": info["calibration_time"]["stages_s"],
                    "config": config.to_dict()})
        if distributed.is_main():
            tfmq.save(pipe, args.result.with_suffix(".ckpt"), overwrite=True)
    if distributed.is_main():
        out["device_name"] = torch.cuda.get_device_name(device) if device.startswith("cuda") else (platform.processor() or platform.machine())
        args.result.write_text(json.dumps(out, indent=2))
    distributed.shutdown()


# ---- driver -----------------------------------------------------------------------------------
def launch(args, task: str, model: str, nproc: int, work: Path, tag: str = "", gpus: str | None = None) -> dict:
    result = work / f"{task}-{model}-p{nproc}{tag}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(Path(__file__).resolve()), "--worker", task, "--model", model, "--result", str(result)]
    for flag in ("device", "num_images", "batch_size", "steps", "seed", "calib_size", "calib_batch_size",
                 "wbits", "abits", "recon_iters", "recon_batch_size", "tiar_iters", "act_iters",
                 "recon_parallel"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += [f for f, on in (("--calib-defaults", args.calib_defaults),
                            ("--deterministic", args.deterministic)) if on]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "4" if args.device == "cuda" else "1")
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
        res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)          # torchrun and its workers
        proc.communicate()
        if not result.exists():
            raise
        # the work finished and rank 0 wrote its result, but the launch did not end in time (e.g.
        # a process group shutdown that waits): keep the timed result and say so
        data = json.loads(result.read_text())
        data["launch_s"] = None
        data["exit"] = f"result written; the launch did not exit within {args.timeout} s"
        print(f"  {task:8s} {model:15s} {nproc} proc: {data['seconds']:.2f} s ({data['exit']})",
              file=sys.stderr, flush=True)
        return data
    if res.returncode != 0 or not result.exists():
        raise RuntimeError(f"{task} {model} on {nproc} process(es) failed (exit {res.returncode}):\n"
                           f"{res.stdout[-2000:]}\n{res.stderr[-6000:]}")
    data = json.loads(result.read_text())
    data["launch_s"] = time.perf_counter() - t0
    print(f"  {task:8s} {model:15s} {nproc} proc: {data['seconds']:.2f} s (launch {data['launch_s']:.1f} s)",
          file=sys.stderr, flush=True)
    return data


def compare_images(a_path: Path, b_path: Path) -> dict:
    import numpy as np
    a, b = np.load(a_path), np.load(b_path)
    if a.shape != b.shape:
        return {"equal": False, "note": f"shapes differ: {a.shape} vs {b.shape}"}
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return {"equal": bool(np.array_equal(a, b)), "images": int(len(a)),
            "differing_pixels": int((diff > 0).sum()), "max_abs_diff": int(diff.max()) if diff.size else 0}


def compare_checkpoints(a_dir: Path, b_dir: Path) -> dict:
    import torch
    from safetensors.torch import load_file
    a = load_file(str(a_dir / "tfmq_denoiser.safetensors"))
    b = load_file(str(b_dir / "tfmq_denoiser.safetensors"))
    if a.keys() != b.keys():
        return {"equal": False, "note": "different tensor names"}
    differing, worst = {}, 0.0
    for k in a:
        if not torch.equal(a[k], b[k]):
            d = (a[k].double() - b[k].double()).abs()
            rel = float(d.max() / a[k].double().abs().max().clamp_min(1e-30))
            differing[k] = {"elements": int((d > 0).sum()), "of": d.numel(), "max_abs": float(d.max()),
                            "max_rel": rel}
            worst = max(worst, rel)
    return {"equal": not differing, "tensors": len(a), "differing_tensors": len(differing),
            "max_rel_diff": worst, "differing": dict(list(differing.items())[:20])}


def _psnr_rel(a, b) -> dict:
    """PSNR (peak-to-peak 2 on the [-1, 1] clamped outputs) and relative L2 of two output batches."""
    import math
    a, b = a.clamp(-1, 1).double(), b.clamp(-1, 1).double()
    mse = float(((a - b) ** 2).mean())
    return {"psnr_db": math.inf if mse == 0 else 10 * math.log10(4.0 / mse),
            "rel_l2": float((a - b).norm() / a.norm().clamp_min(1e-30)),
            "max_abs": float((a - b).abs().max())}


def compare_outputs(args, model: str, config: dict, ckpts: dict[str, Path]) -> dict:
    """Sample ``args.compare_outputs`` images from the FP model and from each checkpoint (same
    noise, the calibrated sampler) and compare them pairwise: the quantization error (each
    checkpoint vs FP) is the scale against which 1-vs-N and 1-vs-1 differences are read."""
    import tfmq
    from tfmq.sampling import SamplerConfig, denoise
    device = "cuda:0" if args.device == "cuda" else "cpu"
    sampler = SamplerConfig(**config["sampler"])
    n, bs = args.compare_outputs, min(args.compare_outputs, 256)
    outs = {"fp": denoise(build_pipeline(model, device), sampler, n, bs, args.seed, progress=False).float().cpu()}
    for name, path in ckpts.items():
        outs[name] = denoise(tfmq.load(path, device), sampler, n, bs, args.seed, progress=False).float().cpu()
    names = list(outs)
    pairs = {f"{x} vs {y}": _psnr_rel(outs[x], outs[y]) for i, x in enumerate(names) for y in names[i + 1:]}
    return {"images": n, "sampler": config["sampler"], "pairs": pairs}


def driver(args) -> dict:
    import torch
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs, {torch.cuda.device_count()} visible")
    work = args.work or Path(tempfile.mkdtemp(prefix="tfmq-bench-multi-"))
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows, checks = [], []
    for task in tasks:
        for model in models:
            repeat = task == "quantize" and args.repeat_one
            side_by_side = repeat and args.device == "cuda" and torch.cuda.device_count() >= 2
            again = None
            if side_by_side:
                # the two 1-process runs side by side, one on each of the first two GPUs
                from concurrent.futures import ThreadPoolExecutor
                with ThreadPoolExecutor(2) as pool:
                    first = pool.submit(launch, args, task, model, 1, work, "", "0")
                    second = pool.submit(launch, args, task, model, 1, work, "-again", "1")
                    runs = {1: first.result()}
                    again = second.result()
            else:
                runs = {1: launch(args, task, model, 1, work)}
                if repeat:
                    again = launch(args, task, model, 1, work, tag="-again")
            runs[args.nproc] = launch(args, task, model, args.nproc, work)
            one, many = runs[1], runs[args.nproc]
            rows.append({"task": task, "model": model, "parameters": one["parameters"],
                         "seconds_1": one["seconds"], f"seconds_{args.nproc}": many["seconds"],
                         "speedup": one["seconds"] / many["seconds"],
                         "images_per_s_1": one.get("images_per_s"), f"images_per_s_{args.nproc}": many.get("images_per_s"),
                         "stages_s_1": one.get("stages_s"), f"stages_s_{args.nproc}": many.get("stages_s"),
                         "device_name": one.get("device_name")})
            stem = lambda p: work / f"{task}-{model}-p{p}"  # noqa: E731
            if task == "sample":
                check = compare_images(stem(1).with_suffix(".npy"), stem(args.nproc).with_suffix(".npy"))
            else:
                check = compare_checkpoints(stem(1).with_suffix(".ckpt"), stem(args.nproc).with_suffix(".ckpt"))
                ckpts = {"1 proc": stem(1).with_suffix(".ckpt"), f"{args.nproc} proc": stem(args.nproc).with_suffix(".ckpt")}
                if again is not None:
                    rows[-1].update(seconds_1_again=again["seconds"], one_process_runs_side_by_side=side_by_side)
                    ckpts["1 proc again"] = work / f"{task}-{model}-p1-again.ckpt"
                    check["one_vs_one"] = compare_checkpoints(ckpts["1 proc"], ckpts["1 proc again"])
                if args.compare_outputs:
                    check["outputs"] = compare_outputs(args, model, one["config"], ckpts)
            checks.append({"task": task, "model": model, **check})
            if args.json:           # what is finished survives a later failure or time limit
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps({"partial": True, "rows": rows, "equality": checks}, indent=2))
    result = {"device": args.device, "device_name": rows[0]["device_name"] if rows else None,
              "nproc": args.nproc, "torch": torch.__version__, "python": platform.python_version(),
              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                           if k not in ("worker", "model", "result")},
              "rows": rows, "equality": checks, "total_s": time.perf_counter() - t_start,
              "work": str(work)}
    return result


def table(result: dict) -> str:
    n = result["nproc"]
    lines = [f"device: {result['device_name']} ({result['device']}), torch {result['torch']}, 1 vs {n} processes",
             "", f"| task | model | 1 proc (s) | {n} proc (s) | speed-up | images/s 1 -> {n} |",
             "|---|---|---:|---:|---:|---|"]
    for r in result["rows"]:
        ips = (f"{r['images_per_s_1']:.1f} -> {r[f'images_per_s_{n}']:.1f}" if r["images_per_s_1"] else "")
        again = f" (again {r['seconds_1_again']:.2f})" if r.get("seconds_1_again") else ""
        lines.append(f"| {r['task']} | {r['model']} | {r['seconds_1']:.2f}{again} | {r[f'seconds_{n}']:.2f} | "
                     f"{r['speedup']:.2f}x | {ips} |")
    lines += ["", f"| equality 1 vs {n} | model | equal | detail |", "|---|---|---|---|"]
    for c in result["equality"]:
        if c["task"] == "sample":
            detail = f"{c.get('images')} images, {c.get('differing_pixels')} pixels differ (max {c.get('max_abs_diff')})"
        else:
            detail = (f"{c.get('differing_tensors')} of {c.get('tensors')} tensors differ "
                      f"(max relative {c.get('max_rel_diff', 0):.3g})")
        lines.append(f"| {c['task']} | {c['model']} | {c['equal']} | {c.get('note', detail)} |")
        if "one_vs_one" in c:
            o = c["one_vs_one"]
            lines.append(f"| {c['task']} | {c['model']} (1 vs 1 again) | {o['equal']} | "
                         f"{o.get('differing_tensors')} of {o.get('tensors')} tensors differ "
                         f"(max relative {o.get('max_rel_diff', 0):.3g}) |")
    for c in result["equality"]:
        if "outputs" in c:
            o = c["outputs"]
            lines += ["", f"outputs of {c['model']}: {o['images']} samples, sampler {o['sampler']}, same noise",
                      "| pair | PSNR (dB) | relative L2 | max abs |", "|---|---:|---:|---:|"]
            lines += [f"| {k} | {v['psnr_db']:.2f} | {v['rel_l2']:.4g} | {v['max_abs']:.3g} |"
                      for k, v in o["pairs"].items()]
    for r in result["rows"]:
        if r.get("stages_s_1"):
            lines.append(f"\nstages {r['model']} (s), 1 proc: {r['stages_s_1']}\n"
                         f"stages {r['model']} (s), {n} proc: {r[f'stages_s_{n}']}")
    lines.append(f"\ntotal {result['total_s']:.0f} s")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    result = driver(args)
    text = table(result)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
        args.json.with_suffix(".md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
