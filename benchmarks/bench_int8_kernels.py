"""Microbenchmark of the W8A8 int8 Triton kernels at Stable-Diffusion-v1.5 UNet shapes (CUDA only).

Batch 2 (CFG folded), 64x64 latents, channels_last. Per shape it times, with CUDA graphs (10 calls
per graph, so launch overhead is amortised as in a graph-captured / compiled UNet), the median over
100 replays measured with CUDA events after warm-up:

* ``fp32`` / ``bf16``: ``F.linear`` / ``F.conv2d`` (cuDNN, channels_last, cudnn.benchmark on);
* ``int_mm``: cuBLAS ``torch._int_mm`` (int8 x int8 -> int32, no epilogue; linear only);
* ``int8``: our kernel on pre-quantized int8 activations (row / pixel sums given);
* ``q+int8``: ``quantize_act`` (codes + sums) followed by the kernel: the full W8A8 op;
* convs, ``padded``: the kernel over an input already padded by the quantizer (no bounds checks);
  ``qpad+padded``: ``quantize_act(..., pad=padding)`` + that kernel (the runtime's conv op);
* ``fused`` (with ``--fused``): the kernel reading the bf16 activation and quantizing tiles in
  registers (slow so far: results/int8_kernels_h100_v1.json has it).

It also checks every int8 variant against the float64 reference (``ref_linear`` / ``ref_conv2d``)
and records max abs / relative errors. Usage::

    python benchmarks/bench_int8_kernels.py --out benchmarks/results/int8_kernels_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

try:
    from tfmq.runtime.kernels import int8 as K
except ImportError:  # standalone copy (no tfmq package installed): import the module by path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from tfmq.runtime.kernels import int8 as K

LINEARS = [  # name, M, K, N
    ("attn proj 320", 2 * 4096, 320, 320),
    ("ff GEGLU in 320->2560", 2 * 4096, 320, 2560),
    ("ff out 1280->320", 2 * 4096, 1280, 320),
    ("attn proj 640", 2 * 1024, 640, 640),
    ("ff GEGLU in 640->5120", 2 * 1024, 640, 5120),
    ("ff out 2560->640", 2 * 1024, 2560, 640),
    ("attn proj 1280", 2 * 256, 1280, 1280),
    ("cross-attn k/v 768->320", 2 * 77, 768, 320),
]
CONVS = [  # name, B, Cin, H, W, Cout, k, stride, pad
    ("3x3 320 @64", 2, 320, 64, 64, 320, 3, 1, 1),
    ("3x3 640 @32", 2, 640, 32, 32, 640, 3, 1, 1),
    ("3x3 1280 @16", 2, 1280, 16, 16, 1280, 3, 1, 1),
    ("3x3 1280 @8", 2, 1280, 8, 8, 1280, 3, 1, 1),
    ("3x3 s2 320 @64->32", 2, 320, 64, 64, 320, 3, 2, 1),
    ("3x3 s2 640 @32->16", 2, 640, 32, 32, 640, 3, 2, 1),
    ("3x3 s2 1280 @16->8", 2, 1280, 16, 16, 1280, 3, 2, 1),
    ("1x1 640->1280 @16", 2, 640, 16, 16, 1280, 1, 1, 0),
    ("3x3 320->640 @32", 2, 320, 32, 32, 640, 3, 1, 1),
]


def time_graph(fn, calls: int = 10, reps: int = 100) -> float:
    """Median microseconds per call of ``fn`` replayed from a CUDA graph of ``calls`` calls."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) * 1000.0 / calls)
    return statistics.median(times)


def _errs(out, ref):
    d = (out.double() - ref).abs()
    return float(d.max()), float(d.max() / ref.abs().max())


def _quant_params(gen, n, wshape, dev):
    sx = torch.tensor([0.02], device=dev)
    zx = torch.tensor([120.0], device=dev)
    wq = torch.randint(0, 256, wshape, generator=gen).float()
    zw = torch.randint(100, 156, (n,), generator=gen).float()
    sw = (torch.rand(n, generator=gen) * 0.002 + 0.0005).to(dev)
    b, cb, bsum = K.prepare_weight(wq.to(dev), zw.to(dev), 128)
    bias = (torch.randn(n, generator=gen) * 0.1).to(dev)
    w_deq = ((wq - zw.view(-1, *([1] * (len(wshape) - 1)))) * sw.cpu().view(-1, *([1] * (len(wshape) - 1)))).to(dev)
    return sx, zx, b, cb, bsum, sw, bias, w_deq


def _best(tuned):
    cfg = getattr(tuned, "best_config", None)
    return None if cfg is None else str(cfg)


FUSED = False


