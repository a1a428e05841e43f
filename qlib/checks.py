"""Argument checks shared by qlib's public functions.

Every check raises a ``ValueError`` that names the argument, says what was wrong with the
value it got, and what to pass instead: the inputs people pass by mistake (an infinite τ,
a NaN image, a zero batch size, RGB images for a grey model) fail at the call, not deep
inside a convolution or, worse, not at all.
"""
from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn


def number(value, name: str, *, low: float | None = None, strict: bool = False, meaning: str = "") -> float:
    """``value`` as a float: a real number (not a bool), finite, and ≥ ``low`` (> with
    ``strict``). ``meaning`` says in the message what the number is."""
    what = f" ({meaning})" if meaning else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number{what}, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite{what}, got {value!r}")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name} must be {'>' if strict else '≥'} {low:g}{what}, got {value!r}")
    return value


def integer(value, name: str, *, low: int = 0, meaning: str = "") -> int:
    """``value`` as an int ≥ ``low`` (a bool or a float like 2.0 is refused)."""
    what = f" ({meaning})" if meaning else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer ≥ {low}{what}, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ValueError(f"{name} must be an integer ≥ {low}{what}, got {value!r}")
    return int(value)


def first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first Conv2d or Linear layer registered in ``model``, with its name."""
    for n, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return n, m
    return None


def images(x, name: str, model: nn.Module | None = None) -> torch.Tensor:
    """A non-empty floating-point tensor N × C × H × W with finite values whose channels
    match ``model``'s first layer."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of images N × C × H × W, got {type(x).__name__}; "
                         "convert with torch.as_tensor(...).float()")
    if x.dim() < 2 or len(x) == 0:
        raise ValueError(f"{name} must hold at least one input (N × C × H × W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point (preprocessed like the training data), got {x.dtype}")
    bad = (~torch.isfinite(x)).flatten(1).any(1)
    if bad.any():
        raise ValueError(f"{name} has NaN or infinite values in {int(bad.sum())} of {len(x)} inputs "
                         f"(the first is #{int(bad.nonzero()[0])}): drop or fix them before calibrating")
    layer = first_layer(model) if model is not None else None
    if layer is not None and isinstance(layer[1], nn.Conv2d):
        n, conv = layer
        if x.dim() != 4 or x.shape[1] != conv.in_channels:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, but the model's first layer {n!r} takes "
                             f"{conv.in_channels}-channel images: pass N × {conv.in_channels} × H × W inputs")
    return x


def finite_model(model: nn.Module) -> nn.Module:
    """Refuse a float model with NaN or infinite weights or statistics: quantizing it would
    spread them through every step size."""
    for kind, items in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for n, t in items:
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise ValueError(f"the float model's {kind} {n!r} has NaN or infinite values; "
                                 "reload or fix the checkpoint before quantizing it")
    return model
