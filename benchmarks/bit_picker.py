"""The bit-list picker's update time: what one toggle costs before the reader sees the new
allocation and its estimated top-1 (Algorithm 1, nearest-rounding quantization with the
activation steps' search, one pass over the probe images, chapter 5's predictor), and what
"measure" costs (the 10,000 test images). The book's ResNet, quick profile.

    python benchmarks/bit_picker.py               # 2 threads, as the book runs
    python benchmarks/bit_picker.py --threads 1

Target: an update within 1 s on 2 cores. Prints a table; it is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from qlib import experiments, study, widgets

# the toggles a reader makes, in order: each is the bit list after the toggle
SEQUENCE = [(3, 4, 5, 6), (2, 3, 4, 5, 6), (3, 4, 5), (4, 5, 6), (4, 6, 8), (3, 4, 5, 6, 7, 8), (2, 4, 8)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", default="quick")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    S = experiments.setup(args.profile)
    trained = study.trained_predictor("resnet", args.profile, progress=False)
    t0 = time.perf_counter()
    ctx = widgets.picker_context(S.float_models["resnet"], trained, S.calib, S.test_set)
    print(f"picker_context (once, when the picker opens): {time.perf_counter() - t0:.2f} s")
    print(f"{'activations':>11} {'bit list':>20} {'update s':>9} {'estimate %':>10} {'± 95%':>6} {'measured %':>10} {'measure s':>9}")
    for label, a in widgets.ACT_CHOICES.items():
        times = []
        for bl in SEQUENCE:
            d = widgets.allocation_estimate(ctx, list(bl), 1e-3, a)
            times.append(d["seconds"])
            t = time.perf_counter()
            widgets.measure(ctx, d)
            print(f"{label:>11} {str(list(bl)):>20} {d['seconds']:9.2f} {d['estimate']:10.2f} {d['half_width']:6.2f} "
                  f"{d['measured']:10.2f} {time.perf_counter() - t:9.2f}")
        print(f"{label:>11}: update median {statistics.median(times):.2f} s, max {max(times):.2f} s")


if __name__ == "__main__":
    main()
