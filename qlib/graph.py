"""Model surgery: BatchNorm folding, the layers a quantizer can take, and the units that
block reconstruction calibrates one at a time.

Blocks are recognised by type: torchvision's residual and inverted-residual blocks by
default, or whatever module types a caller names (their own block classes, or none for
layer-by-layer reconstruction).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torchvision.models.mobilenetv2 import InvertedResidual
from torchvision.models.resnet import BasicBlock, Bottleneck

SUPPORTED = (nn.Conv2d, nn.Linear)
#: Modules calibrated as one unit, their inner layers optimised jointly (the paper's §4.1).
DEFAULT_BLOCKS: tuple[type, ...] = (BasicBlock, Bottleneck, InvertedResidual)
# Modules with weights that quantize() leaves in float: a BatchNorm with no conv before it.
PASSIVE = (nn.BatchNorm2d,)


@torch.no_grad()
def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d folded into the Conv2d registered just
    before it (conv then BN is how torchvision and our models build their layers):
    W' = W·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β; the BN becomes an Identity. The copy is
    in eval mode and matches the original's eval outputs to float rounding."""
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        prev = None
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d)
                    and prev.out_channels == child.num_features):
                scale = child.weight / torch.sqrt(child.running_var + child.eps)
                prev.weight.mul_(scale.view(-1, 1, 1, 1))
                bias = prev.bias if prev.bias is not None else torch.zeros_like(child.running_mean)
                prev.bias = nn.Parameter((bias - child.running_mean) * scale + child.bias)
                setattr(parent, name, nn.Identity())
                prev = None
                continue
            prev = child
    return model


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear layers, in registration order; a ValueError names any
    other module holding weights, since quantize() could not quantize it."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, SUPPORTED):
            names.append(name)
        elif list(m.parameters(recurse=False)) and not isinstance(m, PASSIVE):
            raise ValueError(
                f"layer {name!r} of type {type(m).__name__} holds weights but cannot be quantized; "
                f"supported weight layers: Conv2d, Linear (BatchNorm2d is folded into its conv)"
            )
    if not names:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    return names


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called ``name`` (dotted path) by ``new``."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def check_blocks(blocks) -> tuple[type, ...]:
    """``blocks`` as a tuple of module types; None gives :data:`DEFAULT_BLOCKS`."""
    if blocks is None:
        return DEFAULT_BLOCKS
    blocks = tuple(blocks) if isinstance(blocks, (list, tuple)) else (blocks,)
    bad = [b for b in blocks if not (isinstance(b, type) and issubclass(b, nn.Module))]
    if bad:
        raise ValueError(f"blocks must be nn.Module subclasses (e.g. torchvision's BasicBlock), "
                         f"got {bad!r}; pass () for layer-by-layer reconstruction")
    return blocks


def calibration_units(model: nn.Module, leaves: tuple[type, ...],
                      blocks: tuple[type, ...] = DEFAULT_BLOCKS) -> list[str]:
    """The modules reconstructed one at a time, in registration order: every module whose
    type is in ``blocks`` as a whole, and every ``leaves`` module (a quantized layer) that
    no block contains on its own."""
    units: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(u + ".") for u in units):
            continue
        if isinstance(m, blocks) or isinstance(m, leaves):
            units.append(name)
    return units
