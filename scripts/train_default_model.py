#!/usr/bin/env python3
"""Train the small DDPM that tfmq ships as its default model.

The model is a ``diffusers.UNet2DModel`` of the DDPM-CIFAR10 layout
(DownBlock2D, AttnDownBlock2D with attention at 16x16, DownBlock2D,
DownBlock2D and the mirrored up path, two ResNet layers per block,
GroupNorm(32)) made narrower, trained with epsilon prediction on the real
Fashion-MNIST training set (60,000 images, 28x28 padded to 32x32 with the
background value).  The weights that are saved are an exponential moving
average of the training weights, cast to fp16, as a ``DDPMPipeline`` folder
(``unet/`` + ``scheduler/`` + ``model_index.json``) that
``DDPMPipeline.from_pretrained(folder)`` loads offline.

With ``--cond`` the same network gets ``num_class_embeds=11``: the ten
Fashion-MNIST classes plus a null class (id 10) used for classifier-free
guidance; labels are replaced by the null class with probability
``--p-uncond`` during training.  ``DDPMPipeline.__call__`` does not pass
class labels, so sample that model with :func:`sample` below (or any loop
that passes ``class_labels`` to the UNet).

Training stops after ``--steps`` steps or once ``--minutes`` of wall time
(counted from the start of the script) have passed, whichever comes first,
and then still samples a grid and saves.  Everything needed to reproduce the
run is written to ``training.json`` next to the weights.

Example (as used for the shipped assets, on one H100/H200)::

    python scripts/train_default_model.py --out runs/fmnist-ddpm --minutes 7.75
    python scripts/train_default_model.py --out runs/fmnist-ddpm-cond --cond --minutes 7.75
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

FMNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
NULL_CLASS = 10
DEFAULT_DATA_DIRS = (".data", "/usr/share/datasets/fashion-mnist")


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------

def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzip-compressed) into a numpy array."""
    import lzma
    opener = gzip.open if str(path).endswith(".gz") else lzma.open if str(path).endswith(".xz") else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path}: expected {shape}, found {data.size} bytes")
    return data.reshape(shape)


def _idx_file(folder: Path, stem: str) -> Path | None:
    """``folder/stem.gz`` or ``folder/stem.xz`` (xz: smaller, for the GPU machine's carry limit)."""
    return next((folder / f"{stem}{ext}" for ext in (".gz", ".xz") if (folder / f"{stem}{ext}").exists()), None)


def find_data_dir(explicit: str | None) -> Path:
    candidates = [explicit] if explicit else list(DEFAULT_DATA_DIRS)
    for cand in candidates:
        p = Path(cand)
        if _idx_file(p, "train-images-idx3-ubyte") and _idx_file(p, "train-labels-idx1-ubyte"):
            return p
    raise FileNotFoundError(
        "Fashion-MNIST training files not found in " + ", ".join(map(str, candidates))
        + " (Debian package dataset-fashion-mnist installs them to /usr/share/datasets/fashion-mnist)"
    )


def load_fashion_mnist(data_dir: Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float32 in [-1, 1], shape (N, 1, 32, 32), padded with -1; labels int64."""
    prefix = "train" if split == "train" else "t10k"
    imgs = _read_idx(_idx_file(data_dir, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_idx_file(data_dir, f"{prefix}-labels-idx1-ubyte"))
    x = torch.from_numpy(imgs.copy()).float().div_(127.5).sub_(1.0).unsqueeze(1)
    x = F.pad(x, (2, 2, 2, 2), value=-1.0)  # 28x28 -> 32x32, background value
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


# ----------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------

def unet_config(block_out_channels=(64, 64, 96, 96), num_class_embeds: int | None = None) -> dict:
    """DDPM-CIFAR10 style UNet2DModel config, 1 channel, 32x32, narrower."""
    return dict(
        sample_size=32,
        in_channels=1,
        out_channels=1,
        center_input_sample=False,
        time_embedding_type="positional",
        freq_shift=1,
        flip_sin_to_cos=False,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=tuple(block_out_channels),
        layers_per_block=2,
        mid_block_scale_factor=1,
        downsample_padding=0,
        dropout=0.0,
        act_fn="silu",
        attention_head_dim=None,
        norm_num_groups=32,
        norm_eps=1e-6,
        num_class_embeds=num_class_embeds,
    )


def build_unet(block_out_channels=(64, 64, 96, 96), num_class_embeds: int | None = None):
    from diffusers import UNet2DModel

    return UNet2DModel(**unet_config(block_out_channels, num_class_embeds))


def build_scheduler():
    """DDPM (Ho et al. 2020): T=1000, linear betas 1e-4..0.02, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
    )


