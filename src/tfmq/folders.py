"""Output folders written whole or not at all (checkpoints, ONNX exports)."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path


def refuse_nonempty(out_dir: Path, overwrite: bool) -> None:
    """Refuse an existing ``out_dir`` that is a file or a non-empty folder, unless ``overwrite``."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; choose another folder or allow overwriting")


@contextmanager
def written_whole(out_dir: Path):
    """Yield a scratch folder beside ``out_dir`` (``<name>.tfmq-partial``) to write into. When the
    block ends normally the scratch folder replaces ``out_dir`` (an existing one is removed first);
    on any error, Ctrl-C included, it is removed and ``out_dir`` is left as it was."""
    tmp = out_dir.with_name(out_dir.name + ".tfmq-partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
