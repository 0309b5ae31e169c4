"""Where the time of one denoiser call goes: CUDA kernel time by kind, compiled bf16 vs compiled w8a8.

``--model sd``: the SD-v1.5-config UNet (RANDOM weights, see ``sd_random.py``), batch 2, 64x64
latents, 77 tokens, channels-last, bf16, and its naive W8A8 checkpoint (16-bit softmax, as
``bench_inference.py`` makes it); ``--model bundled``: the bundled model at batch ``--batch``, bf16,
and its tfmq W8A8 checkpoint (timing-only settings, DDIM 100, the step index held at the middle
step). ``torch.compile`` (``--compile-mode``) of the FP model in bf16, and of the checkpoint loaded
with the ``w8a8`` backend, once with the activation quantizers fused into the compiled graph
(``W8A8Backend.fuse_quantize``, default) and once as separate Triton quantize passes, and with the
``reference`` backend. Per configuration: the wall time of each of the first calls after
compilation (a CUDA-graph recording or a recompilation shows there), the call's wall time (CUDA
events, median), then ``torch.profiler`` over ``--calls`` calls: the kernel time per call summed by kind
(int8 conv / linear GEMMs, quantize passes, split-K reductions, attention, cuDNN / cuBLAS, Inductor's
fused kernels) and the top kernels. The gap between wall time and kernel time is idle GPU
(launch / host overhead). Prints tables, writes JSON::

    python benchmarks/profile_inference.py --json benchmarks/results/inference/profile_h200.json

On an H200 the SD bf16 configuration alone (pipeline, compile, timing, profile) took most of 290 s
and compiling the SD w8a8 one 270-350 s: run one SD w8a8 configuration a call.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import tfmq
from bench_inference import time_call
from sd_random import SD15_UNET_CONFIG, random_sd_pipeline
from tfmq.policy import POLICIES
from tfmq.runtime import compile_denoiser
from tfmq.runtime.backends import BACKENDS
from tfmq.runtime.guards import SkipGuardsAfterFirstCall
from tfmq.runtime.selection import backend_summary
from tfmq.runtime.layers import runtime_layers
from tfmq.sampling import SamplerConfig
from results_io import write_results

KINDS = [  # (kind, substrings of the kernel name), first match wins
    ("int8 conv GEMM", ("_int8_conv",)),
    ("int8 linear GEMM", ("_int8_linear",)),
    ("int8 quantize pass", ("_quant_kernel",)),
    ("W8A16 conv GEMM", ("_w8_conv",)),
    ("split-K reduce", ("_splitk_reduce",)),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("cuDNN conv", ("conv", "implicit", "cudnn", "nchw", "nhwc")),
    ("cuBLAS GEMM", ("gemm", "sm90", "sm80", "cutlass", "xmma", "nvjet", "cublas")),
    ("Inductor fused", ("triton_",)),
]


def kind_of(name: str) -> str:
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


HOST_LAUNCHES = {"cudaGraphLaunch": "graph launches", "cudaLaunchKernel": "kernel launches",
                 "cuLaunchKernel": "kernel launches", "cuLaunchKernelEx": "kernel launches",
                 "cudaLaunchKernelExC": "kernel launches"}


def kernel_times(fn, calls: int) -> dict[str, dict]:
    """Per kernel name: total device microseconds and count over ``calls`` profiled calls; under
    the key ``"host"``, the host-side launch calls per call (CUDA-graph replays vs single kernel
    launches: a compiled graph that CUDA graphs really replay shows graph launches and few
    kernel launches)."""
    from torch.profiler import ProfilerActivity, profile
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    out: dict[str, dict] = defaultdict(lambda: {"us": 0.0, "count": 0})
    host: dict[str, float] = defaultdict(float)
    for evt in prof.key_averages():
        if evt.key in HOST_LAUNCHES:
            host[HOST_LAUNCHES[evt.key]] += evt.count / calls
            continue
        if getattr(evt, "device_type", None) not in (None, torch.autograd.DeviceType.CUDA):
            continue                                   # host-side events: their kernels are counted
        us = getattr(evt, "self_device_time_total", None)
        if us is None:
            us = getattr(evt, "self_cuda_time_total", 0.0)
        if us and evt.count:
            out[evt.key]["us"] += float(us)
            out[evt.key]["count"] += int(evt.count)
    return {"kernels": dict(out), "host": dict(host), "gaps": gap_stats(prof, calls)}


GAP_BINS = [(0, 2), (2, 5), (5, 20), (20, 100), (100, float("inf"))]


def gap_stats(prof, calls: int) -> dict:
    """Where the GPU idles between device activities (kernels, memcpy, memset) of the profiled
    calls, in trace order: the idle microseconds a call by gap size, and summed by the activity
    before and the one after the gap (the activity that waited, or made the next one wait)."""
    cuda = torch.autograd.DeviceType.CUDA
    evs = sorted((e for e in prof.events() if getattr(e, "device_type", None) == cuda),
                 key=lambda e: e.time_range.start)
    bins = {f"{lo}-{hi} us": {"count": 0.0, "us": 0.0} for lo, hi in GAP_BINS}
    before: dict[str, float] = defaultdict(float)
    after: dict[str, float] = defaultdict(float)
    end, prev = None, None
    for e in evs:
        if end is not None and e.time_range.start > end:
            g = e.time_range.start - end
            for lo, hi in GAP_BINS:
                if lo <= g < hi:
                    b = bins[f"{lo}-{hi} us"]
                    b["count"] += 1 / calls
                    b["us"] += g / calls
            after[prev] += g / calls
            before[e.name] += g / calls
        end = e.time_range.end if end is None else max(end, e.time_range.end)
        prev = e.name
    top = lambda d: [{"name": n, "idle_us_per_call": v} for n, v in sorted(d.items(), key=lambda kv: -kv[1])[:10]]
    return {"bins": bins, "after": top(after), "before": top(before),
            "activities_per_call": len(evs) / calls}


def summarise(label: str, wall_ms: float, profiled: dict, calls: int) -> dict:
    kernels, host = profiled["kernels"], profiled["host"]
    by_kind: dict[str, float] = defaultdict(float)
    for name, v in kernels.items():
        by_kind[kind_of(name)] += v["us"] / calls / 1000
    total = sum(by_kind.values())
    launches = sum(v["count"] for v in kernels.values()) / calls
    top = sorted(kernels.items(), key=lambda kv: -kv[1]["us"])[:25]
    print(f"\n== {label}: wall {wall_ms:.3f} ms per call, kernels {total:.3f} ms "
          f"(idle {wall_ms - total:.3f} ms), {launches:.0f} kernels a call "
          f"({1000 * (wall_ms - total) / max(launches, 1):.1f} us idle a kernel)")
    print("   host launch calls per call: " + (", ".join(f"{v:.1f} {k}" for k, v in sorted(host.items()))
                                                   or "none recorded"))
    gaps = profiled.get("gaps")
    if gaps:
        print(f"   device activities a call {gaps['activities_per_call']:.0f}; idle gaps a call by size: "
              + ", ".join(f"{k}: {v['count']:.0f} / {v['us']:.0f} us" for k, v in gaps["bins"].items()))
        for side in ("after", "before"):
            print(f"   idle us a call {side} (top):")
            for row in gaps[side][:6]:
                print(f"     {row['idle_us_per_call']:8.1f}  {row['name'][:100]}")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"   {kind:22s} {ms:8.3f} ms  {100 * ms / max(total, 1e-9):5.1f}%")
    print("   top kernels (ms per call, launches per call):")
    for name, v in top:
        print(f"     {v['us'] / calls / 1000:7.3f}  {v['count'] / calls:5.1f}  {name[:110]}")
    return {"config": label, "wall_ms": wall_ms, "kernel_ms": total, "by_kind_ms": dict(by_kind),
            "kernels_per_call": launches, "host_launches_per_call": host, "gaps": profiled.get("gaps"),
            "top": [{"name": n, "ms_per_call": v["us"] / calls / 1000, "launches_per_call": v["count"] / calls}
                    for n, v in top]}


T0 = time.perf_counter()


def stage(msg: str) -> None:
    """Progress with elapsed seconds (a run stopped by a time limit shows where its time went)."""
    print(f"[{time.perf_counter() - T0:7.1f} s] {msg}", flush=True)


def save(out: dict, path: Path) -> None:
    write_results(out, path, quiet=True)


def sd_case(args, work: Path) -> dict:
    """The SD-v1.5-config UNet (RANDOM weights), batch ``--sd-batch`` (2), ``--sd-latent``
    (64x64) latents, bf16, channels_last; naive W8A8 with ``--softmax-bits`` probabilities (16 as
    bench_inference makes it: flash attention; 8: the fused quantized-probability kernel)."""
    from diffusers import UNet2DConditionModel
    dev = args.device
    pipe = random_sd_pipeline(work).to(dev)
    stage("random SD-v1.5-config pipeline built")
    b, size = args.sd_batch, args.sd_latent
    ctx = torch.randn(b, 77, 768, device=dev, dtype=torch.bfloat16)
    x = torch.randn(b, 4, size, size, device=dev, dtype=torch.bfloat16).to(memory_format=torch.channels_last)
    t = torch.full((b,), 500, device=dev, dtype=torch.long)

    def fp_bf16():
        ub = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().to(dev, torch.bfloat16)
        ub.load_state_dict(pipe.unet.state_dict())
        return ub.to(memory_format=torch.channels_last)
    cfg = tfmq.QuantConfig.for_method("naive", wbits=8, abits=8, softmax_bits=args.softmax_bits, calib_size=2,
                                      sampler=SamplerConfig("ddim", 4), prompts=["a photo"],
                                      layer_policy=args.policy, weight_symmetric=args.weight_symmetric)
    return {"model": f"UNet2DConditionModel, SD v1.5 config, RANDOM weights, batch {b}, {size}x{size} latents, "
                     "77 tokens, bf16, channels_last", "pipe": pipe, "fp_bf16": fp_bf16, "config": cfg,
            "inputs": (x, t, ctx), "channels_last": True, "mid_step": None}


def bundled_case(args, work: Path) -> dict:
    """The bundled Fashion-MNIST DDPM (trained weights), batch ``--batch``, bf16; tfmq W8A8 at
    timing-only settings (no reconstruction iterations), DDIM 100: per-step activation parameters,
    the step index held at the middle step."""
    dev = args.device
    pipe = tfmq.load_pipeline(tfmq.default_model_path(), dev)
    stage("bundled pipeline loaded")
    c = pipe.unet.config
    sampler = SamplerConfig("ddim", 100)
    ts = [int(v) for v in tfmq.sampling.sampler_timesteps(pipe, sampler)]
    x = torch.randn(args.batch, c.in_channels, c.sample_size, c.sample_size, device=dev, dtype=torch.bfloat16)
    t = torch.full((args.batch,), ts[len(ts) // 2], device=dev, dtype=torch.long)
    cfg = tfmq.QuantConfig.for_method("tfmq", wbits=8, abits=8, calib_size=32, sampler=sampler, recon_iters=0,
                                      act_learn_iters=0, tiar_iters=0, layer_policy=args.policy,
                                      weight_symmetric=args.weight_symmetric)
    return {"model": f"bundled Fashion-MNIST DDPM (trained), batch {args.batch}, bf16", "pipe": pipe,
            "fp_bf16": lambda: tfmq.load_pipeline(tfmq.default_model_path(), dev, torch.bfloat16).unet,
            "config": cfg, "inputs": (x, t), "channels_last": False, "mid_step": len(ts) // 2}


def cudagraph_skips() -> int:
    """Inductor's count of compiled graphs it ran WITHOUT CUDA graphs (reduce-overhead mode)."""
    from torch._dynamo.utils import counters
    return int(counters["inductor"]["cudagraph_skips"])


