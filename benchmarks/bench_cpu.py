"""CPU benchmark: per denoiser call latency, file size and peak memory of the ONNX export.

Rows (each measured in its own child process, so its peak RSS is its own):
  PyTorch FP32 eager; ONNX Runtime FP32; ONNX Runtime INT8 (the QDQ W8A8 export); OpenVINO FP32 and
  INT8 (when the openvino package is installed). INT8 rows cover weight forms: W8A8 with the default
  asymmetric weights (int8 codes + exact offset term), W8A8 with symmetric weights, W4A8 (int8
  form), each with layer policy ``all``; and W8A8 under ``tfmq-official`` (conv1 inputs, shortcuts,
  downsamplers, conv_in/out in full precision).
Models:
  (a) the bundled Fashion-MNIST DDPM (trained weights), batch 16, 32x32;
  (b) a UNet2DConditionModel with Stable Diffusion v1.5's config (RANDOM weights, seeded: timings
      depend on shapes, not weights), batch 1, 32x32 latents, 77-token context; ``--sd-scale``
      scales every channel width (1.0 = the real SD-v1.5 UNet, 860M parameters).
Quantized models are calibrated in the run at timing-only settings (min-max ranges, few
trajectories: the speed of a layer does not depend on how its codes were chosen); the SD UNet
is W8A8 with a 16-bit softmax (Q-Diffusion's setting for SD). Thread count and core affinity are
pinned (``--threads``, cores 0..N-1); OpenVINO runs with f32 inference precision (it would pick
bf16 on CPUs that have it); every runtime flushes denormal floats to zero (PyTorch:
``torch.set_flush_denormal(True)``; random weights produce denormals that run 10x+ slower). The
machine's CPU model, ISA flags and load average are recorded.

    python benchmarks/bench_cpu.py --threads 2 --machine dev2core --sd-scale 0.5
    python benchmarks/bench_cpu.py --threads 16 --machine h100host16core       # full SD-v1.5 config

A run can be split (a ten-minute command limit): ``--work DIR --prepare-only`` quantizes and exports
into DIR, later runs with the same ``--work`` reuse it; ``--parts sd --merge`` adds the SD rows to an
existing result file.
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

import numpy as np
from sd_random import random_sd_pipeline
from results_io import write_results

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


# ---- machine ------------------------------------------------------------------------------------
def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model, flags = platform.processor(), set()
    for line in text.splitlines():
        if line.startswith("model name") and model in ("", platform.processor()):
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    return {"model": model, "logical_cpus": os.cpu_count(), "isa": {f: f in flags for f in ISA_FLAGS},
            "int8_dot_product": ("AMX" if "amx_int8" in flags else "AVX-512 VNNI" if "avx512_vnni" in flags
                                 else "AVX-VNNI" if "avx_vnni" in flags else "none (AVX2 int8 only)")}


def versions() -> dict:
    out = {"python": platform.python_version()}
    for mod in ("torch", "diffusers", "onnx", "onnxruntime", "openvino"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:                                    # not installed: say so
            out[mod] = None
    return out


# ---- child: one measurement ----------------------------------------------------------------------
def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(spec: dict) -> dict:
    """Load one model, time ``iters`` calls after ``warmup``; returns the measurement."""
    threads = spec["threads"]
    os.sched_setaffinity(0, set(range(threads)))
    import torch
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)          # as the ONNX runners do: denormals run 10x+ slower
    t0 = time.perf_counter()
    if spec["runtime"] == "torch":
        import diffusers
        cls = getattr(diffusers, spec["class"])
        unet = cls.from_pretrained(spec["path"], subfolder="unet").eval()
        g = torch.Generator().manual_seed(0)
        c = unet.config
        x = torch.randn((spec["batch"], c.in_channels, spec["size"], spec["size"]), generator=g)
        t = torch.full((spec["batch"],), spec["timestep"], dtype=torch.long)
        kw = {"encoder_hidden_states": torch.randn((spec["batch"], 77, c.cross_attention_dim), generator=g)} \
            if spec["class"] == "UNet2DConditionModel" else {}

        def call():
            with torch.no_grad():
                return unet(x, t, **kw).sample
    else:
        from tfmq.export.runners import make_runner, read_export_config
        from tfmq.export.table import load_table
        cfg = read_export_config(spec["path"])
        runner = make_runner(spec["runtime"], Path(spec["path"]) / cfg["onnx_file"], threads)
        table = load_table(Path(spec["path"]) / cfg["table_file"], cfg["temporal"])
        g = torch.Generator().manual_seed(0)
        c, s, b = cfg["sample_shape"][0], spec["size"], spec["batch"]
        feeds = {"sample": torch.randn((b, c, s, s), generator=g).numpy()}
        ts = table.timesteps.tolist()
        t = min(ts, key=lambda v: abs(v - spec["timestep"]))
        labels = None if table.classes is None else torch.zeros(b, dtype=torch.long)
        for i, f in enumerate(table.features_for(torch.full((b,), t), labels)):
            feeds[f"temb_{i}"] = f.contiguous().numpy()
        if "encoder_hidden_states" in cfg["inputs"]:
            feeds["encoder_hidden_states"] = torch.randn((b, 77, spec["context_dim"]), generator=g).numpy()

        def call():
            return runner(feeds)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    for _ in range(spec["warmup"]):
        call()
    times = []
    for _ in range(spec["iters"]):
        a = time.perf_counter()
        call()
        times.append((time.perf_counter() - a) * 1000)
    out = {"median_ms": float(np.median(times)), "min_ms": float(np.min(times)), "iters": spec["iters"],
           "load_s": round(load_s, 2), "rss_after_load_mb": round(rss_loaded, 1), "peak_rss_mb": round(peak_rss_mb(), 1)}
    if spec["runtime"] == "openvino":
        out["openvino_ops"] = openvino_precisions(runner)
    return out


def openvino_precisions(runner) -> dict:
    """How many of OpenVINO's compiled Convolution / MatMul / FullyConnected ops run in which
    precision (u8 / i8 = int8 kernels)."""
    counts: dict = {}
    for compiled in runner.compiled.values():
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            if "layerType" not in info or "runtimePrecision" not in info:
                continue
            kind = info["layerType"].astype(str)
            if kind in ("Convolution", "MatMul", "FullyConnected"):
                prec = info["runtimePrecision"].astype(str)
                counts.setdefault(kind, {}).setdefault(prec, 0)
                counts[kind][prec] += 1
    return counts


def run_child(spec: dict) -> dict:
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---- preparing the models -----------------------------------------------------------------------
def _done(path: Path) -> bool:
    return (path / "export.json").exists()


def quantize_and_export(pipe_factory, name: str, work: Path, config, storages=("int8",)) -> dict:
    """Quantize, save and export (reusing what an earlier run left in ``work``)."""
    import tfmq
    ckpt = work / f"{name}-ckpt"
    times = work / f"{name}-times.json"
    if not (ckpt / "tfmq_denoiser.safetensors").exists():
        pipe = pipe_factory()
        t0 = time.perf_counter()
        tfmq.quantize(pipe, config, progress=False)
        times.write_text(json.dumps({"quantize_s": time.perf_counter() - t0}))
        tfmq.save(pipe, ckpt, overwrite=True)
        del pipe
    quant_s = json.loads(times.read_text())["quantize_s"] if times.exists() else None
    out = {}
    for storage in storages:
        path = work / f"{name}-{storage}"
        t0 = time.perf_counter()
        if not _done(path):
            tfmq.export_onnx(ckpt, path, weight_storage=storage, overwrite=True)
            (path / "export_s.txt").write_text(str(time.perf_counter() - t0))
        cfg = json.loads((path / "export.json").read_text())
        out[storage] = {"path": str(path), "onnx_bytes": cfg["files"]["onnx_bytes"],
                        "export_s": float((path / "export_s.txt").read_text()), "quantize_s": quant_s,
                        "weight_forms": cfg["weights"]["forms"],
                        "checkpoint_tensor_bytes": (ckpt / "tfmq_denoiser.safetensors").stat().st_size}
    return out


def export_fp32(source, path: Path, sampler) -> dict:
    import tfmq
    if not _done(path):
        tfmq.export_onnx(source, path, sampler=sampler, overwrite=True)
    return {"path": str(path), "onnx_bytes": json.loads((path / "export.json").read_text())["files"]["onnx_bytes"]}


def prepare_bundled(args, work: Path) -> dict:
    import tfmq
    from tfmq.sampling import SamplerConfig
    sampler = SamplerConfig("ddim", args.steps)
    fp_path = tfmq.default_model_path()
    models = {"fp32": export_fp32(fp_path, work / "bundled-fp32", sampler)}
    base = dict(calib_size=4, sampler=sampler, weight_init="minmax", act_init="minmax")
    configs = {
        "int8 w8a8 (policy all)": (dict(wbits=8, abits=8, layer_policy="all"), ("int8",)),
        "int8 w8a8 sym-weights (policy all)": (dict(wbits=8, abits=8, layer_policy="all", weight_symmetric=True), ("int8",)),
        "int8 w4a8 (policy all)": (dict(wbits=4, abits=8, layer_policy="all"), ("int8", "int4")),
        "int8 w8a8 (policy tfmq-official)": (dict(wbits=8, abits=8, layer_policy="tfmq-official"), ("int8",)),
    }
    for i, (label, (kw, storages)) in enumerate(configs.items()):
        cfg = tfmq.QuantConfig.for_method("naive", **base, **kw)
        res = quantize_and_export(lambda: tfmq.load_pipeline(fp_path), f"bundled-q{i}", work, cfg, storages)
        for storage, r in res.items():
            models[label if storage == "int8" else label.replace("int8 w4a8", "int4-storage w4a8")] = r
        print(f"  prepared {label}: {res}", flush=True)
    return {"class": "UNet2DModel", "torch_path": str(fp_path), "models": models, "batch": args.batch, "size": 32,
            "timestep": 500, "context_dim": None}


def sd_pipeline(scale: float, work: Path):
    """SD v1.5's UNet (widths x ``scale``) at 32x32 latents, RANDOM weights (see sd_random.py)."""
    return random_sd_pipeline(work, scale, sample_size=32)


