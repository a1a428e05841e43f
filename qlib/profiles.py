"""The two run profiles, in one place.

``quick`` runs the whole book on two CPU cores inside the CI budget; ``paper`` uses the
papers' settings and is meant for a GPU. Chapters read their numbers from here and say
in their text which ones they used.
"""
from __future__ import annotations

import copy

PROFILES: dict[str, dict] = {
    "quick": {
        # Training of the float models: full 60k training set, few epochs, no augmentation.
        "train": {"epochs": 3, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                  "weight_decay": 5e-4, "augment": False, "seed": 0},
        "test_subset": None,  # None: the full 10k test set
        # Post-training quantization. The paper's Adam runs 2,000 steps at lr 4e-4; with 20×
        # fewer steps we raise lr 20× so lr·iters, the farthest Adam can move a rounding
        # variable, stays the same (0.8 grid steps). Two seeds, not three, and chapter 3's τ
        # sweep at 5 values with 1 seed keep the whole book inside its CI budget.
        "quant": {"calib_images": 256, "iters": 100, "batch_size": 32, "lr": 8e-3, "seeds": [0, 1],
                  "tau_grid": [0.0, 0.25, 0.5, 0.75, 1.0], "tau_seeds": [0]},
    },
    "paper": {
        "train": {"epochs": 30, "batch_size": 128, "lr": 0.1, "momentum": 0.9,
                  "weight_decay": 5e-4, "augment": True, "seed": 0},
        "test_subset": None,
        "quant": {"calib_images": 1024, "iters": 2000, "batch_size": 64, "lr": 4e-4, "seeds": [0, 1, 2],
                  "tau_grid": [round(0.1 * k, 1) for k in range(11)], "tau_seeds": [0, 1, 2]},
    },
}


def get(profile: str) -> dict:
    """A copy of one profile's settings; a clear error for an unknown name."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {sorted(PROFILES)}")
    return copy.deepcopy(PROFILES[profile])