def timed_first_calls(fn, n: int = 3) -> list[float]:
    """Wall seconds of each of the first ``n`` calls after compilation, one by one (a CUDA-graph
    recording or a recompilation shows as one long call; a slow steady state as all long)."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
        stage(f"call {i + 2} took {out[-1]:.3f} s")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--model", default="sd", choices=["sd", "bundled"],
                   help="sd: the SD-v1.5-config UNet (random weights, batch 2); bundled: the bundled model")
    p.add_argument("--batch", type=int, default=250, help="batch of the bundled model")
    p.add_argument("--sd-batch", type=int, default=2, help="batch of the SD UNet (default 2: one image with guidance)")
    p.add_argument("--sd-latent", type=int, default=64,
                   help="latent size of the SD UNet's input (default 64: 512 px; 128: 1024 px, SDXL's resolution)")
    p.add_argument("--device", default="cuda", help="a CUDA device (the timings are CUDA events)")
    p.add_argument("--calls", type=int, default=5, help="profiled calls per configuration")
    p.add_argument("--iters", type=int, default=30, help="timed calls per configuration")
    p.add_argument("--configs", default="bf16,w8a8-fused,w8a8-pass",
                   help="comma-separated: bf16, bf16-skip-guards (Dynamo's guards skipped after the first "
                        "call, as the runtime does), w8a8-fused, w8a8-pass, reference (the reference backend)")
    p.add_argument("--full-guards", action="store_true",
                   help="compile the quantized denoisers with skip_guards=False (every call checks Dynamo's "
                        "guards; the runtime's default skips them after a signature's first call)")
    p.add_argument("--policy", default="tfmq-official", choices=sorted(POLICIES),
                   help="layer policy of the W8A8 checkpoint: tfmq-official keeps resnet conv1 inputs in full "
                        "precision (those convs then run the reference path); 'all' makes every layer int8")
    p.add_argument("--softmax-bits", type=int, default=16, choices=[8, 16],
                   help="SD: bits of the attention probabilities (16, the default here: flash attention; 8, "
                        "calibration's default: the fused quantized-probability kernel)")
    p.add_argument("--weight-symmetric", action="store_true",
                   help="calibrate the W8A8 checkpoint with symmetric weight grids (zero-points 0): the w8a8 "
                        "GEMMs then need no activation sums, so their quantizers are elementwise")
    p.add_argument("--temporal-table", action="store_true",
                   help="load the quantized denoisers with their temporal block replaced by the table of its "
                        "outputs (tfmq.load(..., temporal_table=True)): the time embedding and temporal "
                        "projections leave the graph")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for every configuration, e.g. "
                                                         "reduce-overhead (CUDA graphs); default: torch's default")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: this profile times CUDA kernels; no CUDA GPU here", file=sys.stderr)
        return 2
    dev = args.device
    wanted = args.configs.split(",")
    unknown = set(wanted) - {"bf16", "bf16-skip-guards", "w8a8-fused", "w8a8-pass", "reference"}
    if unknown:
        p.error(f"unknown configs: {', '.join(sorted(unknown))}")
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "settings": vars(args) | {"json": str(args.json)}, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        case = (sd_case if args.model == "sd" else bundled_case)(args, work)
        out["model"] = case["model"]
        inputs = case["inputs"]
        for label in [w for w in ("bf16", "bf16-skip-guards") if w in wanted]:
            fp = case["fp_bf16"]()
            if label == "bf16":                    # as a user compiles a model: every call checks the guards
                comp = torch.compile(fp, mode=args.compile_mode)
            else:                                  # the runtime's way (compile_denoiser): forward compiled,
                fp.forward = SkipGuardsAfterFirstCall(torch.compile(fp.forward, mode=args.compile_mode))
                comp = fp                          # guards skipped after a signature's first call
            with torch.no_grad():
                fn = lambda: comp(*inputs).sample          # noqa: E731
                fn()
                stage(f"{label} compiled (first call done)")
                first = timed_first_calls(fn)
                wall = time_call(fn, args.iters, 3)["median_ms"]
                stage(f"{label} timed; CUDA-graph skips so far: {cudagraph_skips()}")
                name = "bf16 torch.compile" + (", guards skipped after the first call" if label != "bf16" else "")
                out["rows"].append(summarise(name, wall, kernel_times(fn, args.calls), args.calls)
                                   | {"first_calls_s": first})
                save(out, args.json)
            del comp, fp
            torch._dynamo.reset()                  # the next model's guards are checked alone
            torch.cuda.empty_cache()
        pipe = case["pipe"]
        tfmq.quantize(pipe, case["config"], progress=False)
        ckpt = tfmq.save(pipe, work / "w8a8", overwrite=True)
        stage(f"W8A8 ({case['config'].method}) calibrated and saved")
        del pipe, case["pipe"]
        torch.cuda.empty_cache()
        backend = BACKENDS["w8a8"]
        runs = (("w8a8-fused", "w8a8", True), ("w8a8-pass", "w8a8", False), ("reference", "reference", True))
        for label, backend_name, fuse in runs:
            if label not in wanted:
                continue
            backend.fuse_quantize = fuse
            q = tfmq.load(ckpt, dev, torch.bfloat16, backend=backend_name, temporal_table=args.temporal_table).unet
            if case["channels_last"]:
                q = q.to(memory_format=torch.channels_last)
            steps = getattr(q, "tfmq_steps", None)
            if steps is not None:                     # repeated mid-trajectory calls: hold the step index
                steps.set(case["mid_step"] if case["mid_step"] is not None else len(steps) // 2)
                steps.paused = True
            summary = backend_summary(q)
            fallback = [f"{n}: {l}" for n, l in runtime_layers(q).items() if not BACKENDS[backend_name].handles(l)]
            print(f"   {summary}; layers on the reference math: {len(fallback)}\n     " + "\n     ".join(fallback),
                  flush=True)
            compile_denoiser(q, mode=args.compile_mode, skip_guards=not args.full_guards)
            stage(f"{label} loaded")
            with torch.no_grad():
                fn = lambda: q(*inputs).sample              # noqa: E731
                fn()
                stage(f"{label} compiled (first call done)")
                first = timed_first_calls(fn)
                wall = time_call(fn, args.iters, 3)["median_ms"]
                stage(f"{label} timed: {wall:.3f} ms a call; CUDA-graph skips so far: {cudagraph_skips()}")
                out["rows"].append({"config": f"{label} (timing only, profile pending)", "wall_ms": wall,
                                    "first_calls_s": first})
                save(out, args.json)
                name = {"w8a8-fused": "w8a8 compiled, quantize fused in the graph",
                        "w8a8-pass": "w8a8 compiled, quantize as Triton passes",
                        "reference": "reference backend compiled"}[label] + (", full guards" if args.full_guards else "") \
                    + (", temporal table" if args.temporal_table else "") \
                    + (", symmetric weights" if args.weight_symmetric else "") \
                    + (f", {args.softmax_bits}-bit probabilities" if args.model == "sd" and args.softmax_bits != 16 else "")
                out["rows"].pop()
                out["rows"].append(summarise(name, wall, kernel_times(fn, args.calls), args.calls)
                                   | {"backend_summary": summary, "reference_math_layers": fallback,
                                      "first_calls_s": first})
                save(out, args.json)
            del q
            torch._dynamo.reset()
            torch.cuda.empty_cache()
        backend.fuse_quantize = True
    save(out, args.json)
    print(f"\n{'config':55s} {'wall ms':>9s} {'kernel ms':>10s}")
    for r in out["rows"]:
        print(f"{r['config']:55s} {r['wall_ms']:9.3f} {r.get('kernel_ms', float('nan')):10.3f}")
    print("written", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