def prepare_sd(args, work: Path) -> dict:
    import tfmq
    from tfmq.sampling import SamplerConfig
    sampler = SamplerConfig("ddim", 4)
    fp_dir = work / f"sd-x{args.sd_scale:g}-fp"
    if not (fp_dir / "model_index.json").exists():
        pipe = sd_pipeline(args.sd_scale, work)
        pipe.save_pretrained(fp_dir)
        del pipe
    import diffusers
    with open(fp_dir / "unet" / "config.json") as f:
        unet_cfg = json.load(f)
    from accelerate import init_empty_weights
    with init_empty_weights():
        params = sum(p.numel() for p in diffusers.UNet2DConditionModel.from_config(unet_cfg).parameters())
    models = {"fp32": export_fp32(fp_dir, work / f"sd-x{args.sd_scale:g}-fp32", sampler)}
    cfg = tfmq.QuantConfig.for_method("naive", wbits=8, abits=8, softmax_bits=16, layer_policy="all", calib_size=1,
                                      sampler=sampler, prompts=["a photo"], weight_init="minmax", act_init="minmax")
    res = quantize_and_export(lambda: tfmq.load_pipeline(fp_dir), f"sd-x{args.sd_scale:g}-q", work, cfg)
    models["int8 w8a8 softmax16 (policy all)"] = res["int8"]
    print(f"  prepared SD int8: {res}", flush=True)
    return {"class": "UNet2DConditionModel", "torch_path": str(fp_dir), "models": models, "batch": 1, "size": 32,
            "timestep": 500, "context_dim": 768, "params": params, "scale": args.sd_scale}


