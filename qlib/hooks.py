"""Forward hooks that live exactly as long as a ``with`` block, removed however it ends
(also when the forward raises)::

    with hooks.forward_hooks([(layer, fn) for layer in layers]):
        model(x)        # every fn(module, inputs, output) fires here
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

import torch.nn as nn


@contextmanager
def forward_hooks(pairs: Iterable[tuple[nn.Module, Callable]], *, pre: bool = False) -> Iterator[None]:
    """Register ``fn`` on ``module`` for each (module, fn) in ``pairs`` — a forward hook
    ``fn(module, inputs, output)``, or with ``pre`` a forward pre-hook ``fn(module, inputs)`` —
    and remove every one of them when the block ends, however it ends."""
    handles = []
    try:
        for module, fn in pairs:
            handles.append(module.register_forward_pre_hook(fn) if pre else module.register_forward_hook(fn))
        yield
    finally:
        for h in handles:
            h.remove()
