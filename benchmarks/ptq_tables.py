"""Chapter 3's comparison (nearest / AdaRound / Attention Round, mean ± std over seeds) at a
profile's calibration settings, as a script: for running the `paper` settings (1,024
images, 2,000 steps per module, 3 seeds) on a GPU, where the book's notebooks do not run.

    python benchmarks/ptq_tables.py --quant-profile paper --models-profile quick \\
        --settings W4A32 W3A32 W2A32 W4A4 W3A4 --json results.json

Each learned method runs at its own learning rate, selected on the validation split by
experiments.tuned (the book's protocol; cached, so a second run reuses it). Prints the
selected rates, then one row per (model, setting): accuracy of each method as mean ± std
over seeds, and the mean seconds of one Attention Round calibration.
"""
from __future__ import annotations

import argparse
import json

import torch

from qlib import experiments, models, profiles, quant


def parse_setting(s: str) -> tuple[int, int | None]:
    w, a = s.upper().lstrip("W").split("A")
    return int(w), (None if int(a) == 32 else int(a))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quant-profile", default="paper", choices=sorted(profiles.PROFILES))
    p.add_argument("--models-profile", default="quick", choices=sorted(profiles.PROFILES),
                   help="which trained float models to quantize")
    p.add_argument("--models", nargs="+", default=list(models.ARCHS))
    p.add_argument("--settings", nargs="+", default=["W4A32", "W3A32", "W2A32", "W4A4", "W3A4"])
    p.add_argument("--json", default=None, help="also write every run to this file")
    args = p.parse_args()
    S = experiments.setup(args.models_profile, archs=args.models, quant_profile=args.quant_profile)
    qs = S.quant
    print(f"device: {models.describe_device(S.device)}; torch {torch.__version__}; quant profile "
          f"{args.quant_profile} ({qs.calib_images} images, {qs.iters} steps/module, lr grid {list(qs.lr_grid)}, "
          f"batch {qs.batch_size}, seeds {list(qs.seeds)}); float models: {args.models_profile} profile")
    hp = {(a, m): experiments.tuned(S, a, m) for a in args.models for m in quant.LEARNED}
    print("selected on validation at", f"W{qs.tune_w_bits}A32:",
          ", ".join(f"{a} {m} lr {v['lr']:g}" for (a, m), v in hp.items()), flush=True)
    print(f"{'model':12s} {'setting':8s} {'float':>6s} {'nearest':>8s} {'AdaRound':>15s} "
          f"{'Attention':>15s} {'att s':>6s}", flush=True)
    runs = []
    for setting in args.settings:  # settings outermost: a run cut short loses whole settings
        w, a = parse_setting(setting)
        for arch in args.models:
            recs = [r for rounding in ("nearest", "adaround", "attention")
                    for r in experiments.run_seeds(S, arch, rounding, w, a, tags={"setting": setting},
                                                   **hp.get((arch, rounding), {}))]
            runs += recs
            row = experiments.summarize(recs, ["rounding"]).set_index("rounding")
            cell = {m: experiments.fmt_mean_std(r["mean"], r["std"], int(r["count"]), show_n=False)
                    for m, r in row.iterrows()}
            print(f"{arch:12s} {setting:8s} {S.float_acc[arch]:6.2f} {cell['nearest']:>8s} "
                  f"{cell['adaround']:>15s} {cell['attention']:>15s} "
                  f"{row.loc['attention', 'seconds']:6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