# ---- main -------------------------------------------------------------------------------------
def measure_model(name: str, prep: dict, args, rows: list) -> None:
    base = {"threads": args.threads, "batch": prep["batch"], "size": prep["size"], "timestep": prep["timestep"],
            "context_dim": prep["context_dim"], "warmup": args.warmup, "iters": args.iters if name == "bundled" else args.sd_iters}
    runtimes = ["onnxruntime"] + (["openvino"] if versions()["openvino"] else [])
    todo = [("pytorch fp32 eager", "torch", {"path": prep["torch_path"], "class": prep["class"]}, None)]
    for label, m in prep["models"].items():
        for rt in runtimes:
            todo.append((f"{rt} {label}", rt, {"path": m["path"]}, m))
    fp_bytes = prep["models"]["fp32"]["onnx_bytes"]
    torch_ms = None
    for label, runtime, extra, m in todo:
        spec = dict(base, runtime=runtime, **extra)
        r = run_child(spec)
        r.update({"model": name, "config": label, "runtime": runtime})
        if m is not None:
            r["onnx_mb"] = round(m["onnx_bytes"] / 2**20, 2)
            r["onnx_vs_fp32_onnx"] = round(m["onnx_bytes"] / fp_bytes, 3)
            for k in ("weight_forms", "quantize_s", "export_s", "checkpoint_tensor_bytes"):
                if k in m:
                    r[k] = m[k]
        if runtime == "torch" and "median_ms" in r:
            torch_ms = r["median_ms"]
        if torch_ms and "median_ms" in r:
            r["speedup_vs_pytorch_fp32"] = round(torch_ms / r["median_ms"], 2)
        rows.append(r)
        print(f"  {name:8s} {label:52s} " + (f"{r['median_ms']:9.1f} ms  x{r.get('speedup_vs_pytorch_fp32', 1):5.2f}"
                                              f"  peak {r['peak_rss_mb']:7.0f} MB" if "median_ms" in r else r["error"]),
              flush=True)