def bench_linear(name, m, k, n, gen, dev):
    sx, zx, b, cb, bsum, sw, bias, w_deq = _quant_params(gen, n, (n, k), dev)
    ca = 128 - zx
    x = (torch.randn(m, k, generator=gen).to(dev) * 1.0).to(torch.bfloat16)
    w16, b16 = w_deq.to(torch.bfloat16), bias.to(torch.bfloat16)
    x32, w32 = x.float(), w_deq
    a, asum = K.quantize_act(x, sx, zx, 0, 255, return_sums=True)
    ai, bi = a.contiguous(), b.t()
    times, errs = {}, {}
    times["fp32"] = time_graph(lambda: F.linear(x32, w32, bias))
    times["bf16"] = time_graph(lambda: F.linear(x, w16, b16))
    if m > 16:
        times["int_mm"] = time_graph(lambda: torch._int_mm(ai, bi))
    ref16 = K.ref_linear(a, b, sx, ca, sw, cb, b16.float())
    variants = {
        "int8": lambda: K.int8_linear(a, b, sx, ca, sw, cb, bsum, b16, torch.bfloat16, asum=asum),
        "q+int8": lambda: _q_int8_linear(x, sx, zx, ca, b, sw, cb, bsum, b16),
        "fused": lambda: K.int8_linear(x, b, sx, None, sw, cb, bsum, b16, torch.bfloat16, zx=zx, qmin=0, qmax=255),
    }
    if not FUSED:
        variants.pop("fused")
    cfgs = {}
    for key, fn in variants.items():
        out = fn()
        errs[key] = _errs(out, ref16)
        times[key] = time_graph(fn)
        if key != "q+int8":
            cfgs[key] = _best(_tm().int8_linear_tuned)
    out32 = K.int8_linear(a, b, sx, ca, sw, cb, bsum, bias, torch.float32, asum=asum)
    errs["int8 fp32-out"] = _errs(out32, K.ref_linear(a, b, sx, ca, sw, cb, bias))
    return dict(kind="linear", name=name, M=m, K=k, N=n, split_k=K._split_k(m, n, k, None), times_us=times,
                errors=errs, configs=cfgs)


def _q_int8_linear(x, sx, zx, ca, b, sw, cb, bsum, bias):
    a, asum = K.quantize_act(x, sx, zx, 0, 255, return_sums=True)
    return K.int8_linear(a, b, sx, ca, sw, cb, bsum, bias, torch.bfloat16, asum=asum)


def _q_int8_conv(x, sx, zx, ca, b, stride, pad, sw, cb, bsum, bias):
    a, ps = K.quantize_act(x, sx, zx, 0, 255, nhwc=True, return_sums=True)
    return K.int8_conv2d(a, b, stride, pad, sx, ca, sw, cb, bsum, bias, torch.bfloat16, asum=ps)


def _qpad_int8_conv(x, sx, zx, ca, b, stride, pad, sw, cb, bsum, bias):
    a, ps = K.quantize_act(x, sx, zx, 0, 255, nhwc=True, return_sums=True, pad=pad)
    return K.int8_conv2d(a, b, stride, pad, sx, ca, sw, cb, bsum, bias, torch.bfloat16, asum=ps, padded=True)


def _tm():
    return K._kernels()


