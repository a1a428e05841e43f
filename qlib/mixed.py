"""Mixed precision by lossy coding length (paper §3.4, eq. 8–12, Algorithm 1), the model size
that Table 4 reports, and a greedy allocator as an equal-size baseline.

A layer's weight becomes W ∈ R^{n×m}, a set of m vectors of n dimensions: the m vectors are
the output channels (one filter per row of a Conv2d weight C_out × C_in × k × k, or one row
of a Linear weight), each with n = C_in·k·k (Linear: in_features) entries. Layers whose
filters carry more information at a fixed distortion ε² get a longer code, and the longer
codes get the wider bit widths::

    bits = allocate_bits(model, [3, 4, 5, 6], eps2=1e-3)        # {layer: bits}
    qmodel = quant.quantize(model, calib, w_bits=bits, rounding="attention")
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn

from qlib import checks
from qlib.graph import fold_bn, quantizable_layers
from qlib.rounding import check_bits, fake_quant, search_weight_scale

#: the coding distortion ε² the book uses (chapter 4, the population's Algorithm-1 draws,
#: the widgets): the paper does not give its value; chapter 4 sweeps it
EPS2 = 1e-3


def as_vectors(weight: torch.Tensor) -> torch.Tensor:
    """The n × m matrix of eq. 8–12 for a Conv2d or Linear weight: column i is output
    channel i's filter flattened (n = C_in·k·k, m = C_out)."""
    return weight.detach().reshape(weight.shape[0], -1).T


def coding_length(W: torch.Tensor, eps2: float, center: bool = False) -> float:
    """Eq. 12: L(W) = ½ log₂ det(I + n/(m ε²) · W Wᵀ), in bits, for W ∈ R^{n×m} (m vectors of
    n dimensions).

    Computed in float64 through the smaller Gram matrix (Sylvester: det(I_n + c W Wᵀ) =
    det(I_m + c Wᵀ W)) and a Cholesky factor, log det = 2 Σ log diag(chol): exact for n ≫ m
    and m ≫ n alike. The paper derives eq. 12 for zero-mean vectors; ``center=True``
    subtracts the mean vector first, ``False`` (the default) applies eq. 12 as written."""
    eps2 = checks.number(eps2, "eps2", low=0, strict=True, meaning="the coding distortion ε²")
    if not isinstance(W, torch.Tensor) or W.dim() != 2 or W.numel() == 0:
        raise ValueError(f"W must be a non-empty n × m tensor, got {getattr(W, 'shape', type(W).__name__)}")
    if not torch.isfinite(W).all():
        raise ValueError("W has NaN or infinite entries: its coding length is undefined")
    W = W.detach().to(torch.float64).cpu()
    if center:
        W = W - W.mean(dim=1, keepdim=True)
    n, m = W.shape
    c = n / (m * eps2)
    gram = W.T @ W if m <= n else W @ W.T
    A = torch.eye(gram.shape[0], dtype=torch.float64) + c * gram
    L = torch.linalg.cholesky(A)  # A is symmetric positive definite (I + PSD)
    return float(torch.log2(torch.diagonal(L)).sum())  # ½ log₂ det A = Σ log₂ diag(L)


def layer_coding_lengths(model: nn.Module, eps2: float, center: bool = False) -> dict[str, float]:
    """Eq. 12 for every Conv2d/Linear layer of ``model`` with BatchNorm folded in (the weights
    that get quantized), in forward-registration order."""
    fp = fold_bn(model)
    return {n: coding_length(as_vectors(fp.get_submodule(n).weight), eps2, center)
            for n in quantizable_layers(fp)}


def normalize_bitlist(bitlist) -> list[int]:
    """Sorted distinct bit widths; a clear error for an empty list or bits outside 2..16."""
    bits = list(bitlist) if bitlist is not None else []
    if not bits:
        raise ValueError("bitlist is empty: give the candidate bit widths, e.g. [3, 4, 5, 6]")
    return sorted({check_bits(b, "every bit width in bitlist") for b in bits})