def print_table(out: dict) -> None:
    print(f"\nCPU: {out['cpu']['model']}; int8 dot product: {out['cpu']['int8_dot_product']}; "
          f"threads {out['settings']['threads']}; load average {out['load_average']}")
    print(f"{'model':8s} {'config':52s} {'ms/call':>9s} {'vs torch':>8s} {'file MB':>8s} {'vs fp32':>7s} {'peak MB':>8s}")
    for r in out["rows"]:
        if "median_ms" not in r:
            print(f"{r['model']:8s} {r['config']:52s} failed: {r['error'][:60]}")
            continue
        print(f"{r['model']:8s} {r['config']:52s} {r['median_ms']:9.1f} {r.get('speedup_vs_pytorch_fp32', 1.0):7.2f}x "
              f"{r.get('onnx_mb', float('nan')):8.2f} {r.get('onnx_vs_fp32_onnx', float('nan')):7.3f} {r['peak_rss_mb']:8.0f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="threads (pinned to cores 0..N-1)")
    p.add_argument("--machine", default=None, help="name in the result file (default: the hostname)")
    p.add_argument("--json", type=Path, default=None, help="default benchmarks/results/cpu/<machine>.json")
    p.add_argument("--batch", type=int, default=16, help="bundled-model batch (default 16)")
    p.add_argument("--steps", type=int, default=100, help="DDIM steps of the bundled model's table (default 100)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--sd-iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--sd-scale", type=float, default=1.0, help="SD UNet channel width factor (1.0 = SD-v1.5)")
    p.add_argument("--parts", default="bundled,sd")
    p.add_argument("--work", type=Path, default=None,
                   help="folder for checkpoints / exports, reused by later runs (default: a temp dir)")
    p.add_argument("--prepare-only", action="store_true", help="quantize and export into --work, measure nothing")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of parts not measured now from an existing --json file")
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    if args.threads > len(os.sched_getaffinity(0)):
        print(f"error: --threads {args.threads} > {len(os.sched_getaffinity(0))} available cores", file=sys.stderr)
        return 2
    machine = args.machine or platform.node()
    json_path = args.json or Path(__file__).parent / "results" / "cpu" / f"{machine}.json"
    out = {"machine": machine, "cpu": cpu_info(), "versions": versions(),
           "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "child"},
           "load_average_start": os.getloadavg(), "rows": [],
           "notes": ["SD UNet: random weights (seeded); timings depend on shapes, not weights",
                     "quantized models calibrated at timing-only settings (min-max ranges)",
                     "OpenVINO: INFERENCE_PRECISION_HINT=f32, a static-shape copy of the graph per input shape",
                     "ONNX Runtime: CPU execution provider, graph optimizations ALL, "
                     "qdq_matmulnbits_accuracy_level=1",
                     "denormals flushed to zero in every runtime (torch.set_flush_denormal(True))"]}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        parts = args.parts.split(",")
        if "bundled" in parts:
            print(f"(a) bundled model, batch {args.batch}, 32x32: preparing exports", flush=True)
            prep = prepare_bundled(args, work)
            out["bundled"] = {k: v for k, v in prep.items() if k != "models"}
            if not args.prepare_only:
                measure_model("bundled", prep, args, out["rows"])
        if "sd" in parts:
            print(f"(b) SD-v1.5-config UNet x{args.sd_scale} (random weights), batch 1, 32x32 latents: preparing",
                  flush=True)
            prep = prepare_sd(args, work)
            out["sd"] = {k: v for k, v in prep.items() if k != "models"}
            if not args.prepare_only:
                measure_model("sd", prep, args, out["rows"])
    if args.prepare_only:
        print("prepared in", work)
        return 0
    if args.merge and json_path.exists():
        old = json.loads(json_path.read_text())
        measured = {r["model"] for r in out["rows"]}
        out["rows"] = [r for r in old.get("rows", []) if r["model"] not in measured] + out["rows"]
        for key in ("bundled", "sd"):
            if key not in out and key in old:
                out[key] = old[key]
        out["load_average_earlier_parts"] = old.get("load_average")
    out["load_average_end"] = os.getloadavg()
    out["load_average"] = [round(x, 2) for x in out["load_average_end"]]
    out["wall_s"] = round(time.perf_counter() - t_start, 1)
    write_results(out, json_path, quiet=True)
    print_table(out)
    print("written", json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
