"""Where the time of labelling one configuration goes (chapter 5's population), on the
book's three float models and the full 10,000-image test set:

    python benchmarks/labelling.py                 # 6 configurations per architecture
    python benchmarks/labelling.py --n 12 --threads 2

For each sampled configuration (the population's own sampler, fixed roundings only: the
learned ones add their calibration, reported by benchmarks/calibration.py) it times

* ``float pass``: the float model's own top-1 pass (``models.evaluate``), the yardstick;
* ``quantize``: ``quant.quantize`` set-up (step-size searches, activation steps);
* ``plain pass``: the quantized model's top-1 pass through ``models.evaluate``;
* ``label``: :func:`qlib.population.label` end to end (quantize, the full-test pass with
  its strided histograms, the probe pass, weight SQNR);

and checks that the label's top-1 equals the plain pass's (the lean path must not change
a label). Prints one row per architecture and activation width (medians, seconds) and the
ratios the population issue targets: label pass / float pass for weight-only and for
quantized activations. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from qlib import experiments, models, population, tokens
from qlib.graph import fold_bn


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=6, help="configurations per architecture")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    S = experiments.setup("quick")
    ps = S.profile.predictor
    images, labels = S.test_set.tensors
    pidx = population.probe_indices(len(images), ps.probe_images)
    probe, probe_labels = images[pidx], labels[pidx]
    print(f"torch {torch.__version__}, {models.describe_device(S.device)}; {len(images)} test images, "
          f"probe {len(probe)}, {ps.bins} bins, full-test stride {ps.full_stride}")
    print(f"{'arch':12s} {'acts':>5s} {'n':>3s} {'float pass':>10s} {'quantize':>9s} {'plain pass':>10s} "
          f"{'label':>7s} {'label-quant':>11s} {'ratio':>6s}")
    for arch, model in S.float_models.items():
        folded = fold_bn(model).eval()
        ranges = tokens.float_ranges(model, probe)
        fl_probe = tokens.histogram_pass(folded, probe, ps.bins, ranges, labels=probe_labels)
        t = time.perf_counter()
        models.evaluate(model, S.test_set)
        float_pass = time.perf_counter() - t
        cfgs = [c for c in population.sample_configs(arch, model, 10 * args.n, seed=123)
                if c["rounding"] in ("nearest", "stochastic")]
        rows = {"W only": [c for c in cfgs if c["a_bits"] is None][: args.n],
                "W+A": [c for c in cfgs if c["a_bits"] is not None][: args.n]}
        for acts, group in rows.items():
            tq, tp, tl = [], [], []
            for cfg in group:
                t = time.perf_counter()
                q = population.build(cfg, model, S.calib)
                tq.append(time.perf_counter() - t)
                t = time.perf_counter()
                acc = 100 * models.evaluate(q, S.test_set)
                tp.append(time.perf_counter() - t)
                rec = population.label(cfg, model, folded, S.calib, S.test_set, probe, fl_probe["preds"],
                                       probe_labels, ranges, ps.bins, ps.full_stride)
                tl.append(rec["seconds"] - rec["quant_seconds"])
                if abs(rec["acc"] - acc) > 1e-4:  # float32 mean vs an exact count
                    raise AssertionError(f"{arch} {cfg['w_bits']}: label {rec['acc']} != plain pass {acc}")
            mq, mp, ml = _median(tq), _median(tp), _median(tl)
            print(f"{arch:12s} {acts:>5s} {len(group):3d} {float_pass:10.2f} {mq:9.2f} {mp:10.2f} "
                  f"{mq + ml:7.2f} {ml:11.2f} {ml / float_pass:6.2f}")


if __name__ == "__main__":
    main()
