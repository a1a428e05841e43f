"""Per-layer histogram tokens (predictor preprint, Fig. 2): what the accuracy predictor
(chapter 5) reads and what the one-image generator (chapter 6) is trained through::

    ranges = float_ranges(float_model, probe)                          # per layer, from the float model
    tokens = layer_histograms(qmodel, probe, bins=32, ranges=ranges)   # L × 64

A token is one layer's output feature map as two histograms over the same bins:

* the **rate branch**: the share of the layer's values in each bin (sums to 1);
* the **count branch**: the count per image on a log scale, log(1 + c/N) / log(1 + V) for
  c values in the bin over N images and V values per image. Dividing by N makes it
  independent of how many images were fed (chapter 6 feeds one); dividing the log by
  log(1 + V) puts every layer on [0, 1] whatever its size (a bin holding every value is 1).
  A linear count per image would be the rate times V, a constant per layer, and carry
  nothing the rate branch lacks; the log makes this branch a view of the tails, where a
  few outliers that quantization pushes out of the float range are visible.

Bin edges are fixed per layer from the **float** model: the minimum and maximum of its
output on the probe images, so the float model fills the range and every value a quantized
model pushes beyond it lands in the two end bins (clamped there, never dropped).
"""
from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from qlib.graph import fold_bn, quantizable_layers
from qlib.hooks import forward_hooks
from qlib.quant import quant_layers


def check_bins(bins) -> int:
    """``bins`` if it is a usable bin count per branch, else a ValueError saying why."""
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
        raise ValueError(f"bins must be an integer ≥ 2 (bins per histogram branch), got {bins!r}")
    return bins


def check_images(model: nn.Module, images) -> None:
    """A ValueError unless ``images`` is a non-empty, finite N × C × H × W batch with the
    channels ``model``'s first convolution takes."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor N × C × H × W, got {shape}")
    if len(images) == 0:
        raise ValueError("images is empty: pass at least one image")
    if not torch.isfinite(images).all():
        raise ValueError("images has NaN or infinite values: histograms of them mean nothing; fix the images")
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d) or
                  (hasattr(m, "w_int") and m.w_int.dim() == 4)), None)
    if first is not None:
        c_in = first.in_channels if isinstance(first, nn.Conv2d) else first.w_int.shape[1] * first.conv["groups"]
        if images.shape[1] != c_in:
            raise ValueError(f"images have {images.shape[1]} channels; the model's first layer takes {c_in}")


def check_ranges(names: list[str], ranges: dict) -> None:
    """A ValueError naming the token layers that ``ranges`` lacks."""
    missing = [n for n in names if n not in ranges]
    if missing:
        raise ValueError(f"ranges lacks layers {missing}; build them with float_ranges() on this "
                         "architecture's float model (or use its predictor's ranges)")


def histogram_counts(values: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi]; values below lo count in
    the first bin, above hi in the last (clamped, so the counts sum to values.numel())."""
    check_bins(bins)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"histogram range must be finite with hi > lo, got [{lo}, {hi}]")
    v = values.detach().reshape(-1).float().clamp(lo, hi)
    return torch.histc(v, bins=bins, min=lo, max=hi)


def token_from_counts(counts: torch.Tensor, n_images: float, values_per_image: float) -> torch.Tensor:
    """One layer's token, count branch ⊕ rate branch (see the module docstring): 2 × bins."""
    counts = counts.double()
    total = counts.sum().clamp_min(1)
    count_branch = torch.log1p(counts / n_images) / math.log1p(values_per_image)
    return torch.cat([count_branch, counts / total]).float()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """All of ``t``'s values as a 1-D tensor, a feature map's in channels-last order (N, H,
    W, C) whatever its memory format: a view for the channels-last maps histogram_pass asks
    for, a copy where a backend returns NCHW. The order is fixed because a ``stride`` > 1
    reads every stride-th value of it: read in memory order, a machine whose convolution
    kernels return another format would sample other values (token differences ~1e-2,
    seen with oneDNN switched off), not the same values with last-bit noise."""
    if t.dim() == 4:
        t = t.permute(0, 2, 3, 1)
    return t.reshape(-1)


def token_layers(model: nn.Module) -> list[str]:
    """The layers a model's tokens describe: its QuantLayers if it is quantized, else every
    Conv2d/Linear (the layers quantize() would replace), in forward-registration order."""
    q = list(quant_layers(model))
    return q if q else quantizable_layers(model)


