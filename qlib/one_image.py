"""Chapter 6's protocol around the generator (predictor preprint, Part 2): a judge that has
seen the tokens of single images, the estimates a user could make from k real images
instead, and the exchange rate between the two::

    counts = {(a, i): tokens.per_image_counts(q, pool, bins, ranges[a]) for (a, i), q in models.items()}
    judge, hist = fit_judge(pops, sub, counts, sizes=(1, 2, 4, ..., 64), draws=4)
    est = k_image_estimates(pops, "test", ks=(1, 2, 4, ..., 256), draws=50)
    k_star, where = exchange_rate(ks, mae_of_paired_estimate_at_k, mae_of_generated_image)

Why a new judge: chapter 5's encoder reads tokens over its 256 probe images; the tokens of one
image are far noisier (a feature map's histogram over one image), so fed one image it is
out of the distribution it was trained on. The preprint trains stage 1 on "multiple
images"; here stage 1 sees the tokens of random subsets of 1 to P images of each training
configuration as well as the 256-image probe tokens, and stage 2 keeps it frozen as before.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from qlib import predictor, tokens
from qlib.study import Populations


def subset_sizes(max_k: int) -> tuple[int, ...]:
    """1, 2, 4, … up to ``max_k`` (powers of two)."""
    if max_k < 1:
        raise ValueError(f"max_k must be at least 1, got {max_k}")
    return tuple(2 ** j for j in range(int(math.log2(max_k)) + 1))


def subset_tokens(counts: torch.Tensor, values_per_image: list[int], k: int, draws: int,
                  rng: np.random.Generator) -> list[torch.Tensor]:
    """``draws`` token tensors, each of a random subset of ``k`` of the images whose
    per-image counts (N × L × bins, :func:`qlib.tokens.per_image_counts`) are given."""
    n = len(counts)
    if not 1 <= k <= n:
        raise ValueError(f"a subset of {k} images needs 1 ≤ k ≤ {n} (the images counted)")
    return [tokens.tokens_from_counts(counts[rng.choice(n, k, replace=False)].sum(0), k, values_per_image)
            for _ in range(draws)]


def fit_judge(pops: Populations, sub: Populations, counts: dict, *, sizes: tuple[int, ...], draws: int,
              val_draws: int, seed: int = 0, progress: bool = True) -> tuple[predictor.AccuracyPredictor, dict]:
    """Stage 1 for one image: chapter 5's encoder recipe (top-1 target, the profile's
    settings) trained on every training configuration of ``pops`` with its probe tokens,
    plus, for each training configuration of ``sub`` (models rebuilt, their per-image
    ``counts`` by (arch, record index) over a pool of real images), ``draws`` random
    subsets of each size in ``sizes``; early-stopped on the MAE of ``sub``'s validation
    configurations fed **one** pool image each (``val_draws`` draws): the use it is made for."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for a in pops.archs:
        for r in pops.records(a, "train"):
            xs.append(r["tokens_probe"])
            ys.append(r["acc"])
    vxs, vys = [], []
    for a in sub.archs:
        for part, out_x, out_y, ks, n in (("train", xs, ys, sizes, draws), ("val", vxs, vys, (1,), val_draws)):
            for i in sub.index[a][part]:
                c, vpi = counts[a, i]
                for k in ks:
                    out_x.extend(subset_tokens(c, vpi, k, n, rng))
                    out_y.extend([pops.pops[a]["records"][i]["acc"]] * n)
    if not vxs:
        raise ValueError("fit_judge needs per-image counts of the subset's validation configurations")
    kw = pops.S.profile.predictor.fit_kwargs("top-1", seed=seed, desc="judge on 1…P images", progress=progress)
    return predictor.fit((xs, ys), (vxs, vys), **kw)


def k_image_estimates(pops: Populations, part: str, ks: tuple[int, ...], draws: int, *, seed: int = 0,
                      exclude: torch.Tensor | None = None) -> dict[str, dict[int, np.ndarray]]:
    """What k real test images give without any predictor, for every ``part`` configuration
    (pooled in :meth:`qlib.study.Populations.labels` order) and ``draws`` random sets of k images (the
    same sets for every configuration; none in ``exclude``, e.g. the probe images):
    ``"top-1"`` — the quantized model's top-1 on the k images; ``"paired"`` — the float
    model's exact top-1 plus the quantized − float difference on them (the paired estimate
    of chapter 5 at k images). Read from the per-image correctness kept when the population
    was labelled: no forward pass. Each entry: configurations × draws, in %."""
    correct = torch.stack([r["correct_full"] for a in pops.archs for r in pops.records(a, part)]).float()
    fcorrect = torch.stack([pops.float_ref(a)["correct_full"] for a in pops.archs
                            for _ in pops.index[a][part]]).float()
    facc = torch.tensor([pops.float_ref(a)["acc"] for a in pops.archs for _ in pops.index[a][part]])
    allowed = torch.ones(correct.shape[1], dtype=torch.bool)
    if exclude is not None:
        allowed[exclude] = False
    pool = torch.nonzero(allowed).squeeze(1)
    if max(ks) > len(pool):
        raise ValueError(f"k up to {max(ks)} images, but only {len(pool)} test images are allowed")
    g = torch.Generator().manual_seed(seed)
    out = {"top-1": {}, "paired": {}}
    for k in ks:
        idx = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(draws)])  # draws × k
        q, f = correct[:, idx].mean(2), fcorrect[:, idx].mean(2)                                    # configs × draws
        out["top-1"][k] = (100 * q).numpy()
        out["paired"][k] = (facc[:, None] + 100 * (q - f)).numpy()
    return out


def exchange_rate(ks: tuple[int, ...], curve: list[float], target: float) -> tuple[float, str]:
    """The number of real images k* at which an estimate whose MAE at k images is ``curve``
    matches ``target`` (an MAE): from the largest k down, the first k whose MAE exceeds the
    target, interpolated linearly in log k to the next. Returns (k*, where): "within" the
    grid; "below" (the curve beats the target already at the smallest k: k* ≤ ks[0]);
    "above" (not even the largest k matches it: k* > ks[-1])."""
    if len(ks) != len(curve) or not ks:
        raise ValueError(f"one MAE per k: {len(ks)} k values, {len(curve)} MAEs")
    worse = [j for j, m in enumerate(curve) if m > target]
    if not worse:
        return float(ks[0]), "below"
    j = worse[-1]
    if j == len(ks) - 1:
        return float(ks[-1]), "above"
    m0, m1 = curve[j], curve[j + 1]
    t = (m0 - target) / (m0 - m1)
    return float(math.exp(math.log(ks[j]) + t * (math.log(ks[j + 1]) - math.log(ks[j])))), "within"