# ----------------------------------------------------------------------------
# sampling and grids
# ----------------------------------------------------------------------------

@torch.no_grad()
def sample(unet, scheduler_config, n: int, steps: int = 100, class_labels=None,
           guidance_scale: float = 1.0, seed: int = 0, device=None, dtype=None) -> torch.Tensor:
    """DDIM (eta=0) sampling; returns images in [-1, 1], shape (n, C, H, W), float32 on CPU.

    For a class-conditional UNet pass ``class_labels`` (n ints); with
    ``guidance_scale != 1`` classifier-free guidance against the null class
    is used: eps = eps_null + s * (eps_cond - eps_null).
    """
    from diffusers import DDIMScheduler

    device = device or next(unet.parameters()).device
    dtype = dtype or next(unet.parameters()).dtype
    sched = DDIMScheduler.from_config(scheduler_config)
    sched.set_timesteps(steps)
    g = torch.Generator(device="cpu").manual_seed(seed)
    c = unet.config.in_channels
    s = unet.config.sample_size
    x = torch.randn((n, c, s, s), generator=g).to(device=device, dtype=torch.float32)
    labels = None
    if class_labels is not None:
        labels = torch.as_tensor(class_labels, dtype=torch.long, device=device)
    for t in sched.timesteps:
        inp = x.to(dtype)
        if labels is None:
            eps = unet(inp, t, return_dict=False)[0].float()
        elif guidance_scale == 1.0:
            eps = unet(inp, t, class_labels=labels, return_dict=False)[0].float()
        else:
            null = torch.full_like(labels, NULL_CLASS)
            both = unet(torch.cat([inp, inp]), t, class_labels=torch.cat([labels, null]),
                        return_dict=False)[0].float()
            e_c, e_u = both.chunk(2)
            eps = e_u + guidance_scale * (e_c - e_u)
        x = sched.step(eps, t, x, eta=0.0).prev_sample
    return x.clamp(-1, 1).cpu()