def _check_pass_args(images: torch.Tensor, stride, keep_counts) -> None:
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an integer ≥ 1, got {stride!r}")
    bad = [n for n in keep_counts if not isinstance(n, int) or not 1 <= n <= len(images)]
    if bad:
        raise ValueError(f"keep_counts must be image counts in 1..{len(images)}, got {bad}")


@torch.no_grad()  # not inference_mode: its tensors could not feed a predictor's training
def histogram_pass(model: nn.Module, images: torch.Tensor, bins: int, ranges: dict[str, tuple[float, float]],
                   *, stride: int = 1, batch_size: int = 250, labels: torch.Tensor | None = None,
                   keep_counts: tuple[int, ...] = ()) -> dict:
    """One forward pass over ``images`` that histograms every token layer's output and keeps
    the predictions. ``stride`` > 1 histograms every stride-th value of each map (an
    unbiased estimate for the full test set at a fraction of the cost; the values in (N, H,
    W, C) order, whatever memory format a backend returns). Returns
    ``tokens`` (L × 2·bins), ``preds`` (N), ``acc`` (% if ``labels`` given) and ``seconds``;
    with ``keep_counts`` = (16, 64, …) also ``counts`` {n: L × bins raw counts over the first
    n images} and ``values_per_image`` (V per layer), from which :func:`tokens_from_counts`
    makes the tokens of any of those prefixes at ``bins`` or fewer bins (chapter 7)."""
    check_bins(bins)
    check_images(model, images)
    _check_pass_args(images, stride, keep_counts)
    names = token_layers(model)
    check_ranges(names, ranges)
    start = time.perf_counter()
    counts = {n: torch.zeros(bins, dtype=torch.float64) for n in names}
    per_image = {}

    def make_hook(n):
        lo, hi = ranges[n]
        histogram_counts(torch.zeros(1), bins, lo, hi)  # checks the range once, not per batch

        def hook(mod, inp, out):
            # histogram_counts without its checks: this runs once per layer and batch
            per_image[n] = out[0].numel()
            counts[n] += torch.histc(_flat(out)[::stride].clamp(lo, hi), bins=bins, min=lo, max=hi)
        return hook

    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    preds, kept = [], {}
    # batch edges at every multiple of batch_size and at every prefix whose counts are kept
    edges = sorted(set(range(0, len(images), batch_size)) | set(keep_counts) | {len(images)})
    try:
        with forward_hooks((model.get_submodule(n), make_hook(n)) for n in names):
            for i, j in zip(edges[:-1], edges[1:]):
                x = images[i:j].contiguous(memory_format=torch.channels_last)
                preds.append(model(x).argmax(1))
                if j in keep_counts:
                    kept[j] = torch.stack([counts[k].clone() * stride for k in names])
    finally:
        model.train(was_training).to(memory_format=torch.contiguous_format)
    tokens = torch.stack([token_from_counts(counts[k] * stride, len(images), per_image[k]) for k in names])
    preds = torch.cat(preds)
    out = {"tokens": tokens, "preds": preds, "seconds": time.perf_counter() - start}
    if keep_counts:
        out["counts"], out["values_per_image"] = kept, [per_image[k] for k in names]
    if labels is not None:
        out["acc"] = 100 * (preds == labels).float().mean().item()
    return out


@torch.no_grad()
def per_image_counts(model: nn.Module, images: torch.Tensor, bins: int, ranges: dict[str, tuple[float, float]],
                     *, batch_size: int = 250) -> tuple[torch.Tensor, list[int]]:
    """Every image's own raw counts in every token layer: N × L × bins, and the values per
    image of each layer. The counts of a set of images are the sum of its rows, so
    :func:`tokens_from_counts` gives the tokens of any subset of ``images`` from this one
    pass (chapter 6 trains a predictor on tokens of random subsets of 1 to P images)."""
    check_bins(bins)
    check_images(model, images)
    names = token_layers(model)
    check_ranges(names, ranges)
    for n in names:
        histogram_counts(torch.zeros(1), bins, *ranges[n])  # checks every range once
    counts = torch.zeros(len(images), len(names), bins)
    per_image, at = {}, [0]

    def make_hook(k, n):
        lo, hi = ranges[n]

        def hook(mod, inp, out):
            per_image[n] = out[0].numel()
            for b in range(len(out)):
                counts[at[0] + b, k] = torch.histc(out[b].reshape(-1).clamp(lo, hi), bins=bins, min=lo, max=hi)
        return hook

    was_training = model.training
    model.eval()
    try:
        with forward_hooks((model.get_submodule(n), make_hook(k, n)) for k, n in enumerate(names)):
            for i in range(0, len(images), batch_size):
                at[0] = i
                model(images[i:i + batch_size])
    finally:
        model.train(was_training)
    return counts, [per_image[n] for n in names]


