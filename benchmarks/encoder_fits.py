"""What chapter 5's encoder fits cost, and what running them side by side saves (qlib.parallel):

    python benchmarks/encoder_fits.py            # 4 fits per target on the first split
    python benchmarks/encoder_fits.py --fits 2

On the quick profile's shipped population (first split, the profile's sizes, learning rate
and loss for each target) it times

* one fit at 1 and at 2 torch threads (seconds per epoch: an encoder this small does not
  split across cores);
* ``--fits`` fits per target (fitting seeds 1, 2, …) one after another in this process,
  then the same fits through :func:`qlib.parallel.map_forked` (one forked worker per core),

and checks that both ways give the same predictions, bit for bit. Prints the table and the
speed-up. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from qlib import experiments, models, parallel, study


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fits", type=int, default=4, help="fits per target")
    args = p.parse_args()
    S = experiments.setup("quick")
    ps = S.profile.predictor
    pops = study.populations(S, progress=False, split_seed=ps.split_seeds[0])
    chosen = study.encoder_settings(pops)["chosen"]
    print(f"torch {torch.__version__}, {models.describe_device(S.device)}, {parallel.cores()} cores; "
          f"{sum(len(pops.index[a]['train']) for a in pops.archs)} training configurations")
    print(f"{'target':9s} {'threads':>7s} {'epochs':>6s} {'s/epoch':>8s}")
    for target, residual in study.TARGETS.items():
        for threads in (1, 2):
            torch.set_num_threads(threads)
            _, h = study.fit_pooled(pops, residual=residual, progress=False, seed=1, **chosen[target])
            print(f"{target:9s} {threads:7d} {h['epochs_run']:6d} {h['seconds'] / h['epochs_run']:8.3f}", flush=True)
    jobs = [lambda r=residual, s=seed, t=target: study._fit_and_predict(pops, r, seed=s, **chosen[t])
            for target, residual in study.TARGETS.items() for seed in range(1, args.fits + 1)]
    t = time.perf_counter()
    serial = parallel.map_forked(jobs, workers=1, desc="one at a time")
    t_serial = time.perf_counter() - t
    t = time.perf_counter()
    forked = parallel.map_forked(jobs, desc="side by side")
    t_forked = time.perf_counter() - t
    same = all(np.array_equal(a, b) for a, b in zip(serial, forked))
    print(f"{len(jobs)} fits: one at a time {t_serial:.1f} s, {min(len(jobs), parallel.cores())} at once "
          f"{t_forked:.1f} s ({t_serial / t_forked:.2f}× faster); predictions identical: {same}")
    if not same:
        raise SystemExit("the forked fits' predictions differ from the serial ones")


if __name__ == "__main__":
    main()
