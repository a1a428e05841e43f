"""The profiles: the scaled paper profile differs from ``paper`` only in its counts."""
import pytest
import torch
from torch.utils.data import TensorDataset

from qlib import data, profiles


def test_paper_small_differs_from_paper_only_in_counts():
    paper, small = profiles.settings(profiles.get("paper")), profiles.settings(profiles.get("paper-small"))
    assert paper.keys() == small.keys()
    allowed = {f"{s}.{f}" for s, fs in profiles.COUNTS.items() for f in fs} | {"profile.name"}
    changed = {k for k in paper if paper[k] != small[k]}
    assert changed <= allowed, f"paper-small changes more than counts: {sorted(changed - allowed)}"
    # it does shrink the costly counts, and every grid keeps its points
    for k in ("quant.iters", "quant.calib_images", "predictor.configs", "one_image.steps", "train.epochs"):
        assert k in changed
    for k in changed:
        if isinstance(paper[k], tuple):
            assert len(small[k]) == len(paper[k]), k
    # what the paper profile runs stays: rows, τ grid, seeds, switches, population not shipped
    for k in ("quant.table1_w_bits", "quant.table2_settings", "quant.tau_grid", "quant.tau_seeds",
              "quant.seeds", "ablation.settings", "predictor.shipped", "one_image.lr_grid_generator"):
        assert small[k] == paper[k]


def test_scaled_refuses_what_is_not_a_count():
    paper = profiles.get("paper")
    with pytest.raises(ValueError, match="not counts"):
        profiles.scaled(paper, "x", {"quant": {"tau_grid": (0.5,)}})
    with pytest.raises(ValueError, match="unknown section"):
        profiles.scaled(paper, "x", {"quantization": {"iters": 2}})
    with pytest.raises(ValueError, match="keeps its 4 points"):
        profiles.scaled(paper, "x", {"ablation": {"iters_grid": (0, 1)}})
    small = profiles.scaled(paper, "x", {"quant": {"iters": 3}, "profile": {"test_subset": 10}})
    assert small.quant.iters == 3 and small.test_subset == 10 and small.quant.lr == paper.quant.lr


def test_training_images_only_enter_the_cache_key_when_set():
    """The quick and paper float models keep their keys (and shipped checkpoints)."""
    assert "train_images" not in profiles.get("quick").train.as_dict()
    assert profiles.get("paper-small").train.as_dict()["train_images"] == 2048


def test_subset_is_fixed_and_checked():
    ds = TensorDataset(torch.arange(100).float(), torch.arange(100))
    a, b = data.subset(ds, 10), data.subset(ds, 10)
    assert torch.equal(a.tensors[0], b.tensors[0]) and len(a.tensors[1]) == 10
    assert torch.equal(a.tensors[0].long(), a.tensors[1])   # images keep their labels
    assert data.subset(ds, None) is ds
    with pytest.raises(ValueError, match="subset size"):
        data.subset(ds, 101)
