"""The quick profile's shipped population (populations/quick/, qlib.record) against a rebuild
on this machine: a random sample of records per architecture is labelled again from its
configuration, on the shipped float checkpoint, and must give the same labels and tokens.

Tolerances, and why they are not zero: the float weights, calibration images, test images
and torch release are the same, but oneDNN picks its convolution kernels by CPU (AVX2,
AVX-512, AMX), so logits can differ in their last bits and an image near a tie can change
class; a fixed rounding then moves a label by an image or two (≤ 0.05 points, 5 of 10,000
images; per-image agreement ≥ 99.9%). A learned rounding's 100 Adam steps per unit amplify
last-bit differences into a few flipped rounding decisions (≤ 0.5 points). Tokens move
where a value sits at a bin edge (qlib.tokens.SAME_MAX and SAME_MEAN say how far). On the
machine that built the record every difference is zero but float16 storage's. A stale record (qlib changed what a record
means, or the float weights differ) fails with the command that rebuilds it.
"""
import random

import pytest

from qlib import experiments, models, population, profiles, quant, record, study, tokens
from qlib.graph import fold_bn

PS = profiles.get("quick").predictor
# per architecture: fixed-rounding configurations (~2 s each) and learned ones (8–16 s each)
SAMPLE_FIXED, SAMPLE_LEARNED = 8, 1
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
    rng = random.Random(f"rebuild-{arch}")
    learned_idx = [i for i, r in enumerate(recs) if r["config"]["rounding"] in quant.LEARNED]
    fixed_idx = [i for i, r in enumerate(recs) if r["config"]["rounding"] not in quant.LEARNED]
    assert learned_idx and fixed_idx, f"{arch}: the population lacks learned or fixed-rounding configurations"
    for i in rng.sample(fixed_idx, SAMPLE_FIXED) + rng.sample(learned_idx, SAMPLE_LEARNED):
        old = recs[i]
        cfg = old["config"]
        new = population.label(cfg, model, folded, S.calib, S.test_set, probe, pop["float"]["probe_preds"],
                               labels[pop["probe_idx"]], ranges, pop["bins"], pop["stride"])
        learned = cfg["rounding"] in quant.LEARNED
        assert abs(new["acc"] - old["acc"]) <= (LEARNED_POINTS if learned else FIXED_POINTS), (arch, i, cfg)
        if not learned:
            agree = (new["correct_full"] == old["correct_full"]).float().mean().item()
            assert agree >= AGREEMENT, (arch, i, agree)
            # float16 storage, and values at bin edges on another machine's kernels
            for key in ("tokens_probe", "tokens_full"):
                worst, mean = tokens.difference(new[key], old[key])
                assert worst <= tokens.SAME_MAX and mean <= tokens.SAME_MEAN, (arch, i, key, worst, mean)
            # what the baselines read: probe top-1 and agreement (256 images: a flip is 0.39
            # points), weight SQNR (no forward pass: the same step search on the same weights)
            assert abs(new["probe_acc"] - old["probe_acc"]) <= 0.8 and abs(new["probe_agree"] - old["probe_agree"]) <= 0.8
            assert new["sqnr"] == pytest.approx(old["sqnr"], abs=1e-3)


@pytest.mark.skipif(not PS.shipped, reason="the quick profile labels its population live (no record yet)")
def test_the_profile_takes_the_encoder_sizes_its_tuning_record_chose(S):
    """benchmarks/encoder_tuning.py chooses each target's width, depth and weight decay on the
    first split's validation configurations; the quick profile must use what it chose, and a
    record tuned on another population is stale."""
    import json

    path = record.directory("quick") / "encoder_tuning.json"
    assert path.exists(), f"{path} is missing: run python benchmarks/encoder_tuning.py"
    tuned = json.loads(path.read_text())
    pops = study.populations(S, progress=False, split_seed=PS.split_seeds[0])
    assert tuned["data"] == study._data_key(pops) and tuned["split"] == study._split_spec(pops), (
        f"{path} was tuned on another population or split: rerun python benchmarks/encoder_tuning.py")
    for target in study.TARGETS:
        rows = [r for r in tuned["rows"] if r["target"] == target]
        best = study.smallest_within_one_se(rows)
        assert len(rows) >= 12 and tuned["chosen"][target] == {k: best[k] for k in tuned["chosen"][target]}
        assert PS.size(target) == tuned["chosen"][target], (
            f"profiles.quick's {target} encoder is {PS.size(target)}, its tuning chose {tuned['chosen'][target]}")