def bench_conv(name, bsz, cin, h, w, cout, ks, stride, pad, gen, dev):
    sx, zx, b, cb, bsum, sw, bias, w_deq = _quant_params(gen, cout, (cout, cin, ks, ks), dev)
    ca = 128 - zx
    x = torch.randn(bsz, cin, h, w, generator=gen).to(dev).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last)
    w16 = w_deq.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    b16 = bias.to(torch.bfloat16)
    x32 = x.float().contiguous(memory_format=torch.channels_last)
    w32 = w_deq.contiguous(memory_format=torch.channels_last)
    a, ps = K.quantize_act(x, sx, zx, 0, 255, nhwc=True, return_sums=True)
    ap, pps = K.quantize_act(x, sx, zx, 0, 255, nhwc=True, return_sums=True, pad=pad)
    times, errs, cfgs = {}, {}, {}
    times["fp32"] = time_graph(lambda: F.conv2d(x32, w32, bias, stride, pad))
    times["bf16"] = time_graph(lambda: F.conv2d(x, w16, b16, stride, pad))
    ref = K.ref_conv2d(a, b, stride, pad, sx, ca, sw, cb, b16.float())
    variants = {
        "int8": lambda: K.int8_conv2d(a, b, stride, pad, sx, ca, sw, cb, bsum, b16, torch.bfloat16, asum=ps),
        "q+int8": lambda: _q_int8_conv(x, sx, zx, ca, b, stride, pad, sw, cb, bsum, b16),
        "padded": lambda: K.int8_conv2d(ap, b, stride, pad, sx, ca, sw, cb, bsum, b16, torch.bfloat16, asum=pps,
                                        padded=True),
        "qpad+padded": lambda: _qpad_int8_conv(x, sx, zx, ca, b, stride, pad, sw, cb, bsum, b16),
        "fused": lambda: K.int8_conv2d(x, b, stride, pad, sx, None, sw, cb, bsum, b16, torch.bfloat16,
                                       zx=zx, qmin=0, qmax=255),
    }
    if not FUSED:
        variants.pop("fused")
    for key, fn in variants.items():
        out = fn()
        errs[key] = _errs(out, ref)
        times[key] = time_graph(fn)
        if key in ("int8", "fused"):
            cfgs[key] = _best(_tm().int8_conv_tuned)
        elif key == "padded":
            cfgs[key] = _best(_tm().int8_conv_padded_tuned)
    out32 = K.int8_conv2d(a, b, stride, pad, sx, ca, sw, cb, bsum, bias, torch.float32, asum=ps)
    errs["int8 fp32-out"] = _errs(out32, K.ref_conv2d(a, b, stride, pad, sx, ca, sw, cb, bias))
    m = bsz * ((h + 2 * pad - ks) // stride + 1) * ((w + 2 * pad - ks) // stride + 1)
    return dict(kind="conv", name=name, B=bsz, Cin=cin, H=h, W=w, Cout=cout, k=ks, stride=stride, pad=pad,
                split_k=K._split_k(m, cout, ks * ks * cin, None), times_us=times, errors=errs, configs=cfgs)


def mma_summary(jit_fn) -> dict:
    """Which matrix instructions the compiled variants of a kernel use (PTX: wgmma / mma.sync)."""
    res = {}
    try:
        for entry in jit_fn.device_caches.values():
            for kern in entry[0].values():
                ptx = kern.asm.get("ptx", "")
                kind = "wgmma" if "wgmma" in ptx else ("mma.sync" if "mma.sync" in ptx else "none")
                res[kind] = res.get(kind, 0) + 1
    except Exception as e:  # introspection only: never fail the benchmark over it
        res["error"] = repr(e)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/int8_kernels_h100.json")
    p.add_argument("--only", choices=["linear", "conv"], default=None)
    p.add_argument("--fused", action="store_true", help="also time the fused-quantize kernels")
    p.add_argument("--names", default=None, help="comma-separated shape names to run (default: all)")
    args = p.parse_args(argv)
    global FUSED
    FUSED = args.fused
    if not K.available():
        raise SystemExit("needs a CUDA GPU of compute capability >= 8.0 with Triton")
    import triton
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda"
    gen = torch.Generator().manual_seed(0)
    rows = []
    t0 = time.time()
    if args.only in (None, "linear"):
        for spec in LINEARS:
            if args.names and spec[0] not in args.names.split(","):
                continue
            rows.append(bench_linear(*spec, gen, dev))
            print(f"[{time.time() - t0:6.1f}s] {rows[-1]['name']} us: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in rows[-1]["times_us"].items()), flush=True)
    if args.only in (None, "conv"):
        for spec in CONVS:
            if args.names and spec[0] not in args.names.split(","):
                continue
            rows.append(bench_conv(*spec, gen, dev))
            print(f"[{time.time() - t0:6.1f}s] {rows[-1]['name']} us: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in rows[-1]["times_us"].items()), flush=True)
    cols = ["fp32", "bf16", "int_mm", "int8", "q+int8", "padded", "qpad+padded", "fused"]
    speed = ("int8", "q+int8", "padded", "qpad+padded", "fused")
    head = (f"{'shape':28s}" + "".join(f"{c[:11]:>12s}" for c in cols)
            + "  | x bf16: " + " ".join(f"{c[:11]:>11s}" for c in speed) + " | rel err")
    print(f"\n{torch.cuda.get_device_name()}  (us per call, CUDA graphs, median of 100)")
    print(head)
    for r in rows:
        t = r["times_us"]
        sp = {c: t["bf16"] / t[c] for c in speed if c in t}
        r["speedup_vs_bf16"] = sp
        line = f"{r['name'][:28]:28s}" + "".join(f"{t[c]:12.1f}" if c in t else f"{'-':>12s}" for c in cols)
        line += "  |         " + " ".join(f"{sp[c]:11.2f}" if c in sp else f"{'-':>11s}" for c in speed)
        line += f" s{r['split_k']}"
        line += f" | {max(e[1] for e in r['errors'].values()):.1e}"
        print(line)
    tm = _tm()
    mma = {"linear": mma_summary(tm._int8_linear_kernel), "conv": mma_summary(tm._int8_conv_kernel),
           "conv padded": mma_summary(tm._int8_conv_padded_kernel)}
    print("matrix instructions in compiled kernels:", mma)
    result = dict(device=torch.cuda.get_device_name(), mma_instructions=mma, torch=torch.__version__, triton=triton.__version__,
                  cuda=torch.version.cuda, autotune=os.environ.get("TFMQ_INT8_AUTOTUNE", "1") != "0",
                  timing="CUDA graph of 10 calls, median of 100 replays (CUDA events), after warm-up; "
                         "bf16 inputs/outputs for bf16/int8 variants, fp32 for fp32; activations random normal",
                  rows=rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