def save_grid(images: torch.Tensor, path, ncol: int = 8, pad: int = 2, scale: int = 1) -> None:
    """Write images in [-1, 1] (N, 1|3, H, W) as one PNG grid with PIL."""
    from PIL import Image

    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    n, c, h, w = x.shape
    nrow = math.ceil(n / ncol)
    grid = np.full((pad + nrow * (h + pad), pad + ncol * (w + pad), c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = x[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    if scale != 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)


# ----------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------


def batch_drawer(x_all: torch.Tensor, y_all: torch.Tensor | None, gen: torch.Generator, batch_size: int,
                 flip: bool, p_uncond: float, scheduler):
    """A function drawing one training batch ``(x_t, t, labels, noise)`` for epsilon prediction:
    random images (horizontally flipped with probability 1/2 if ``flip``), labels replaced by the
    null class with probability ``p_uncond`` (none without ``y_all``), a uniform timestep and
    Gaussian noise, all from ``gen`` in that order."""
    device = x_all.device
    ac = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    sqrt_ac, sqrt_1m_ac = ac.sqrt(), (1.0 - ac).sqrt()
    T = scheduler.config.num_train_timesteps

    def draw():
        idx = torch.randint(0, x_all.shape[0], (batch_size,), device=device, generator=gen)
        x0 = x_all[idx]
        if flip:
            flipped = torch.rand(batch_size, device=device, generator=gen) < 0.5
            x0 = torch.where(flipped[:, None, None, None], x0.flip(3), x0)
        labels = None
        if y_all is not None:
            labels = y_all[idx]
            drop = torch.rand(batch_size, device=device, generator=gen) < p_uncond
            labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
        t = torch.randint(0, T, (batch_size,), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        xt = sqrt_ac[t].view(-1, 1, 1, 1) * x0 + sqrt_1m_ac[t].view(-1, 1, 1, 1) * noise
        return xt, t, labels, noise
    return draw


def train_loop(forward, params: list, ema_params: list, opt, draw, args, deadline: float, t_start: float):
    """The training loop of the shipped models: AdamW with linear warm-up of the learning rate
    (``args.lr``, ``args.warmup_steps``), bf16 autocast on CUDA, MSE on the noise, gradient
    clipping (``args.grad_clip`` > 0), EMA with warm-up (decay ``min(args.ema_decay, (1 + s) /
    (10 + s))``), a loss line every ``args.log_every`` steps; stops after ``args.steps`` steps
    or at ``deadline`` (``time.time()``). Returns ``(steps, stop_reason, train_seconds,
    loss_curve, final_loss)``."""
    device = params[0].device
    use_amp = device.type == "cuda"
    loss_curve, running, running_n, step = [], torch.zeros((), device=device), 0, 0
    t_train = time.time()
    stop_reason = "steps"
    while step < args.steps:
        if time.time() > deadline:
            stop_reason = "time budget"
            break
        xt, t, labels, noise = draw()
        lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            pred = forward(xt, t, class_labels=labels, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        decay = min(args.ema_decay, (1.0 + step) / (10.0 + step))     # EMA warm-up
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        running += loss.detach()
        running_n += 1
        step += 1
        if step % args.log_every == 0:
            avg = (running / running_n).item()
            running.zero_()
            running_n = 0
            loss_curve.append([step, round(avg, 5)])
            print(f"step {step} loss {avg:.4f} lr {lr:.2e} {step / (time.time() - t_train):.1f} it/s "
                  f"elapsed {time.time() - t_start:.0f}s", flush=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    train_time = time.time() - t_train
    if running_n:
        loss_curve.append([step, round((running / running_n).item(), 5)])
    final_loss = float(np.mean([l for _, l in loss_curve[-3:]])) if loss_curve else float("nan")
    print(f"stopped ({stop_reason}) after {step} steps, {train_time:.1f} s training, final loss {final_loss:.4f}",
          flush=True)
    return step, stop_reason, train_time, loss_curve, final_loss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (pipeline + training.json + samples.png)")
    p.add_argument("--data-dir", default=None, help="folder with train-{images-idx3,labels-idx1}-ubyte.gz")
    p.add_argument("--cond", action="store_true", help="class-conditional model (10 classes + null id 10)")
    p.add_argument("--p-uncond", type=float, default=0.1, help="label dropout to the null class (--cond)")
    p.add_argument("--channels", default="64,64,96,96", help="block_out_channels")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup-steps", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9995)
    p.add_argument("--steps", type=int, default=1_000_000, help="max optimizer steps")
    p.add_argument("--minutes", type=float, default=8.0, help="wall-time budget for the whole script before sampling/saving")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-flip", action="store_true", help="disable random horizontal flips")
    p.add_argument("--sample-steps", type=int, default=100, help="DDIM steps for the grid")
    p.add_argument("--n-samples", type=int, default=64)
    # 1.0 = plain conditional sampling.  The shipped conditional model was
    # trained with this script and its grid first sampled with CFG 2.0, which
    # over-shoots badly at this model size/training length (blocky, saturated
    # garments; 1.5 still shows artefacts), so the default is now 1.0.
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale for the --cond grid")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--device", default=None)
    return p.parse_args(argv)


def main(argv=None) -> int:
    t_start = time.time()
    args = parse_args(argv)
    from diffusers import DDPMPipeline
    import diffusers

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data_dir = find_data_dir(args.data_dir)
    x_all, y_all = load_fashion_mnist(data_dir, "train")
    n_data = x_all.shape[0]
    x_all = x_all.to(device)
    y_all = y_all.to(device)

    channels = tuple(int(c) for c in args.channels.split(","))
    num_class_embeds = NULL_CLASS + 1 if args.cond else None
    model = build_unet(channels, num_class_embeds).to(device).train()
    ema = build_unet(channels, num_class_embeds).to(device).eval()
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,} ({n_params * 2 / 1e6:.2f} MB in fp16); data: {tuple(x_all.shape)} from {data_dir}",
          flush=True)

    scheduler = build_scheduler()

    opt_kwargs = dict(lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=args.weight_decay)
    if device.type == "cuda":
        opt_kwargs["fused"] = True
    opt = torch.optim.AdamW(model.parameters(), **opt_kwargs)
    model_params = list(model.parameters())
    ema_params = list(ema.parameters())

    gen = torch.Generator(device=device).manual_seed(args.seed)
    draw = batch_drawer(x_all, y_all if args.cond else None, gen, args.batch_size, not args.no_flip,
                        args.p_uncond, scheduler)
    step, stop_reason, train_time, loss_curve, final_loss = train_loop(
        model, model_params, ema_params, opt, draw, args, deadline=t_start + args.minutes * 60.0, t_start=t_start)

    # ---- sample a grid with the EMA weights (fp32 on the training device) ----
    t_s = time.time()
    labels = None
    n = args.n_samples
    ncol = 8
    if args.cond:
        ncol = 8
        n_rows = NULL_CLASS  # one row per class
        n = n_rows * ncol
        labels = [r for r in range(n_rows) for _ in range(ncol)]
    imgs = sample(ema, scheduler.config, n, steps=args.sample_steps, class_labels=labels,
                  guidance_scale=args.guidance_scale if args.cond else 1.0, seed=args.seed + 1,
                  device=device, dtype=torch.float32)
    save_grid(imgs, out / "samples.png", ncol=ncol)
    sample_time = time.time() - t_s

    # ---- save the EMA weights in fp16 as a DDPMPipeline ----
    ema_fp16 = build_unet(channels, num_class_embeds)
    ema_fp16.load_state_dict({k: v.detach().cpu() for k, v in ema.state_dict().items()})
    ema_fp16 = ema_fp16.to(torch.float16).eval()
    pipe = DDPMPipeline(unet=ema_fp16, scheduler=build_scheduler())
    pipe.save_pretrained(out, safe_serialization=True)

    info = {
        "model": "UNet2DModel (DDPM-CIFAR10 layout, narrower), epsilon prediction",
        "class_conditional": bool(args.cond),
        "num_class_embeds": num_class_embeds,
        "null_class_id": NULL_CLASS if args.cond else None,
        "p_uncond": args.p_uncond if args.cond else None,
        "classes": FMNIST_CLASSES,
        "unet_config": {k: (list(v) if isinstance(v, tuple) else v)
                        for k, v in unet_config(channels, num_class_embeds).items()},
        "param_count": n_params,
        "weights": "EMA weights, stored fp16 (unet/diffusion_pytorch_model.safetensors)",
        "scheduler": "DDPMScheduler, 1000 steps, linear betas 1e-4..0.02, fixed_small variance, clip_sample",
        "dataset": {
            "name": "Fashion-MNIST (Xiao et al. 2017), train split",
            "source": "Debian package dataset-fashion-mnist: train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz",
            "num_images": int(n_data),
            "preprocessing": "uint8/127.5-1 -> [-1,1]; 28x28 padded by 2 px per side with -1 to 32x32; 1 channel",
            "augmentation": "none" if args.no_flip else "random horizontal flip p=0.5",
        },
        "training": {
            "seed": args.seed,
            "steps": step,
            "max_steps": args.steps,
            "stop_reason": stop_reason,
            "batch_size": args.batch_size,
            "images_seen": step * args.batch_size,
            "epochs": round(step * args.batch_size / n_data, 2),
            "optimizer": "AdamW(betas=(0.9,0.999), eps=1e-8)",
            "lr": args.lr,
            "warmup_steps": args.warmup_steps,
            "lr_schedule": "linear warm-up then constant",
            "weight_decay": args.weight_decay,
            "grad_clip": args.grad_clip,
            "ema_decay": args.ema_decay,
            "ema_warmup": "decay_t = min(ema_decay, (1+t)/(10+t))",
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "time_budget_minutes": args.minutes,
            "train_wall_time_s": round(train_time, 1),
            "total_wall_time_s": round(time.time() - t_start, 1),
            "steps_per_s": round(step / train_time, 2) if train_time > 0 else None,
            "final_loss": round(final_loss, 5),
            "final_loss_definition": f"mean of the last {min(3, len(loss_curve))} logged {args.log_every}-step loss averages",
            "loss_curve": loss_curve,
        },
        "samples_png": {
            "sampler": f"DDIM eta=0, {args.sample_steps} steps, EMA weights fp32",
            "n": n,
            "layout": "one row per class 0..9 (see classes), CFG" if args.cond else "8x8",
            "guidance_scale": args.guidance_scale if args.cond else None,
            "seed": args.seed + 1,
            "time_s": round(sample_time, 1),
        },
        "environment": {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": sys.version.split()[0],
        },
        "command": "python scripts/train_default_model.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    with open(out / "training.json", "w") as fh:
        json.dump(info, fh, indent=1)
    print(f"saved to {out} ({sum(f.stat().st_size for f in out.rglob('*') if f.is_file()) / 1e6:.2f} MB)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
