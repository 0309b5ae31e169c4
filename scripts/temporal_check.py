"""TFMQ-DM check on the bundled model (GPU): naive vs tfmq variants at W4A8, DDIM 100 -- calibration
time per stage, checkpoint size, sampling time, final-latent MSE vs FP (64 samples, same seeds) and
the temporal feature analysis (writes WORK_DIR/analysis/: temporal_features.json, temporal_cosine.png, summary.json).

Usage: [RECON_ITERS=300 TIAR_ITERS=2000 STEPS=100 CALIB_SIZE=256 NUM_IMAGES=64 DEVICE=cuda WORK_DIR=/tmp/tfmq_check] python scripts/temporal_check.py [MODEL]
"""
import json, os, sys, time
import torch
import tfmq
from tfmq.api import default_model_path
from tfmq.sampling import SamplerConfig, denoise, build_conditioning
from tfmq.eval.temporal import analyze_checkpoints
from tfmq.checkpoint import checkpoint_size

S = SamplerConfig("ddim", int(os.environ.get("STEPS", "100")))
dev = os.environ.get("DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
calib = int(os.environ.get("CALIB_SIZE", "256"))
n_img = int(os.environ.get("NUM_IMAGES", "64"))
work = os.environ.get("WORK_DIR", "/tmp/tfmq_check")
M = str(default_model_path() if len(sys.argv) < 2 else sys.argv[1])
recon = int(os.environ.get("RECON_ITERS", "300"))
tiar_it = int(os.environ.get("TIAR_ITERS", "2000"))
runs = {"naive": dict(method="naive"),
        "qdiff": dict(method="qdiff", recon_iters=recon, act_learn_iters=int(os.environ.get("ACT_ITERS", "100"))),
        "tfmq_all_tiar": dict(method="tfmq", recon_iters=recon, tiar_iters=tiar_it),
        "tfmq_tib_tiar": dict(method="tfmq", recon_iters=recon, tiar_iters=tiar_it, fsc="tib"),
        "tfmq_all_cache": dict(method="tfmq", recon_iters=recon, tiar_iters=tiar_it, temporal="cache")}
out = {}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


fp = tfmq.load_pipeline(M, dev)
cond = build_conditioning(fp, n_img, 0, None, None, 1.0, dev)
ref = denoise(fp, S, n_img, 64, 1234, cond, progress=False)
for name, kw in runs.items():
    pipe = tfmq.load_pipeline(M, dev)
    t0 = time.time()
    cfg = tfmq.QuantConfig.for_method(kw.pop("method"), wbits=4, abits=8, sampler=S, calib_size=calib, **kw)
    tfmq.quantize(pipe, cfg, progress=False)
    tfmq.save(pipe, f"{work}/ck/{name}", overwrite=True)
    q = tfmq.load(f"{work}/ck/{name}", dev)
    sync()
    t1 = time.time()
    z = denoise(q, S, n_img, 64, 1234, cond, progress=False)
    sync()
    info = q.unet.tfmq_info
    keep = ("mode", "error_nearest", "error_tiar", "cosine_nearest", "cosine_tiar", "bytes")
    out[name] = {"calib_s": info["calibration_time"]["stages_s"], "total_s": round(time.time() - t0, 1),
                 "sample_s": round(time.time() - t1, 2), "mse_vs_fp": float(((z - ref) ** 2).mean()),
                 "ckpt_bytes": checkpoint_size(f"{work}/ck/{name}"),
                 "temporal": {k: v for k, v in info.get("temporal", {}).items() if k in keep}}
    print(name, json.dumps(out[name]), flush=True)
r = analyze_checkpoints(M, [f"{work}/ck/{n}" for n in runs], f"{work}/analysis", list(runs), dev, progress=False)
for k, v in r["reports"].items():
    out[k]["analysis"] = {"mean_cosine": v["mean_cosine"], "min_cosine": v["min_cosine"],
                          "mean_rel_err": v["mean_relative_error"]}
    print(k, v["mean_cosine"], v["min_cosine"], v["mean_relative_error"], flush=True)
json.dump(out, open(f"{work}/analysis/summary.json", "w"), indent=1)