def cluster_1d(values, k: int) -> list[int]:
    """Optimal 1-D k-means (least squares) by dynamic programming: the cluster index (0 =
    lowest centre) of each value. Exact and deterministic, unlike Lloyd's iterations; for
    the few dozen layers of a network the O(k·N²) table is instant."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    s = x[order]
    N = len(s)
    k = min(k, len(np.unique(s)))
    c1, c2 = np.concatenate([[0.0], np.cumsum(s)]), np.concatenate([[0.0], np.cumsum(s * s)])

    def sse(i, j):  # within-cluster squared error of s[i:j]
        tot = c1[j] - c1[i]
        return c2[j] - c2[i] - tot * tot / (j - i)

    cost = np.full((k + 1, N + 1), np.inf)
    cut = np.zeros((k + 1, N + 1), dtype=int)
    cost[0, 0] = 0.0
    for c in range(1, k + 1):
        for j in range(c, N + 1):
            for i in range(c - 1, j):
                v = cost[c - 1, i] + sse(i, j)
                if v < cost[c, j] - 1e-12:
                    cost[c, j], cut[c, j] = v, i
    labels_sorted = np.empty(N, dtype=int)
    j = N
    for c in range(k, 0, -1):
        i = cut[c, j]
        labels_sorted[i:j] = c - 1
        j = i
    labels = np.empty(N, dtype=int)
    labels[order] = labels_sorted
    return labels.tolist()


def allocate_bits(model: nn.Module, bitlist, eps2: float, *, center: bool = False,
                  include_first_last: bool = False) -> dict[str, int]:
    """Algorithm 1: each layer's coding length (eq. 12), 1-D clustering of the lengths into
    len(bitlist) clusters, clusters and bit widths both sorted ascending and matched in order.

    ``bitlist`` is normalised (sorted, duplicates dropped). The first and last layers are left
    out, since quantize() keeps them at 8 bits as the paper does (``include_first_last=True``
    allocates them too). With fewer distinct lengths than bit widths, the k clusters take k
    bit widths spread evenly over the sorted list (one cluster: the middle width).
    Deterministic: the same model and arguments give the same allocation."""
    return _allocate(layer_coding_lengths(model, eps2, center), normalize_bitlist(bitlist), include_first_last)


def _allocate(lengths: dict[str, float], bits: list[int], include_first_last: bool) -> dict[str, int]:
    names = list(lengths)
    if not include_first_last:
        names = names[1:-1]
    if not names:
        raise ValueError("the model has no layers between its first and last to allocate bits to")
    labels = cluster_1d([lengths[n] for n in names], len(bits))
    k = max(labels) + 1
    if k == len(bits):
        chosen = bits
    else:  # k widths spread evenly over the sorted list: index ⌊(j + ½)·K/k⌋
        chosen = [bits[int((j + 0.5) * len(bits) / k)] for j in range(k)]
    return {n: chosen[c] for n, c in zip(names, labels)}


def model_size_mb(model: nn.Module, bits, *, conv_only: bool = False,
                  first_last_bits: int = 8) -> float:
    """Σ params × bits / 8 over every quantized layer (Conv2d and Linear), in MB (10⁶ bytes):
    what the quantized weights occupy. ``conv_only=True`` counts the convolutions alone, as
    the paper's Table 4 does; that leaves out a Linear layer that still gets the
    allocation's bits (VGG's classifier holds about half its weights), so sizes compared
    across allocations should count everything.

    ``bits``: an int for every layer, or ``{layer: bits}`` as allocate_bits returns; the
    first and last quantized layers default to ``first_last_bits`` as in quantize()."""
    names = quantizable_layers(model)
    if isinstance(bits, dict):
        per = {n: bits.get(n, first_last_bits if n in (names[0], names[-1]) else None) for n in names}
        missing = [n for n, b in per.items() if b is None]
        if missing:
            raise ValueError(f"bits has no entry for layers {missing}")
    else:
        per = {n: (first_last_bits if n in (names[0], names[-1]) else bits) for n in names}
    total = 0.0
    for n in names:
        m = model.get_submodule(n)
        if isinstance(m, nn.Conv2d) or not conv_only:
            total += m.weight.numel() * check_bits(per[n], f"bits[{n!r}]") / 8
    return total / 1e6


def allocate_to_size(model: nn.Module, target_mb: float, *, widths=(2, 3, 4, 5, 6, 7, 8),
                     eps_grid=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)) -> dict:
    """The recipe for a size budget: of every contiguous bit list drawn from ``widths`` (at
    least two widths) and every ε² in ``eps_grid``, Algorithm 1's allocation whose size
    (:func:`model_size_mb`, every quantized layer) is the largest within ``target_mb``; ties
    go to the smaller ε² and then the narrower list. Returns {"bitlist", "eps2", "bits",
    "size_mb", "tried"}. A budget below every allocation raises, naming the smallest."""
    ws = normalize_bitlist(widths)
    lists = sorted((ws[i:j] for i in range(len(ws)) for j in range(i + 2, len(ws) + 1)), key=len)
    if not lists:
        raise ValueError(f"allocate_to_size needs at least two widths, got {widths}")
    best, smallest, tried = None, math.inf, 0
    for eps2 in sorted(eps_grid):
        lengths = layer_coding_lengths(model, eps2)
        for bl in lists:
            bits = _allocate(lengths, bl, False)
            size = model_size_mb(model, bits)
            tried += 1
            smallest = min(smallest, size)
            if size <= target_mb and (best is None or size > best["size_mb"] + 1e-12):
                best = {"bitlist": bl, "eps2": eps2, "bits": bits, "size_mb": size}
    if best is None:
        raise ValueError(f"no allocation fits {target_mb:.4f} MB: the smallest is {smallest:.4f} MB "
                         f"(widths {ws}); allow narrower widths or a larger budget")
    return {**best, "tried": tried}


@torch.no_grad()
def allocate_greedy(model: nn.Module, bitlist, budget_mb: float, *,
                    conv_only: bool = False) -> dict[str, int]:
    """An equal-size baseline: every middle layer starts at the lowest width of ``bitlist``;
    then, while the model stays within ``budget_mb`` (model_size_mb), the layer whose next
    width buys the largest drop of its weight error ‖W − Ŵ‖² (nearest rounding, searched
    scales) per added byte moves up one width. Under ``conv_only`` (Table 4's count) Linear layers
    cost nothing, so they are set to the top width."""
    bits = normalize_bitlist(bitlist)
    fp = fold_bn(model)
    names = quantizable_layers(fp)[1:-1]
    err = {}
    for n in names:
        w = fp.get_submodule(n).weight
        err[n] = {b: float((fake_quant(w, search_weight_scale(w, b), b) - w).pow(2).sum()) for b in bits}
    level = {n: 0 for n in names}
    alloc = {n: bits[0] for n in names}
    for n in names:
        if isinstance(fp.get_submodule(n), nn.Linear) and conv_only:
            level[n], alloc[n] = len(bits) - 1, bits[-1]
    if model_size_mb(model, alloc, conv_only=conv_only) > budget_mb + 1e-12:
        raise ValueError(f"budget {budget_mb} MB is below the smallest allocation "
                         f"({model_size_mb(model, alloc, conv_only=conv_only):.6f} MB)")
    while True:
        best, best_gain = None, 0.0
        for n in names:
            if level[n] + 1 >= len(bits):
                continue
            b0, b1 = bits[level[n]], bits[level[n] + 1]
            trial = dict(alloc, **{n: b1})
            if model_size_mb(model, trial, conv_only=conv_only) > budget_mb + 1e-12:
                continue
            cost = fp.get_submodule(n).weight.numel() * (b1 - b0) / 8
            gain = (err[n][b0] - err[n][b1]) / cost
            if gain > best_gain:
                best, best_gain = n, gain
        if best is None:
            return alloc
        level[best] += 1
        alloc[best] = bits[level[best]]
