"""One-pass activation capture: run a model on data and keep what chosen modules see or
produce, stopping the forward pass once every one of them has fired."""
from __future__ import annotations

import torch
import torch.nn as nn

from qlib.hooks import forward_hooks


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_many(model: nn.Module, modules: list[nn.Module], data: torch.Tensor,
                 batch_size: int, dev: torch.device, want: str) -> list[torch.Tensor]:
    """Run ``model`` on ``data`` in batches and collect each module's input or output
    (``want`` = "input" | "output"); the rest of the network is not run. Returns one tensor
    per module, in the order given."""
    if want not in ("input", "output"):
        raise ValueError(f"want must be 'input' or 'output', got {want!r}")
    chunks: list[list[torch.Tensor]] = [[] for _ in modules]
    fired: set[int] = set()

    def make_hook(k):
        def hook(mod, inp, out):
            # a copy: the forward goes on past this module, and an in-place op further on
            # (VGG's ReLU(inplace=True) after a conv) would otherwise overwrite what we keep
            chunks[k].append((inp[0] if want == "input" else out).detach().clone())
            fired.add(k)
            if len(fired) == len(modules):
                raise _Stop
        return hook

    with forward_hooks((m, make_hook(k)) for k, m in enumerate(modules)):
        for i in range(0, len(data), batch_size):
            fired.clear()
            try:
                model(data[i:i + batch_size].to(dev))
            except _Stop:
                pass
    return [torch.cat(c) for c in chunks]


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, data: torch.Tensor, batch_size: int,
            dev: torch.device, want: str) -> torch.Tensor:
    """:func:`capture_many` for one module."""
    return capture_many(model, [module], data, batch_size, dev, want)[0]
