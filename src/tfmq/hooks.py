"""Forward hooks that live for one block of code: registered on entry, removed on exit whatever
happens inside (observers of activation ranges, input capture, call-order probes)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from torch import nn
from torch.utils.hooks import RemovableHandle


@contextmanager
def temporary_hooks(hooks: Iterable[tuple[nn.Module, Callable]], *, pre: bool = True,
                    with_kwargs: bool = False) -> Iterator[list[RemovableHandle]]:
    """Register every ``(module, hook)`` pair as a forward pre-hook (``pre=True``) or forward hook
    for the duration of the block; yields the handles. All are removed on exit, also the ones
    registered before an error in the middle of the registrations."""
    handles: list[RemovableHandle] = []
    try:
        for module, fn in hooks:
            register = module.register_forward_pre_hook if pre else module.register_forward_hook
            handles.append(register(fn, with_kwargs=with_kwargs))
        yield handles
    finally:
        for h in handles:
            h.remove()
