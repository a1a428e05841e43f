"""Chapter 6's protocol: k-image estimates from kept per-image correctness, the exchange
rate, image subsets' tokens."""
import math

import numpy as np
import pytest
import torch

from qlib import one_image, tokens
from qlib.study import Populations


def _pops(n_images=40, seed=0):
    """Two architectures' fake records: per-image correctness and the exact top-1 it gives."""
    g = torch.Generator().manual_seed(seed)
    pops, index = {}, {}
    for a, p_float in (("x", 0.9), ("y", 0.8)):
        fc = torch.rand(n_images, generator=g) < p_float
        recs = []
        for p in (0.9, 0.6, 0.3):
            c = fc & (torch.rand(n_images, generator=g) < p / p_float)
            recs.append({"correct_full": c, "acc": 100 * c.float().mean().item()})
        pops[a] = {"records": recs, "float": {"correct_full": fc, "acc": 100 * fc.float().mean().item()}}
        index[a] = {"test": [2, 0]}
    return Populations(None, pops, index)


def test_k_image_estimates_are_exact_with_every_image_and_respect_the_exclusions():
    P = _pops()
    est = one_image.k_image_estimates(P, "test", (1, 4, 40), draws=3)
    truth = np.array([P.pops[a]["records"][i]["acc"] for a in P.archs for i in P.index[a]["test"]])
    for kind in ("top-1", "paired"):
        assert est[kind][4].shape == (4, 3)
        assert np.allclose(est[kind][40], truth[:, None], atol=1e-4), f"{kind} over all images is the label"
    assert set(np.unique(est["top-1"][1])) <= {0.0, 100.0}, "one image is right or wrong"
    excluded = torch.arange(0, 40, 2)
    with pytest.raises(ValueError, match="only 20"):
        one_image.k_image_estimates(P, "test", (21,), draws=1, exclude=excluded)
    e = one_image.k_image_estimates(P, "test", (20,), draws=2, exclude=excluded)
    odd = np.array([100 * P.pops[a]["records"][i]["correct_full"][1::2].float().mean().item()
                    for a in P.archs for i in P.index[a]["test"]])
    assert np.allclose(e["top-1"][20], odd[:, None], atol=1e-4), "only the allowed images are drawn"


def test_exchange_rate_interpolates_in_log_k_and_says_when_off_the_grid():
    ks = (1, 2, 4, 8)
    curve = [3.0, 2.0, 1.0, 0.5]
    k, where = one_image.exchange_rate(ks, curve, 1.5)
    assert where == "within" and math.isclose(k, math.sqrt(8), rel_tol=1e-9)   # halfway from 2 to 4 in log k
    assert one_image.exchange_rate(ks, curve, 2.0) == (2.0, "within")
    assert one_image.exchange_rate(ks, curve, 5.0) == (1.0, "below")
    assert one_image.exchange_rate(ks, curve, 0.1) == (8.0, "above")
    # a curve worse at 1 image than at none: the crossing that counts is the last one
    assert one_image.exchange_rate(ks, [0.8, 1.2, 1.0, 0.5], 0.9)[1] == "within"
    assert one_image.exchange_rate(ks, [0.8, 1.2, 1.0, 0.5], 0.9)[0] > 4
    with pytest.raises(ValueError, match="one MAE per k"):
        one_image.exchange_rate(ks, curve[:3], 1.0)


def test_subset_tokens_are_the_tokens_of_k_images():
    rng = np.random.default_rng(0)
    counts = torch.tensor(rng.integers(0, 5, size=(6, 3, 4)), dtype=torch.float32)
    vpi = [int(v) for v in counts.sum(2).max(0).values]
    toks = one_image.subset_tokens(counts, vpi, 6, 2, rng)
    want = tokens.tokens_from_counts(counts.sum(0), 6, vpi)
    assert all(torch.equal(t, want) for t in toks), "every draw of all images is the same set"
    assert one_image.subset_sizes(64) == (1, 2, 4, 8, 16, 32, 64) and one_image.subset_sizes(5) == (1, 2, 4)
    with pytest.raises(ValueError, match="1 ≤ k ≤ 6"):
        one_image.subset_tokens(counts, vpi, 7, 1, rng)
