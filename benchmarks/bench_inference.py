"""Inference benchmark: per-call latency and memory of the quantized runtime vs FP.

Models:
  (a) the bundled Fashion-MNIST DDPM (trained weights), batch 256;
  (b) a UNet2DConditionModel with Stable Diffusion v1.5's config (RANDOM weights, seeded; timings
      depend on shapes, not weights), batch 2, 64x64 latents, 77-token context, channels-last;
plus the sampling wall time of 1000 bundled-model images (DDIM 100) and the PSNR of every
backend's final images vs the ``reference`` backend's (same noise).

Quantized models are calibrated in the run with tfmq W8A8 / W4A8 at timing-only settings (no
reconstruction iterations: the speed and memory of a layer do not depend on how its integer
codes were chosen); the SD UNet uses naive W8A8 with 16-bit softmax outputs (as Q-Diffusion does
for Stable Diffusion). Every row says what it measured; a configuration that fails is reported
with its error, never replaced by another.

    python benchmarks/bench_inference.py --device cuda --json benchmarks/results/inference_h100.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

import tfmq
from tfmq.runtime import backend_summary, runtime_nbytes
from tfmq.sampling import SamplerConfig
from sd_random import SD15_UNET_CONFIG, random_sd_pipeline
from results_io import pooled_psnr, write_results

PARTIAL: tuple | None = None      # (report, path) while a run is in progress


def time_call(fn, iters: int, warmup: int) -> dict:
    """Median / min per-call milliseconds (CUDA events) and peak memory during the calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "iters": iters,
            "resident_mb": base / 2**20, "peak_mb": torch.cuda.max_memory_allocated() / 2**20}


def cuda_graph(fn):
    """Capture ``fn`` (no arguments, fixed input tensors) in a CUDA graph; returns replay."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return (lambda: (g.replay(), out)[1]), out


def measure(rows, label, model, make_fn, iters, warmup, note=""):
    """Time ``make_fn()`` (-> a no-argument callable) and append a row; errors are rows too."""
    try:
        t0 = time.perf_counter()
        fn = make_fn()
        with torch.no_grad():
            r = time_call(fn, iters, warmup)
        r["setup_s"] = round(time.perf_counter() - t0, 1)
    except Exception as exc:  # report, never substitute
        r = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    r.update({"model": model, "config": label, "note": note})
    rows.append(r)
    if PARTIAL is not None:                    # written after every row: a killed run keeps its rows
        PARTIAL[1].write_text(json.dumps(PARTIAL[0], indent=2))
    print(f"  {model:10s} {label:38s} " + (f"{r['median_ms']:9.3f} ms  peak {r['peak_mb']:8.1f} MB"
                                            if "median_ms" in r else r["error"]), flush=True)
    return r


def timed_sampling(pipe, sampler: SamplerConfig, num_images: int, batch: int, label: str,
                   note: str = "") -> tuple[dict, np.ndarray]:
    """Wall time of ``tfmq.generate`` of ``num_images`` images (seed 0): a result row and the images."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    im = tfmq.generate(pipe, sampler, num_images, batch, seed=0, progress=False)
    torch.cuda.synchronize()
    row = {"config": label, "images": num_images, "seconds": time.perf_counter() - t0}
    return (row | {"note": note} if note else row), im


def ckpt_tensor_bytes(path: Path) -> int:
    from safetensors.torch import load_file
    return sum(t.numel() * t.element_size() for t in load_file(str(path / "tfmq_denoiser.safetensors")).values())


def bundled_checkpoints(args, work: Path, sampler: SamplerConfig, names=("w8a8", "w4a8")) -> dict[str, Path]:
    """tfmq W8A8 and W4A8 checkpoints of the bundled model at timing-only settings (no
    reconstruction iterations: a layer's speed does not depend on how its codes were chosen);
    ``w8a8-symw``: W8A8 with symmetric weight grids (the w8a8 GEMMs then need no activation sums)."""
    ckpts = {}
    for name in names:
        w = 4 if name.startswith("w4") else 8
        pipe = tfmq.load_pipeline(tfmq.default_model_path(), args.device)
        cfg = tfmq.QuantConfig.for_method("tfmq", wbits=w, abits=8, calib_size=args.calib_size, sampler=sampler,
                                          recon_iters=0, act_learn_iters=0, tiar_iters=0,
                                          weight_symmetric=name.endswith("symw"))
        tfmq.quantize(pipe, cfg, progress=False)
        ckpts[name] = tfmq.save(pipe, work / f"bundled-{name}", overwrite=True)
        del pipe
    return ckpts