def tokens_from_counts(counts: torch.Tensor, n_images: int, values_per_image: list[int],
                       merge: int = 1) -> torch.Tensor:
    """Tokens (L × 2·bins/merge) from raw per-layer counts (L × bins, as histogram_pass's
    ``counts``), adjacent bins summed ``merge`` at a time: the bins are equal over the same
    range, so merged counts are exactly the counts at bins/merge."""
    if not isinstance(merge, int) or merge < 1 or counts.shape[1] % merge:
        raise ValueError(f"merge must be a positive divisor of the {counts.shape[1]} bins, got {merge!r}")
    merged = counts.reshape(counts.shape[0], -1, merge).sum(2)
    return torch.stack([token_from_counts(c, n_images, v) for c, v in zip(merged, values_per_image)])


#: How far one model's tokens, measured on two machines, may differ: in any one value, and
#: on average over a token tensor. Not zero: where two machines' convolution kernels differ
#: (oneDNN picks them by CPU), a value at a bin edge can land in the next bin, and with
#: quantized activations a value at a rounding threshold on the next level; the shipped
#: record's float16 storage adds at most 2.4e-4. Measured against the shipped record with
#: oneDNN switched off (the most different kernels one machine has): at most 2.8e-3 in one
#: value, 7e-5 on average; chapter 7's check in a fresh-clone run, 4.3e-3 in one value. One
#: value that changes bin moves a sparse bin's count branch by up to log1p(1/256)/log1p(10)
#: ≈ 1.6e-3 in the 10-logit layer (256 probe images, V = 10), so the largest difference is a
#: count of such values: SAME_MAX allows about a dozen in one bin, a guard against gross
#: errors only. The mean decides: tokens read from other values fail it (the memory-order
#: slip that ``_flat`` now rules out gave 8e-4 on average, 1.7e-2 in one value).
SAME_MAX, SAME_MEAN = 2e-2, 2e-4


def difference(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """The largest and the mean absolute difference between two token tensors of one shape
    (compare with :data:`SAME_MAX` and :data:`SAME_MEAN`)."""
    if a.shape != b.shape:
        raise ValueError(f"token tensors of different shapes: {tuple(a.shape)} and {tuple(b.shape)}")
    d = (a.float() - b.float()).abs()
    return float(d.max()), float(d.mean())


def layer_histograms(model: nn.Module, images: torch.Tensor, bins: int,
                     ranges: dict[str, tuple[float, float]]) -> torch.Tensor:
    """Fig. 2: for every quantized layer (every Conv2d/Linear of a float model), the
    histogram of its output feature map on ``images`` as one token, count branch ⊕ rate
    branch, over the fixed per-layer ``ranges`` (values outside go to the end bins).
    Returns L × 2·bins."""
    return histogram_pass(model, images, bins, ranges)["tokens"]


@torch.no_grad()
def float_ranges(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> dict[str, tuple[float, float]]:
    """Per-layer histogram ranges: min and max of the BN-folded float model's layer outputs
    on ``images`` (the outputs quantize()'s layers will produce)."""
    check_images(model, images)
    fp = fold_bn(model).eval()
    names = quantizable_layers(fp)
    lo = {n: math.inf for n in names}
    hi = {n: -math.inf for n in names}

    def make_hook(n):
        def hook(mod, inp, out):
            lo[n] = min(lo[n], float(out.min()))
            hi[n] = max(hi[n], float(out.max()))
        return hook

    with forward_hooks((fp.get_submodule(n), make_hook(n)) for n in names):
        for i in range(0, len(images), batch_size):
            fp(images[i:i + batch_size])
    return {n: (lo[n], hi[n] if hi[n] > lo[n] else lo[n] + 1e-6) for n in names}
