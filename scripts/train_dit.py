#!/usr/bin/env python3
"""Train the small class-conditional DiT that tfmq ships as its second model (``fmnist-dit``).

The model is a ``diffusers.DiTTransformer2DModel`` (adaLN-Zero blocks, patch size 2, 6 blocks of
width 192 = 6 heads x 32, GELU-tanh MLP, one pixel channel, no learned variance) trained with
epsilon prediction on the real Fashion-MNIST training set (60,000 images, 28x28 padded to 32x32
with the background value), the same data, scheduler and optimiser settings as the default DDPM
(``scripts/train_default_model.py``, whose data and sampling helpers this script reuses).

Classes: the DiT's label embedding has ``num_embeds_ada_norm + 1`` rows; row 10 is the null
class used for classifier-free guidance. Labels are replaced by the null class with probability
``--p-uncond`` by this script (with its own generator); the model is kept in ``eval()`` mode
while training so that diffusers' internal label dropout does not drop a second time (the model
has no dropout layers, so nothing else changes).

The EMA weights are saved in fp16 as a ``DiTPipeline`` folder without a VAE (pixel space):
``transformer/`` + ``scheduler/`` + ``model_index.json`` (``vae`` null, ``id2label`` the ten
classes). ``DiTPipeline.__call__`` needs a VAE, so sample with tfmq (``tfmq sample fmnist-dit``)
or :func:`sample` below. Everything needed to reproduce the run goes to ``training.json``.

Example (as used for the shipped asset, on one H100)::

    python scripts/train_dit.py --out runs/fmnist-dit --minutes 6
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_default_model import (FMNIST_CLASSES, NULL_CLASS, batch_drawer,  # noqa: E402
                                 build_scheduler, find_data_dir, load_fashion_mnist, save_grid,
                                 train_loop)


def dit_config(width_heads: int = 6, head_dim: int = 32, layers: int = 6) -> dict:
    return dict(num_attention_heads=width_heads, attention_head_dim=head_dim, in_channels=1,
                out_channels=1, num_layers=layers, sample_size=32, patch_size=2,
                num_embeds_ada_norm=NULL_CLASS, activation_fn="gelu-approximate",
                norm_type="ada_norm_zero", norm_elementwise_affine=False)


def build_dit(**cfg):
    from diffusers import DiTTransformer2DModel
    return DiTTransformer2DModel(**dit_config(**cfg))


@torch.no_grad()
def sample(model, scheduler_config, n: int, steps: int = 100, class_labels=None,
           guidance_scale: float = 1.0, seed: int = 0, device=None) -> torch.Tensor:
    """DDIM (eta=0) samples in [-1, 1], (n, 1, 32, 32), float32 on CPU; CFG against class 10."""
    from diffusers import DDIMScheduler
    device = device or next(model.parameters()).device
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, 1, 32, 32), generator=g).to(device)
    labels = torch.as_tensor(class_labels, dtype=torch.long, device=device)
    null = torch.full_like(labels, NULL_CLASS)
    for t in sched.timesteps:
        tt = torch.full((n,), int(t), device=device, dtype=torch.long)
        if guidance_scale == 1.0:
            eps = model(x, tt, class_labels=labels, return_dict=False)[0]
        else:
            both = model(torch.cat([x, x]), torch.cat([tt, tt]), class_labels=torch.cat([labels, null]),
                         return_dict=False)[0]
            e_c, e_u = both.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1).cpu()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (pipeline + training.json + samples.png)")
    p.add_argument("--data-dir", default=None, help="folder with train-{images-idx3,labels-idx1}-ubyte.gz")
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout to the null class")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup-steps", type=int, default=500)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--steps", type=int, default=1_000_000, help="max optimizer steps")
    p.add_argument("--minutes", type=float, default=6.0, help="wall-time budget before sampling / saving")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--compile", action="store_true", help="torch.compile the training forward")
    p.add_argument("--log-every", type=int, default=200)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    import diffusers
    from diffusers import DiTPipeline

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: choose a fresh --out")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out.mkdir(parents=True, exist_ok=True)
    data_dir = find_data_dir(args.data_dir)
    x_all, y_all = load_fashion_mnist(data_dir, "train")
    n_data = x_all.shape[0]
    x_all, y_all = x_all.to(device), y_all.to(device)

    arch = dict(width_heads=args.heads, head_dim=args.head_dim, layers=args.layers)
    model = build_dit(**arch).to(device).eval()        # eval(): no internal label dropout (see doc)
    ema = build_dit(**arch).to(device).eval()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,} ({n_params * 2 / 1e6:.2f} MB fp16); data {tuple(x_all.shape)} from {data_dir}",
          flush=True)
    forward = torch.compile(model) if args.compile else model

    scheduler = build_scheduler()
    opt_kwargs = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW(model.parameters(), **opt_kwargs)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    draw = batch_drawer(x_all, y_all, gen, args.batch_size, True, args.p_uncond, scheduler)
    step, stop_reason, train_time, loss_curve, final_loss = train_loop(
        forward, list(model.parameters()), list(ema.parameters()), opt, draw, args,
        deadline=t_start + args.minutes * 60.0, t_start=t_start)

    t_s = time.time()
    labels = [r for r in range(NULL_CLASS) for _ in range(8)]
    imgs = sample(ema, scheduler.config, len(labels), steps=args.sample_steps, class_labels=labels,
                  seed=args.seed + 1, device=device)
    save_grid(imgs, out / "samples.png", ncol=8)
    sample_time = time.time() - t_s

    ema16 = build_dit(**arch)
    ema16.load_state_dict({k: v.detach().cpu() for k, v in ema.state_dict().items()})
    pipe = DiTPipeline(transformer=ema16.to(torch.float16).eval(), vae=None, scheduler=build_scheduler(),
                       id2label={i: name for i, name in enumerate(FMNIST_CLASSES)})
    pipe.save_pretrained(out, safe_serialization=True)
    info = {
        "model": "DiTTransformer2DModel (adaLN-Zero), patch 2, epsilon prediction, pixel space",
        "class_conditional": True, "null_class_id": NULL_CLASS, "p_uncond": args.p_uncond,
        "classes": FMNIST_CLASSES, "transformer_config": dit_config(**arch), "param_count": n_params,
        "weights": "EMA weights, stored fp16 (transformer/diffusion_pytorch_model.safetensors)",
        "scheduler": "DDPMScheduler, 1000 steps, linear betas 1e-4..0.02, fixed_small variance, clip_sample",
        "dataset": {"name": "Fashion-MNIST (Xiao et al. 2017), train split", "num_images": int(n_data),
                    "preprocessing": "uint8/127.5-1 -> [-1,1]; 28x28 padded by 2 px with -1 to 32x32",
                    "augmentation": "random horizontal flip p=0.5"},
        "training": {"seed": args.seed, "steps": step, "stop_reason": stop_reason,
                     "batch_size": args.batch_size, "epochs": round(step * args.batch_size / n_data, 2),
                     "optimizer": "AdamW(betas=(0.9,0.999), eps=1e-8, fused)", "lr": args.lr,
                     "warmup_steps": args.warmup_steps, "grad_clip": args.grad_clip,
                     "ema_decay": args.ema_decay, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
                     "compiled": bool(args.compile), "time_budget_minutes": args.minutes,
                     "train_wall_time_s": round(train_time, 1),
                     "steps_per_s": round(step / train_time, 2) if train_time > 0 else None,
                     "final_loss": round(final_loss, 5), "loss_curve": loss_curve},
        "samples_png": {"sampler": f"DDIM eta=0, {args.sample_steps} steps, EMA fp32, guidance 1.0",
                        "layout": "10 rows x 8, row r = class r", "seed": args.seed + 1,
                        "time_s": round(sample_time, 1)},
        "environment": {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor(),
                        "torch": torch.__version__, "diffusers": diffusers.__version__,
                        "python": platform.python_version()},
        "command": "python " + " ".join(sys.argv),
        "total_wall_time_s": round(time.time() - t_start, 1),
    }
    (out / "training.json").write_text(json.dumps(info, indent=1))
    print(json.dumps({k: info["training"][k] for k in ("steps", "train_wall_time_s", "final_loss")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