def bundled(args, out: dict, work: Path) -> None:
    dev = args.device
    sampler = SamplerConfig("ddim", args.steps)
    fp = tfmq.load_pipeline(tfmq.default_model_path(), dev)
    unet = fp.unet
    c = unet.config
    x = torch.randn(args.batch, c.in_channels, c.sample_size, c.sample_size, device=dev)
    ts = [int(t) for t in tfmq.sampling.sampler_timesteps(fp, sampler)]
    t_mid = torch.full((args.batch,), ts[len(ts) // 2], device=dev, dtype=torch.long)
    rows = out["rows"]
    print("(a) bundled model, batch", args.batch)
    measure(rows, "fp32 eager", "bundled", lambda: (lambda: unet(x, t_mid).sample), args.iters, 3)
    ub = tfmq.load_pipeline(tfmq.default_model_path(), dev, torch.bfloat16).unet
    xb = x.to(torch.bfloat16)
    measure(rows, "bf16 eager", "bundled", lambda: (lambda: ub(xb, t_mid).sample), args.iters, 3)
    cb = torch.compile(ub)
    measure(rows, "bf16 torch.compile", "bundled", lambda: (lambda: cb(xb, t_mid).sample), args.iters, 3)
    ckpts = bundled_checkpoints(args, work, sampler)
    out["bundled_checkpoints"] = {k: {"tensor_bytes": ckpt_tensor_bytes(v)} for k, v in ckpts.items()}
    for ck, backend, dtype in (("w8a8", "reference", torch.float32), ("w8a8", "reference", torch.bfloat16),
                               ("w8a8", "w8a8", torch.bfloat16), ("w4a8", "weight-only", torch.bfloat16),
                               ("w4a8", "weight-only", torch.float32)):
        label = f"{ck} {backend} {str(dtype).replace('torch.', '')}"
        try:
            q = tfmq.load(ckpts[ck], dev, dtype, backend=backend).unet
        except Exception as exc:
            rows.append({"model": "bundled", "config": label, "error": f"{type(exc).__name__}: {exc}"})
            print("  ", label, "failed:", exc)
            continue
        xx = x.to(dtype)

        def step_fn(q=q, xx=xx):
            q.tfmq_steps.set(len(ts) // 2) if getattr(q, "tfmq_steps", None) is not None else None
            return lambda: q(xx, t_mid).sample
        r = measure(rows, label, "bundled", step_fn, args.iters, 3)
        r["runtime_bytes"] = runtime_nbytes(q)
        r["backend_summary"] = backend_summary(q)
        if backend == "w8a8":
            measure(rows, label + " + CUDA graph", "bundled", lambda q=q, xx=xx: cuda_graph(lambda: q(xx, t_mid).sample)[0],
                    args.iters, 3)
        del q
    # sampling wall time + PSNR vs the reference backend's images
    print("sampling", args.num_images, "images, DDIM", args.steps)
    imgs, samp = {}, []
    runs = [("fp32", None, None, torch.float32), ("w8a8 reference fp32", "w8a8", "reference", torch.float32),
            ("w8a8 w8a8 bf16", "w8a8", "w8a8", torch.bfloat16), ("w8a8 reference bf16", "w8a8", "reference", torch.bfloat16),
            ("w4a8 reference fp32", "w4a8", "reference", torch.float32),
            ("w4a8 weight-only fp32", "w4a8", "weight-only", torch.float32)]
    for label, ck, backend, dtype in runs:
        try:
            pipe = (tfmq.load_pipeline(tfmq.default_model_path(), dev, dtype) if ck is None
                    else tfmq.load(ckpts[ck], dev, dtype, backend=backend))
            r, imgs[label] = timed_sampling(pipe, sampler, args.num_images, args.sample_batch, label)
        except Exception as exc:
            r = {"config": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        samp.append(r)
        print("  ", r, flush=True)
    n = min(256, args.num_images)
    for r in samp:
        lab = r["config"]
        if lab in imgs and lab != "fp32":
            ref = "w8a8 reference fp32" if lab.startswith("w8a8") else "w4a8 reference fp32"
            if ref in imgs and ref != lab:
                r["psnr_vs_reference_db_first_256"] = pooled_psnr(imgs[lab][:n], imgs[ref][:n])
            r["psnr_vs_fp32_db"] = pooled_psnr(imgs[lab], imgs["fp32"]) if "fp32" in imgs else None
    out["sampling"] = samp


def bundled_compiled(args, out: dict, work: Path) -> None:
    """The bundled model's runtime backends with the forward compiled (torch.compile, fullgraph;
    hooks eager), per call and for sampling 1000 images, against FP32 eager and bf16 compiled."""
    from tfmq.runtime import compile_denoiser
    dev = args.device
    sampler = SamplerConfig("ddim", args.steps)
    rows = out["rows"]
    ckpts = bundled_checkpoints(args, work, sampler)
    fp = tfmq.load_pipeline(tfmq.default_model_path(), dev)
    c = fp.unet.config
    x = torch.randn(args.batch, c.in_channels, c.sample_size, c.sample_size, device=dev)
    ts = [int(t) for t in tfmq.sampling.sampler_timesteps(fp, sampler)]
    t_mid = torch.full((args.batch,), ts[len(ts) // 2], device=dev, dtype=torch.long)
    print("(a') bundled model, compiled runtime, batch", args.batch)
    for ck, backend, dtype in (("w8a8", "reference", torch.bfloat16), ("w4a8", "weight-only", torch.bfloat16),
                               ("w8a8", "w8a8", torch.bfloat16), ("w4a8", "weight-only", torch.float32)):
        label = f"{ck} {backend} {str(dtype).replace('torch.', '')} compiled"

        def make(ck=ck, backend=backend, dtype=dtype):
            q = tfmq.load(ckpts[ck], dev, dtype, backend=backend, compile=True).unet
            q.tfmq_steps.set(len(ts) // 2)
            xx = x.to(dtype)
            return lambda: q(xx, t_mid).sample
        measure(rows, label, "bundled", make, args.iters, 3)
    print("sampling", args.num_images, "images, DDIM", args.steps, "(compiled forwards)")
    imgs, samp = {}, []
    runs = [("fp32 eager", None, None, torch.float32, False), ("fp32 compiled", None, None, torch.float32, True),
            ("bf16 compiled", None, None, torch.bfloat16, True),
            ("w8a8 reference fp32 eager", "w8a8", "reference", torch.float32, False),
            ("w8a8 reference fp32 compiled", "w8a8", "reference", torch.float32, True),
            ("w8a8 w8a8 bf16 compiled", "w8a8", "w8a8", torch.bfloat16, True),
            ("w4a8 weight-only fp32 compiled", "w4a8", "weight-only", torch.float32, True)]
    for label, ck, backend, dtype, comp in runs:
        try:
            if ck is None:
                pipe = tfmq.load_pipeline(tfmq.default_model_path(), dev, dtype)
                if comp:
                    compile_denoiser(pipe.unet)
            else:
                pipe = tfmq.load(ckpts[ck], dev, dtype, backend=backend, compile=comp,
                                 temporal_table=label.endswith("temporal table"))
            tfmq.generate(pipe, sampler, args.sample_batch, args.sample_batch, seed=0, progress=False)  # warm
            r, imgs[label] = timed_sampling(pipe, sampler, args.num_images, args.sample_batch, label,
                                            "after one warm-up batch (compilation excluded)")
        except Exception as exc:
            r = {"config": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        samp.append(r)
        print("  ", r, flush=True)
    n = min(256, args.num_images)
    ref = "w8a8 reference fp32 eager"
    for r in samp:
        lab = r["config"]
        if lab in imgs and ref in imgs and lab.startswith("w8a8"):
            r["psnr_vs_w8a8_reference_db_first_256"] = pooled_psnr(imgs[lab][:n], imgs[ref][:n])
        if lab in imgs and "fp32 eager" in imgs:
            r["psnr_vs_fp32_db"] = pooled_psnr(imgs[lab], imgs["fp32 eager"])
    out["sampling_compiled"] = samp


def compare_images(samp: list, imgs: dict, n: int) -> None:
    """Fill in each sampled configuration's PSNR vs the FP32 eager images and, for the w8a8 checkpoint's
    configurations, its PSNR and largest pixel difference vs that checkpoint's ``reference`` fp32 images
    on the first ``n`` (the same noise), for the images sampled so far."""
    ref = "w8a8 reference fp32 eager"
    for r in samp:
        lab = r["config"]
        if lab not in imgs:
            continue
        if "fp32 eager" in imgs and lab != "fp32 eager":
            r["psnr_vs_fp32_eager_db"] = pooled_psnr(imgs[lab], imgs["fp32 eager"])
        if lab.startswith("w8a8 ") and lab != ref and ref in imgs:
            r["psnr_vs_w8a8_reference_fp32_db_first_256"] = pooled_psnr(imgs[lab][:n], imgs[ref][:n])
            d = np.abs(imgs[lab][:n].astype(np.int16) - imgs[ref][:n].astype(np.int16))
            r["max_abs_diff_vs_w8a8_reference_fp32_first_256"] = int(d.max())


_RO = "reduce-overhead"
# bundled-graphs: (label, checkpoint, backend, dtype, torch.compile: False / True / a mode)
GRAPH_CONFIGS = [("fp32 eager", None, None, torch.float32, False),
                 ("bf16 compiled", None, None, torch.bfloat16, True),
                 ("fp32 reduce-overhead", None, None, torch.float32, _RO),
                 ("bf16 reduce-overhead", None, None, torch.bfloat16, _RO),
                 ("w8a8 reference fp32 eager", "w8a8", "reference", torch.float32, False),
                 ("w8a8 w8a8 bf16 reduce-overhead", "w8a8", "w8a8", torch.bfloat16, _RO),
                 ("w8a8 w8a8 fp32 reduce-overhead", "w8a8", "w8a8", torch.float32, _RO),
                 ("w8a8 w8a8 bf16 reduce-overhead temporal table", "w8a8", "w8a8", torch.bfloat16, _RO),
                 ("w8a8-symw w8a8 bf16 reduce-overhead", "w8a8-symw", "w8a8", torch.bfloat16, _RO),
                 ("w8a8 reference bf16 reduce-overhead", "w8a8", "reference", torch.bfloat16, _RO),
                 ("w4a8 weight-only bf16 reduce-overhead", "w4a8", "weight-only", torch.bfloat16, _RO)]


def graph_configs(asked: Optional[str]) -> list:
    """The bundled-graphs configurations named in ``asked`` (comma-separated), in that order; all of
    them when None. Unknown names raise ``SystemExit`` (checked in ``main`` before any work)."""
    if asked is None:
        return list(GRAPH_CONFIGS)
    names = asked.split(",")
    known = {c[0]: c for c in GRAPH_CONFIGS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown --graph-configs {unknown}; known: {sorted(known)}")
    return [known[n] for n in dict.fromkeys(names)]


def bundled_graphs(args, out: dict, work: Path) -> None:
    """CUDA graphs on both sides: the bundled model's FP and quantized forwards compiled with
    ``mode="reduce-overhead"`` (every call a CUDA-graph replay), per call at the sampling batch and
    for sampling ``--num-images`` images, next to FP32 eager (what a diffusers user runs) and
    compiled bf16 without graphs. One pipeline per configuration serves both measurements (one
    input shape, one graph). PSNR of the final images vs the w8a8 ``reference`` backend in fp32
    eager (the calibrated numbers) and vs FP32 eager."""
    dev = args.device
    sampler = SamplerConfig("ddim", args.steps)
    fp = tfmq.load_pipeline(tfmq.default_model_path(), dev)
    c = fp.unet.config
    bsz = args.sample_batch
    x = torch.randn(bsz, c.in_channels, c.sample_size, c.sample_size, device=dev)
    ts = [int(t) for t in tfmq.sampling.sampler_timesteps(fp, sampler)]
    t_mid = torch.full((bsz,), ts[len(ts) // 2], device=dev, dtype=torch.long)
    del fp
    rows = out["rows"]
    print(f"(a'') bundled model, CUDA graphs (reduce-overhead), batch {bsz}; sampling {args.num_images} images, "
          f"DDIM {args.steps}")
    configs = graph_configs(args.graph_configs)
    ckpts = bundled_checkpoints(args, work, sampler, names=sorted({c[1] for c in configs if c[1]}))
    imgs, samp = {}, []
    out["sampling_graphs"] = samp                      # in the partial JSON as it grows
    from tfmq.runtime import compile_denoiser
    for label, ck, backend, dtype, comp in configs:
        try:
            t0 = time.perf_counter()
            if ck is None:
                pipe = tfmq.load_pipeline(tfmq.default_model_path(), dev, dtype)
                if comp:
                    compile_denoiser(pipe.unet, None if comp is True else comp)
            else:
                pipe = tfmq.load(ckpts[ck], dev, dtype, backend=backend, compile=comp,
                                 temporal_table=label.endswith("temporal table"))
            den, xx = pipe.unet, x.to(dtype)
            # one warm-up batch through the sampler compiles (and records the graph) at this shape
            tfmq.generate(pipe, sampler, bsz, bsz, seed=0, progress=False)
            setup = time.perf_counter() - t0
        except Exception as exc:
            samp.append({"config": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
            print("  ", label, "failed:", exc, flush=True)
            continue
        steps = getattr(den, "tfmq_steps", None)
        if steps is not None:                          # one mid-trajectory call, repeated: hold the index
            steps.set(len(ts) // 2)
            steps.paused = True
        r = measure(rows, label, "bundled", lambda den=den, xx=xx: (lambda: den(xx, t_mid).sample), args.iters, 3,
                    note=f"batch {bsz}; compile + first sampling batch {setup:.1f} s"
                    + ("; peak_mb does not count the CUDA graphs' private memory pool" if comp == "reduce-overhead" else ""))
        if steps is not None:
            steps.paused = False
            steps.reset()
        if ck is not None and "median_ms" in r:
            r["backend_summary"] = backend_summary(den)
            r["runtime_bytes"] = runtime_nbytes(den)
        try:
            sr, imgs[label] = timed_sampling(pipe, sampler, args.num_images, bsz, label,
                                             "after one warm-up batch (compilation and graph recording excluded)")
        except Exception as exc:
            sr = {"config": label, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        samp.append(sr)
        compare_images(samp, imgs, min(256, args.num_images))   # now: a run cut short keeps its PSNRs
        print("  ", sr, flush=True)
        if PARTIAL is not None:
            PARTIAL[1].write_text(json.dumps(PARTIAL[0], indent=2))
        del pipe, den
        torch._dynamo.reset()        # the next configuration's calls check no guards of this one's graphs
        torch.cuda.empty_cache()
    print(f"\n{'sampling config':40s} {'seconds':>8s} {'PSNR vs ref':>12s}")
    for r in samp:
        print(f"{r['config']:40s} " + (f"{r['seconds']:8.2f} {r.get('psnr_vs_w8a8_reference_fp32_db_first_256', float('nan')):12.2f}"
                                       if "seconds" in r else "failed: " + r["error"][:80]))


def sd_unet(args, out: dict, work: Path) -> None:
    from diffusers import UNet2DConditionModel
    dev = args.device
    rows = out["rows"]
    print("(b) SD-v1.5-config UNet (random weights), batch 2, 64x64 latents, 77 tokens")
    pipe = random_sd_pipeline(work).to(dev)          # RANDOM weights, SD v1.5's UNet config
    unet = pipe.unet
    ctx = torch.randn(2, 77, 768, device=dev)
    x = torch.randn(2, 4, 64, 64, device=dev)
    t = torch.full((2,), 500, device=dev, dtype=torch.long)
    out["sd_unet_params"] = sum(p.numel() for p in unet.parameters())
    if not args.sd_lean:
        measure(rows, "fp32 eager", "sd15-unet", lambda: (lambda: unet(x, t, ctx).sample), args.sd_iters, 3)
    ub = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().to(dev, torch.bfloat16).to(memory_format=torch.channels_last)
    ub.load_state_dict(unet.state_dict())
    xb, cb_ = x.to(torch.bfloat16).to(memory_format=torch.channels_last), ctx.to(torch.bfloat16)
    measure(rows, "bf16 eager", "sd15-unet", lambda: (lambda: ub(xb, t, cb_).sample), args.sd_iters, 3)
    comp = torch.compile(ub)
    measure(rows, "bf16 torch.compile", "sd15-unet", lambda: (lambda: comp(xb, t, cb_).sample), args.sd_iters, 3)
    del comp, ub
    torch.cuda.empty_cache()
    t0 = time.perf_counter()
    cfg = tfmq.QuantConfig.for_method("naive", wbits=8, abits=8, softmax_bits=16, calib_size=2,
                                      sampler=SamplerConfig("ddim", 4), prompts=["a photo"])
    tfmq.quantize(pipe, cfg, progress=False)
    out["sd_quantize_s"] = time.perf_counter() - t0
    ckpt = tfmq.save(pipe, work / "sd-w8a8", overwrite=True)
    out["sd_checkpoint_tensor_bytes"] = ckpt_tensor_bytes(ckpt)
    del pipe, unet
    torch.cuda.empty_cache()
    results = {}
    for backend in ("reference", "w8a8"):
        try:
            q = tfmq.load(ckpt, dev, torch.bfloat16, backend=backend).unet.to(memory_format=torch.channels_last)
        except Exception as exc:
            rows.append({"model": "sd15-unet", "config": f"w8a8 {backend} bf16", "error": f"{type(exc).__name__}: {exc}"})
            continue
        with torch.no_grad():
            results[backend] = q(xb, t, cb_).sample.float()
        r = measure(rows, f"w8a8 {backend} bf16", "sd15-unet", lambda q=q: (lambda: q(xb, t, cb_).sample), args.sd_iters, 3)
        r["backend_summary"] = backend_summary(q)
        r["runtime_bytes"] = runtime_nbytes(q)
        if backend == "w8a8" and not args.sd_lean:
            measure(rows, "w8a8 w8a8 bf16 + CUDA graph", "sd15-unet",
                    lambda q=q: cuda_graph(lambda: q(xb, t, cb_).sample)[0], args.sd_iters, 3)
        from tfmq.runtime import compile_denoiser
        if backend == "reference" and args.sd_lean:
            continue
        measure(rows, f"w8a8 {backend} bf16 compiled", "sd15-unet",
                lambda q=q: (compile_denoiser(q), (lambda: q(xb, t, cb_).sample))[1], args.sd_iters, 3)
        del q
        torch.cuda.empty_cache()
    if "reference" in results and "w8a8" in results:
        d = (results["w8a8"] - results["reference"]).abs()
        out["sd_w8a8_vs_reference"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                                       "ref_abs_mean": float(results["reference"].abs().mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--sd-iters", type=int, default=20)
    p.add_argument("--sd-lean", action="store_true", help="SD part without fp32 eager, the CUDA-graph row and "
                                                          "the compiled reference (fits one 10-minute call)")
    p.add_argument("--graph-configs", default=None, help="bundled-graphs: comma-separated subset of its "
                                                          "configurations, run in this order (default: all)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calib-size", type=int, default=32)
    p.add_argument("--num-images", type=int, default=1000)
    p.add_argument("--sample-batch", type=int, default=250)
    p.add_argument("--parts", default="bundled,sd", help="comma-separated: bundled, bundled-compiled, "
                                                         "bundled-graphs, sd")
    args = p.parse_args(argv)
    graph_configs(args.graph_configs)                  # bad names fail here, before any work
    if not torch.cuda.is_available():
        print("error: this benchmark times CUDA calls; no CUDA GPU here", file=sys.stderr)
        return 2
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "settings": vars(args) | {"json": str(args.json)}, "rows": []}
    global PARTIAL
    args.json.parent.mkdir(parents=True, exist_ok=True)
    PARTIAL = (out, args.json)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parts = args.parts.split(",")
        if "bundled" in parts:
            bundled(args, out, work)
        if "bundled-compiled" in parts:
            bundled_compiled(args, out, work)
        if "bundled-graphs" in parts:
            bundled_graphs(args, out, work)
        if "sd" in parts:
            sd_unet(args, out, work)
    write_results(out, args.json, quiet=True)
    print(f"\n{'model':10s} {'config':40s} {'median ms':>10s} {'peak MB':>9s}")
    for r in out["rows"]:
        print(f"{r['model']:10s} {r['config']:40s} " + (f"{r['median_ms']:10.3f} {r['peak_mb']:9.1f}"
                                                       if "median_ms" in r else "failed: " + r["error"][:80]))
    print("written", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
