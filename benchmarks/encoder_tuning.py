"""The encoder's size and weight decay, chosen on validation configurations (issue 25, item 4).

Chapter 5 chooses the encoder's learning rate and loss live, per target, on the first split's
validation configurations (study.encoder_settings). Width, depth and weight decay cost too much
to search inside the CI budget (chapter 5 fits the encoder 35 times), so they are searched here,
once, at each target's chosen learning rate and loss, on the same split's validation
configurations (never the test ones), with two fitting seeds per grid point; the choice is the
cheapest encoder within one standard error of the best (study.smallest_within_one_se):

    python benchmarks/encoder_tuning.py                 # quick profile, ~30 min on two cores
    python benchmarks/encoder_tuning.py --learning-rates   # then: the profile's sizes at 3 rates

It prints the table and writes populations/<profile>/encoder_tuning.json, which chapter 5 shows
and which tests/test_shipped_population.py holds the profile's settings to (a record whose data key no
longer matches the shipped population is stale: rerun this script). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import tempfile
import time

import numpy as np

from qlib import experiments, models, parallel, record, study

WIDTHS = (16, 32, 64)
DEPTHS = (1, 2)
DECAYS = (1e-3, 1e-2, 1e-1)
SEEDS = (0, 1)
HEADS = 2  # head width 8 at the narrowest encoder
LEARNING_RATES = (1e-3, 3e-3, 1e-2)  # --learning-rates: around the quick profile's one value


def _write(path, out: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def learning_rates(S, pops, path) -> None:
    """A check after the size search: at the profile's (tuned) sizes and each target's
    chosen loss, the validation MAE at LEARNING_RATES; added to the record as ``lr_check``."""
    ps = S.profile.predictor
    chosen = study.encoder_settings(pops, progress=False)["chosen"]
    out = json.loads(path.read_text())
    grid = [(target, residual, lr, seed) for target, residual in study.TARGETS.items()
            for lr in LEARNING_RATES for seed in SEEDS]
    fits = parallel.map_forked([lambda t=t, r=r, lr=lr, s=s: study.fit_pooled(
        pops, residual=r, progress=False, seed=s, lr=lr, loss=chosen[t]["loss"])[1]["best_val_mae"]
        for t, r, lr, s in grid], desc="learning-rate check")
    rows = []
    for target in study.TARGETS:
        for lr in LEARNING_RATES:
            maes = [m for (t, _, rate, _), m in zip(grid, fits) if t == target and rate == lr]
            rows.append({"target": target, "lr": lr, "loss": chosen[target]["loss"], **ps.size(target),
                         "val_mae": float(np.mean(maes)), "val_mae_std": float(np.std(maes, ddof=1)),
                         "val_mae_seeds": maes})
            print(f"{target:9s} lr {lr:g}: validation MAE {rows[-1]['val_mae']:.3f} ± {rows[-1]['val_mae_std']:.3f}",
                  flush=True)
    out["lr_check"] = rows
    out["lr_check_device"] = f"{models.describe_device('cpu')}, fits side by side (qlib.parallel)"
    _write(path, out)
    print(f"added lr_check to {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="quick")
    p.add_argument("--learning-rates", action="store_true",
                   help="only check the profile's sizes at LEARNING_RATES (after the size search)")
    args = p.parse_args()
    S = experiments.setup(args.profile)
    ps = S.profile.predictor
    pops = study.populations(S, progress=False, split_seed=ps.split_seeds[0])
    path = record.directory(args.profile) / "encoder_tuning.json"
    if args.learning_rates:
        return learning_rates(S, pops, path)
    chosen = study.encoder_settings(pops, progress=False)["chosen"]
    rows, start = [], time.perf_counter()
    grid = list(itertools.product(study.TARGETS.items(), WIDTHS, DEPTHS, DECAYS))
    print(f"{args.profile} profile, split {ps.split_seeds[0]}: validation MAE (points), mean over fitting seeds {SEEDS}")
    print(f"{'target':9s} {'width':>5s} {'depth':>5s} {'decay':>6s} {'val MAE':>8s} {'± std':>6s} {'epochs':>6s} {'s/fit':>6s}")
    for n, ((target, residual), width, depth, decay) in enumerate(grid, 1):
        maes, epochs, secs = [], [], []
        for seed in SEEDS:
            _, h = study.fit_pooled(pops, residual=residual, progress=False, seed=seed, d_model=width, heads=HEADS,
                                    layers=depth, weight_decay=decay, **chosen[target])
            maes.append(h["best_val_mae"]), epochs.append(h["epochs_run"]), secs.append(h["seconds"])
        row = {"target": target, "d_model": width, "layers": depth, "weight_decay": decay, "heads": HEADS,
               "val_mae": float(np.mean(maes)), "val_mae_std": float(np.std(maes, ddof=1)),
               "val_mae_seeds": maes, "epochs": float(np.mean(epochs)), "seconds": float(np.mean(secs))}
        rows.append(row)
        print(f"{target:9s} {width:5d} {depth:5d} {decay:6.0e} {row['val_mae']:8.3f} {row['val_mae_std']:6.3f} "
              f"{row['epochs']:6.0f} {row['seconds']:6.1f}   [{n}/{len(grid)}]", flush=True)
    best = {t: study.smallest_within_one_se([r for r in rows if r["target"] == t]) for t in study.TARGETS}
    for t, r in best.items():
        print(f"chosen for {t} (cheapest within one standard error of the best): width {r['d_model']}, {r['layers']} block(s), weight decay {r['weight_decay']:g} "
              f"(validation MAE {r['val_mae']:.3f})")
    out = {"profile": args.profile, "data": study._data_key(pops), "split": study._split_spec(pops),
           "lr_loss": chosen, "lr_loss_at": {t: ps.size(t) for t in study.TARGETS}, "seeds": list(SEEDS), "grid": {"d_model": list(WIDTHS), "layers": list(DEPTHS),
                                                             "weight_decay": list(DECAYS)},
           "rows": rows, "chosen": {t: {k: r[k] for k in ("d_model", "heads", "layers", "weight_decay")}
                                    for t, r in best.items()},
           "rule": "cheapest within one standard error of the best (study.smallest_within_one_se)",
           "seconds": time.perf_counter() - start, "device": models.describe_device("cpu")}
    _write(path, out)
    print(f"wrote {path} ({out['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
