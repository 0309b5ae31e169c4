#!/usr/bin/env python3
"""Copy the real Fashion-MNIST test split into the package, for FID out of the box.

tfmq's FID reference (``--reference fashion-mnist-test``) is the 10,000 real Fashion-MNIST test
images. They ship inside the package (``src/tfmq/assets/data/fashion-mnist/``, 4.4 MB, MIT
licence, Zalando SE) so that ``pip install`` is all a fresh machine needs; their Inception
statistics are computed on first use and cached (``tfmq.eval.reference``).

This script regenerates that folder from a copy of the original IDX ``.gz`` files (default: the
Debian package ``dataset-fashion-mnist``, ``/usr/share/datasets/fashion-mnist``). The files are
copied byte for byte after checking that they decode to 10,000 28x28 images and 10,000 labels in
0..9; their SHA-256 go to ``SHA256SUMS`` (checked by the tests) and ``README.md`` says where they
come from.

    python scripts/bundle_fashion_mnist_test.py [--source DIR]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import shutil
import struct
from pathlib import Path

import numpy as np

FILES = {"t10k-images-idx3-ubyte.gz": (2051, (10000, 28, 28)), "t10k-labels-idx1-ubyte.gz": (2049, (10000,))}
DEST = Path(__file__).resolve().parent.parent / "src" / "tfmq" / "assets" / "data" / "fashion-mnist"

README = """# Fashion-MNIST test split (real data, bundled for FID)

The original IDX files of the Fashion-MNIST **test** split, unchanged: 10,000 grayscale 28x28
images of Zalando article pictures and their labels (10 classes).

- Source: https://github.com/zalandoresearch/fashion-mnist (copied from the Debian package
  `dataset-fashion-mnist`, version 0.0~git20200523.55506a9-1).
- Licence: MIT. Copyright (c) 2017 Zalando SE. Permission is hereby granted, free of charge, to
  any person obtaining a copy of this data and associated documentation files, to deal in them
  without restriction, subject to including this copyright and permission notice. THE DATA IS
  PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND.
- `SHA256SUMS` holds the files' checksums; `scripts/bundle_fashion_mnist_test.py` regenerates
  this folder.

tfmq reads them through `tfmq.eval.datasets.load_fashion_mnist("test")`: they are the real
reference set of `tfmq evaluate --reference fashion-mnist-test` (FID / sFID).
"""


def check_idx(path: Path, magic: int, shape: tuple[int, ...]) -> np.ndarray:
    """Decode an IDX .gz file and check its header against the expected magic and shape."""
    data = gzip.open(path, "rb").read()
    found = struct.unpack(">I", data[:4])[0]
    dims = struct.unpack(">" + "I" * data[3], data[4:4 + 4 * data[3]])
    if found != magic or tuple(dims) != shape:
        raise SystemExit(f"{path}: magic {found} dims {dims}, expected {magic} {shape}")
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * len(dims))
    if body.size != int(np.prod(shape)):
        raise SystemExit(f"{path}: {body.size} bytes of data, expected {int(np.prod(shape))}")
    return body


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                    help="folder with the original t10k-*.gz files")
    args = ap.parse_args()
    DEST.mkdir(parents=True, exist_ok=True)
    sums = []
    for name, (magic, shape) in FILES.items():
        src = args.source / name
        body = check_idx(src, magic, shape)
        if name.startswith("t10k-labels") and set(np.unique(body).tolist()) != set(range(10)):
            raise SystemExit(f"{src}: labels are not 0..9")
        shutil.copyfile(src, DEST / name)
        sums.append(f"{hashlib.sha256((DEST / name).read_bytes()).hexdigest()}  {name}\n")
    (DEST / "SHA256SUMS").write_text("".join(sums))
    (DEST / "README.md").write_text(README)
    total = sum((DEST / n).stat().st_size for n in FILES)
    print(f"wrote {DEST} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
