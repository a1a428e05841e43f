"""Chapter 3's comparison (nearest / AdaRound / Attention Round, mean ± std over seeds) at a
profile's calibration settings, as a script: for running the `paper` settings (1,024
images, 2,000 steps per module, 3 seeds) on a GPU, where the book's notebooks do not run.

    python benchmarks/ptq_tables.py --quant-profile paper --models-profile quick \\
        --settings W4A32 W3A32 W2A32 W4A4 W3A4 --json results.json

Prints one row per (model, setting): accuracy of each method as mean ± std over seeds, and
the mean seconds of one Attention Round calibration.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qlib import data, models, profiles, quant


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
    qs = profiles.get(args.quant_profile)["quant"]
    dev = models.resolve_device("auto")
    train, test = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "test")
    calib = data.calibration_set(train, n=qs["calib_images"], seed=0)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}; quant profile {args.quant_profile} "
          f"({qs['calib_images']} images, {qs['iters']} steps/module, lr {qs['lr']}, batch "
          f"{qs['batch_size']}, seeds {qs['seeds']}); float models: {args.models_profile} profile")
    print(f"{'model':12s} {'setting':8s} {'float':>6s} {'nearest':>8s} {'AdaRound':>15s} "
          f"{'Attention':>15s} {'att s':>6s}", flush=True)
    runs = []
    float_models = {arch: models.pretrained(arch, args.models_profile) for arch in args.models}
    float_acc = {arch: 100 * models.evaluate(m, test) for arch, m in float_models.items()}
    for setting in args.settings:  # settings outermost: a run cut short loses whole settings
        for arch in args.models:
            fm, f_acc = float_models[arch], float_acc[arch]
            w, a = parse_setting(setting)
            acc: dict[str, list[float]] = {}
            secs = []
            for rounding in ("nearest", "adaround", "attention"):
                for seed in (qs["seeds"][:1] if rounding == "nearest" else qs["seeds"]):
                    t0 = time.perf_counter()
                    q = quant.quantize(fm, calib, w_bits=w, a_bits=a, rounding=rounding,
                                       iters=qs["iters"], batch_size=qs["batch_size"], lr=qs["lr"],
                                       seed=seed, progress=False)
                    if rounding == "attention":
                        secs.append(time.perf_counter() - t0)
                    acc.setdefault(rounding, []).append(100 * models.evaluate(q, test))
                    runs.append({"arch": arch, "setting": setting, "rounding": rounding, "seed": seed,
                                 "acc": acc[rounding][-1], "float": f_acc,
                                 "seconds": q.quant_report["seconds"], "device": name})

            def ms(xs):
                return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"
            print(f"{arch:12s} {setting:8s} {f_acc:6.2f} {ms(acc['nearest']):>8s} {ms(acc['adaround']):>15s} "
                  f"{ms(acc['attention']):>15s} {statistics.mean(secs):6.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
