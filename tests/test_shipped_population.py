"""The quick profile's shipped population (populations/quick/, qlib.record) against a rebuild
on this machine: a random sample of records per architecture is labelled again from its
configuration, on the shipped float checkpoint, and must give the same labels and tokens.

Tolerances, and why they are not zero: the float weights, calibration images, test images
and torch release are the same, but oneDNN picks its convolution kernels by CPU (AVX2,
AVX-512, AMX), so logits can differ in their last bits and an image near a tie can change
class; a fixed rounding then moves a label by an image or two (≤ 0.05 points, 5 of 10,000
images; per-image agreement ≥ 99.9%). A learned rounding's 100 Adam steps per unit amplify
last-bit differences into a few flipped rounding decisions (≤ 0.5 points). On the machine
that built the record every difference is zero. A stale record (qlib changed what a record
means, or the float weights differ) fails with the command that rebuilds it.
"""
import random

import pytest
import torch

from qlib import experiments, models, population, profiles, quant, record, study
from qlib.graph import fold_bn

PS = profiles.get("quick").predictor
SAMPLE = 20
FIXED_POINTS, LEARNED_POINTS, AGREEMENT = 0.05, 0.5, 0.999


def test_the_profile_ships_exactly_when_the_record_is_there():
    for arch in models.ARCHS:
        assert record.has_population("quick", arch) == PS.shipped, (
            f"profiles.quick.predictor.shipped is {PS.shipped} but populations/quick "
            f"{'has' if record.has_population('quick', arch) else 'lacks'} a {arch} population")


@pytest.fixture(scope="module")
def S():
    return experiments.setup("quick")


@pytest.mark.skipif(not PS.shipped, reason="the quick profile labels its population live (no record yet)")
@pytest.mark.parametrize("arch", models.ARCHS)
def test_a_random_sample_rebuilds_to_the_same_labels(S, arch):
    pop = study.population_of(S, arch, progress=False)  # a stale record raises here, naming the command
    recs = pop["records"]
    assert len(recs) >= PS.configs, f"{arch}: {len(recs)} records, the profile samples {PS.configs}"
    model = S.float_models[arch]
    images, labels = S.test_set.tensors
    float_acc = 100 * models.evaluate(model, S.test_set)
    assert abs(float_acc - pop["float"]["acc"]) <= FIXED_POINTS
    probe = images[pop["probe_idx"]]
    ranges = {k: tuple(v) for k, v in pop["ranges"].items()}
    folded = fold_bn(model).eval()
    for i in random.Random(f"rebuild-{arch}").sample(range(len(recs)), SAMPLE):
        old = recs[i]
        cfg = old["config"]
        new = population.label(cfg, model, folded, S.calib, S.test_set, probe, pop["float"]["probe_preds"],
                               labels[pop["probe_idx"]], ranges, pop["bins"], pop["stride"])
        learned = cfg["rounding"] in quant.LEARNED
        assert abs(new["acc"] - old["acc"]) <= (LEARNED_POINTS if learned else FIXED_POINTS), (arch, i, cfg)
        if not learned:
            agree = (new["correct_full"] == old["correct_full"]).float().mean().item()
            assert agree >= AGREEMENT, (arch, i, agree)
            # float16 storage: 3 significant digits of values in [0, 1]
            assert torch.allclose(new["tokens_probe"], old["tokens_probe"], atol=2e-3, rtol=0), (arch, i)
            assert torch.allclose(new["tokens_full"], old["tokens_full"], atol=2e-3, rtol=0), (arch, i)
            # what the baselines read: probe top-1 and agreement (256 images: a flip is 0.39
            # points), weight SQNR (no forward pass: the same step search on the same weights)
            assert abs(new["probe_acc"] - old["probe_acc"]) <= 0.8 and abs(new["probe_agree"] - old["probe_agree"]) <= 0.8
            assert new["sqnr"] == pytest.approx(old["sqnr"], abs=1e-3)
