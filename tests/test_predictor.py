"""Chapter 5's machinery: histogram tokens, the encoder, populations, baselines, metrics."""
import numpy as np
import pytest
import torch

from qlib import baselines, models, population, predictor, quant, report, tokens


# --- tokens --------------------------------------------------------------------------------

def test_count_and_rate_branches():
    v = torch.tensor([-5.0, -1.0, -0.99, 0.0, 0.2, 0.99, 1.0, 7.0, 3.0])
    c = tokens.histogram_counts(v, 4, -1.0, 1.0)
    assert c.sum() == v.numel(), "every value is counted, outliers included"
    assert c[0] == 3 and c[-1] == 4, "values beyond the range go to the end bins"
    tok = tokens.token_from_counts(c, n_images=3, values_per_image=3)
    count, rate = tok[:4], tok[4:]
    assert torch.isclose(rate.sum(), torch.tensor(1.0))
    assert torch.allclose(rate, c / v.numel())
    # a bin holding all of every image's values reads 1 on the count branch; empty bins 0
    full = tokens.token_from_counts(torch.tensor([0.0, 30.0]), n_images=10, values_per_image=3)
    assert torch.allclose(full[:2], torch.tensor([0.0, 1.0]))


def test_count_branch_does_not_depend_on_the_number_of_images():
    """The same per-image distribution over 1 image or 50 gives the same token."""
    c1 = torch.tensor([2.0, 5.0, 1.0])
    assert torch.allclose(tokens.token_from_counts(c1, 1, 8), tokens.token_from_counts(50 * c1, 50, 8))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    m = models.build("resnet").eval()
    images = torch.randn(40, 1, 28, 28)
    return m, images


def test_layer_histograms_shape_and_float_fills_its_range(tiny):
    from qlib.graph import fold_bn, quantizable_layers

    m, images = tiny
    ranges = tokens.float_ranges(m, images)
    tok = tokens.layer_histograms(fold_bn(m), images, 8, ranges)
    assert tok.shape == (len(quantizable_layers(fold_bn(m))), 16)
    assert torch.allclose(tok[:, 8:].sum(1), torch.ones(len(tok)), atol=1e-5)
    assert (tok[:, 8] > 0).all() and (tok[:, 15] > 0).all(), "the float min and max fall in the end bins"


def test_strided_histograms_estimate_the_full_ones(tiny):
    from qlib.graph import fold_bn

    m, images = tiny
    ranges = tokens.float_ranges(m, images)
    full = tokens.histogram_pass(fold_bn(m), images, 8, ranges)["tokens"]
    strided = tokens.histogram_pass(fold_bn(m), images, 8, ranges, stride=31)["tokens"]
    # every layer but the logits (40 × 10 values, too few to subsample) within 2 points of rate
    assert (full[:-1, 8:] - strided[:-1, 8:]).abs().max() < 0.02


def test_bad_inputs_raise_clear_errors(tiny):
    m, images = tiny
    ranges = tokens.float_ranges(m, images)
    with pytest.raises(ValueError, match="N × C × H × W"):
        tokens.layer_histograms(m, images[0], 8, ranges)
    with pytest.raises(ValueError, match="channels"):
        tokens.layer_histograms(m, torch.randn(2, 3, 28, 28), 8, ranges)
    with pytest.raises(ValueError, match="bins"):
        tokens.layer_histograms(m, images, 1, ranges)
    with pytest.raises(ValueError, match="ranges lacks"):
        tokens.layer_histograms(m, images, 8, {})
    with pytest.raises(ValueError, match="empty"):
        population.split([])
    with pytest.raises(ValueError, match="no token sequences"):
        predictor.pad_tokens([])


# --- the encoder ---------------------------------------------------------------------------

def test_position_encoding_makes_the_encoder_order_aware():
    torch.manual_seed(0)
    x = torch.rand(3, 6, 10)
    perm = torch.tensor([5, 2, 0, 4, 1, 3])
    plain = predictor.AccuracyPredictor(10, d_model=16, heads=2, layers=2, position_encoding=False).eval()
    with torch.no_grad():
        assert torch.allclose(plain(x), plain(x[:, perm]), atol=1e-5), "without PE the layers are a set"
    pe = predictor.AccuracyPredictor(10, d_model=16, heads=2, layers=2).eval()
    pe.load_state_dict({k: v for k, v in plain.state_dict().items() if k != "pe"}, strict=False)
    with torch.no_grad():
        assert not torch.allclose(pe(x), pe(x[:, perm]), atol=1e-4), "with eq. 1's PE the order matters"


def test_sinusoidal_encoding_is_eq_1():
    pe = predictor.sinusoidal_encoding(5, 8)
    pos, i = 3, 1
    assert torch.isclose(pe[pos, 2 * i], torch.tensor(np.sin(pos / 10000 ** (2 * i / 8)), dtype=torch.float32))
    assert torch.isclose(pe[pos, 2 * i + 1], torch.tensor(np.cos(pos / 10000 ** (2 * i / 8)), dtype=torch.float32))


def test_padding_does_not_change_a_prediction():
    torch.manual_seed(0)
    m = predictor.AccuracyPredictor(4, d_model=16, heads=2, layers=1).eval()
    short, long = torch.rand(3, 4), torch.rand(7, 4)
    X, M = predictor.pad_tokens([short, long])
    with torch.no_grad():
        assert torch.allclose(m(X, M)[0], m(short.unsqueeze(0))[0], atol=1e-5)


def test_encoder_recovers_a_known_function_of_the_tokens():
    """Synthetic population: accuracy = 90 − 20·(rate mass in the top bin of layers 2 and 5);
    held-out MAE must fall below 1 point (the labels span ~15 points)."""
    g = torch.Generator().manual_seed(0)

    def make(n):
        toks, ys = [], []
        for _ in range(n):
            L = int(torch.randint(6, 9, (1,), generator=g))
            t = torch.rand(L, 8, generator=g)
            t[:, 4:] = t[:, 4:] / t[:, 4:].sum(1, keepdim=True)
            toks.append(t)
            ys.append(90 - 20 * float(t[2, 7] + t[5, 7]))
        return toks, ys

    tr, va, te = make(600), make(100), make(100)
    model, hist = predictor.fit(tr, va, d_model=32, heads=2, layers=2, epochs=150, patience=30, lr=3e-3,
                                seed=0, progress=False)
    mae = float(np.abs(predictor.predict_tokens(model, te[0]) - np.array(te[1])).mean())
    spread = float(np.std(te[1]))
    assert mae < 1.0 and mae < 0.4 * spread, (mae, spread)


# --- populations ---------------------------------------------------------------------------

def test_split_is_by_configuration_and_disjoint():
    recs = [{"config": {"arch": "r", "w_bits": {"a": b}, "a_bits": None, "rounding": "nearest", "seed": 0,
                        "quant": {}}, "acc": 0.0} for b in range(2, 9) for _ in range(3)] * 2
    idx = population.split(recs, (0.6, 0.2, 0.2), seed=1)
    sets = {s: {population.config_key(recs[i]["config"]) for i in v} for s, v in idx.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])
    assert sorted(i for v in idx.values() for i in v) == list(range(len(recs)))


def test_grouped_split_keeps_a_bit_pattern_on_one_side():
    m = models.build("vgg")
    recs = [{"config": c, "acc": 0.0} for c in population.sample_configs("vgg", m, 300, seed=0)]
    idx = population.split(recs, (0.6, 0.2, 0.2), seed=2, group="bits")
    side = {}
    for part, members in idx.items():
        for i in members:
            key = population.group_key(recs[i]["config"], "bits")
            assert side.setdefault(key, part) == part, f"bit pattern on both {side[key]} and {part}"
    assert sorted(i for v in idx.values() for i in v) == list(range(len(recs)))
    # the uniform patterns are large groups (many roundings and activation widths each) and
    # still the shares stay near the fractions
    sizes = {p: len(v) / len(recs) for p, v in idx.items()}
    assert abs(sizes["train"] - 0.6) < 0.08 and abs(sizes["test"] - 0.2) < 0.08, sizes
    assert len(side) < len(recs)  # there were shared patterns to keep together
    with pytest.raises(ValueError, match="group must be"):
        population.split(recs, group="rounding")


def test_sampled_configs_are_distinct_json_and_reproducible():
    import json

    m = models.build("vgg")
    a = population.sample_configs("vgg", m, 12, seed=3)
    b = population.sample_configs("vgg", m, 12, seed=3)
    assert a == b
    assert len({population.config_key(c) for c in a}) == 12
    json.dumps(a)  # plain JSON, no tensors or objects
    names = population.layer_names(m)
    for c in a:
        assert list(c["w_bits"]) == names and c["w_bits"][names[0]] == 8 and c["w_bits"][names[-1]] == 8
        assert all(2 <= b <= 8 for b in c["w_bits"].values())
        assert c["a_bits"] in population.A_BITS


@pytest.mark.parametrize("rounding,quant_kw", [("stochastic", {}),
                                               ("attention", {"iters": 2, "batch_size": 8, "lr": 1e-2})])
def test_a_config_rebuilds_the_same_model(rounding, quant_kw):
    torch.manual_seed(0)
    m = models.build("resnet").eval()
    calib = torch.randn(16, 1, 28, 28)
    names = population.layer_names(m)
    cfg = {"arch": "resnet", "kind": "random", "w_bits": {n: 3 + i % 4 for i, n in enumerate(names)},
           "a_bits": 6, "rounding": rounding, "seed": 7, "quant": quant_kw}
    q1, q2 = population.build(cfg, m, calib), population.build(cfg, m, calib)
    s1, s2 = q1.state_dict(), q2.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        if isinstance(s1[k], torch.Tensor):
            assert torch.equal(s1[k], s2[k]), k


def test_a_config_naming_a_missing_layer_is_refused():
    m = models.build("vgg")
    cfg = population.sample_configs("vgg", m, 1, seed=0)[0]
    cfg["w_bits"]["no.such.layer"] = 4
    with pytest.raises(ValueError, match="unknown layers"):
        population.build(cfg, m, torch.randn(8, 1, 28, 28))


# --- baselines and metrics -----------------------------------------------------------------

def test_paired_baseline_and_metrics():
    recs = [{"probe_acc": 88.0, "acc": 89.5}, {"probe_acc": 80.0, "acc": 82.0}]
    p = baselines.paired(recs, {"acc": 91.0, "probe_acc": 90.0})
    assert np.allclose(p, [89.0, 81.0])
    m = report.regression_metrics([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0], n_boot=50)
    assert m["MAE"][0] == 0 and m["Spearman"][0] == 1 and m["R2"][0] == 1
    m = report.regression_metrics([1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0], n_boot=50)
    assert m["bias"][0] == 1 and m["MAE"][0] == 1 and m["Kendall"][0] == 1
    d, lo, hi = report.mae_difference([0.0] * 20, [0.1] * 20, [1.0] * 20)
    assert d < 0 and hi < 0
    with pytest.raises(ValueError):
        report.regression_metrics([], [])


def test_ridge_selects_on_validation_and_predicts_a_linear_truth():
    rng = np.random.default_rng(0)

    def recs(n):
        out = []
        for _ in range(n):
            bits = {f"l{i}": int(b) for i, b in enumerate(rng.integers(2, 9, 5))}
            out.append({"config": {"w_bits": bits, "a_bits": None, "rounding": "nearest"}, "sqnr": [0.0] * 5,
                        "probe_agree": 0.0, "acc": 70 + 2 * sum(bits.values()) / 5})
        return out

    tr, va, te = recs(80), recs(20), recs(20)
    p, info = baselines.ridge(tr, va, te, "weights")
    assert np.abs(p - baselines.labels(te)).max() < 0.5 and info["alpha"] in baselines.RIDGE_ALPHAS


def test_agreement_features_include_the_paired_estimate_and_activation_bits():
    r = {"config": {"w_bits": {"a": 4, "b": 3}, "a_bits": 6, "rounding": "nearest"}, "probe_agree": 97.0,
         "probe_acc": 85.0}
    row = baselines.features([r], "agree", {"acc": 91.0, "probe_acc": 88.0})[0]
    assert list(row) == [97.0, 88.0, 6.0, 1 / 6, 4.0, 3.0]
    with pytest.raises(ValueError, match="float_ref"):
        baselines.features([r], "agree")


def test_pooled_mlp_pads_architectures_and_learns_across_them():
    rng = np.random.default_rng(0)

    def recs(n, L, shift):  # the label reads the first token's mean; the architecture adds a shift
        out = []
        for _ in range(n):
            t = torch.from_numpy(rng.random((L, 4))).float()
            out.append({"tokens_probe": t, "acc": 80 + 10 * float(t[0].mean()) + shift})
        return out

    parts = [{"a": recs(n, 3, 0.0), "b": recs(n, 5, 4.0)} for n in (150, 40, 40)]
    X = baselines.pooled_tokens(parts[0])
    assert X.shape == (300, 5 * 4 + 2) and (X[:150, 12:20] == 0).all()  # "a" padded from 3 to 5 layers
    pred, info = baselines.mlp_pooled(*parts, seed=0)
    y = np.concatenate([baselines.labels(parts[2][a]) for a in ("a", "b")])
    const = np.abs(y - y.mean()).mean()
    assert np.abs(pred - y).mean() < 0.5 * const, (np.abs(pred - y).mean(), const)
    with pytest.raises(ValueError, match="same architectures"):
        baselines.mlp_pooled(parts[0], {"b": parts[1]["b"], "a": parts[1]["a"]}, parts[2])


def test_a_strided_pass_reads_the_same_values_whatever_memory_format_a_backend_returns():
    """histogram_pass reads every stride-th value of a map: in (N, H, W, C) order whether a
    convolution kernel returns the map channels-last or NCHW (which one depends on the
    backend and the CPU), so two machines sample the same values."""
    t = torch.randn(2, 5, 3, 4)
    nhwc = t.permute(0, 2, 3, 1).reshape(-1)
    assert torch.equal(tokens._flat(t.contiguous()), nhwc)
    assert torch.equal(tokens._flat(t.contiguous(memory_format=torch.channels_last)), nhwc)
    assert torch.equal(tokens._flat(torch.arange(6.0).reshape(2, 3)), torch.arange(6.0))


def test_token_difference_is_max_and_mean_and_refuses_other_shapes():
    a = torch.zeros(3, 4)
    b = a.clone()
    b[0, 0] = 0.01
    worst, mean = tokens.difference(a, b)
    assert worst == pytest.approx(0.01) and mean == pytest.approx(0.01 / 12)
    assert worst <= tokens.SAME_MAX and mean > tokens.SAME_MEAN  # alone it passes SAME_MAX; in 1 of 12 values it fails the mean
    with pytest.raises(ValueError, match="different shapes"):
        tokens.difference(a, torch.zeros(4, 3))


def test_kept_counts_give_the_tokens_of_fewer_images_and_bins(tiny):
    """Chapter 7's probe-size and bin ablations come from one pass: the counts kept after
    the first n images, merged 2 → 1 bins, equal a fresh pass over those n at half the bins."""
    from qlib.graph import fold_bn

    m, images = tiny
    fm = fold_bn(m)
    ranges = tokens.float_ranges(m, images)
    out = tokens.histogram_pass(fm, images, 16, ranges, batch_size=15, keep_counts=(7, 40))
    assert torch.allclose(tokens.tokens_from_counts(out["counts"][40], 40, out["values_per_image"]),
                          out["tokens"], atol=1e-6)
    fresh = tokens.histogram_pass(fm, images[:7], 8, ranges)["tokens"]
    merged = tokens.tokens_from_counts(out["counts"][7], 7, out["values_per_image"], merge=2)
    assert torch.allclose(merged, fresh, atol=1e-5)
    with pytest.raises(ValueError, match="keep_counts"):
        tokens.histogram_pass(fm, images, 16, ranges, keep_counts=(41,))
    with pytest.raises(ValueError, match="merge"):
        tokens.tokens_from_counts(out["counts"][7], 7, out["values_per_image"], merge=3)


def test_a_residual_predictor_adds_its_correction_to_the_paired_estimate():
    import torch.nn as nn

    from qlib import quant

    torch.manual_seed(0)
    fm = models.build("vgg").eval()
    calib, probe = torch.randn(16, 1, 28, 28), torch.randn(12, 1, 28, 28)
    labels = torch.randint(0, 10, (12,))
    q = quant.quantize(fm, calib, w_bits=3, rounding="nearest", progress=False)
    ranges = tokens.float_ranges(fm, probe)
    enc = predictor.AccuracyPredictor(2 * 8, d_model=16, heads=2, layers=1)
    nn.init.zeros_(enc.head.weight)
    nn.init.constant_(enc.head.bias, 0.5)  # a correction of +0.5 points (y_std 1, y_mean 0)
    enc.residual.fill_(1)
    trained = {"model": enc, "probe": probe, "probe_labels": labels, "bins": 8, "ranges": ranges,
               "float_acc": 91.0, "float_probe_acc": 75.0}
    with torch.no_grad():
        probe_top1 = 100 * (q(probe).argmax(1) == labels).float().mean().item()
    assert predictor.predict(trained, q) == pytest.approx(91.0 + probe_top1 - 75.0 + 0.5, abs=1e-4)
    with pytest.raises(ValueError, match="without images"):
        predictor.predict(trained, q, probe)
    with pytest.raises(ValueError, match="base="):
        predictor.predict_tokens(enc, [torch.rand(8, 16)])
    assert predictor.predict_tokens(enc, [torch.rand(8, 16)], base=[80.0])[0] == pytest.approx(80.5)


def test_stress_configs_lie_outside_the_sampler():
    m = models.build("resnet")
    names = population.layer_names(m)
    a = population.stress_configs("resnet", m, 15, seed=1)
    assert a == population.stress_configs("resnet", m, 15, seed=1)
    assert len({population.config_key(c) for c in a}) == 15
    for c in a:
        b = list(c["w_bits"].values())
        assert b[0] == 8 and b[-1] == 8 and 1 <= b[1:-1].count(2) <= 3
        assert all(3 <= x <= 6 for x in b[1:-1] if x != 2)
        assert c["kind"] == "stress" and c["rounding"] == "nearest" and c["a_bits"] in (8, 5, 4)


def test_fit_batches_by_length_and_takes_a_robust_loss():
    """Sequences of two lengths (two architectures) train together, each batch of one length;
    a Huber fit learns the same function; an unknown loss is refused."""
    g = torch.Generator().manual_seed(1)

    def make(n):
        toks, ys = [], []
        for k in range(n):
            t = torch.rand(4 if k % 2 else 9, 6, generator=g)
            toks.append(t)
            ys.append(80 + 10 * float(t[1, 0]))
        return toks, ys

    tr, va, te = make(300), make(60), make(60)
    for loss in ("mse", "huber"):
        model, hist = predictor.fit(tr, va, d_model=16, heads=2, layers=1, epochs=80, patience=20, lr=3e-3,
                                    loss=loss, progress=False)
        mae = float(np.abs(predictor.predict_tokens(model, te[0]) - np.array(te[1])).mean())
        assert mae < 0.5 * np.std(te[1]), (loss, mae)
        assert len(hist["train_loss"]) == hist["epochs_run"]
    with pytest.raises(ValueError, match="loss must be one of"):
        predictor.fit(tr, va, loss="l1", progress=False)


def test_protocol_verdicts_need_every_run_to_agree():
    """study.versus_runs pairs each fitting seed with the baseline on its split and calls a
    difference only when every run's bootstrap says so; run_scores reads every run."""
    from qlib import study

    rng = np.random.default_rng(0)
    runs = []
    for k in range(3):
        y = rng.uniform(80, 90, 300)
        arch = ["resnet"] * 150 + ["vgg"] * 150
        good = [y + rng.normal(0, 0.3, 300) for _ in range(5)]
        bad = y + rng.normal(0, 2.0, 300)
        mixed = [y + rng.normal(0, 0.3 if j else 2.0, 300) for j in range(5)]  # one bad seed
        runs.append({"split_seed": k, "y": y, "arch": arch,
                     "preds": {"good": good, "bad": [bad], "mixed": mixed}})
    ev = {"runs": runs}
    fa = {"resnet": 91.0, "vgg": 91.0}
    v = study.versus_runs(ev, "good", "bad")
    assert v["verdict"] == "better" and v["runs"] == 15 and v["high"] < 0
    assert study.versus_runs(ev, "bad", "good")["verdict"] == "worse"
    # better in the 12 runs of good seeds, no different in the 3 with the bad one: no verdict
    assert study.versus_runs(ev, "mixed", "bad")["verdict"] == "not distinguishable"
    assert study.versus_runs(ev, "good", "bad", fa)["verdict"] == "better"
    s = study.run_scores(ev, fa)
    assert s.groupby("method").size().to_dict() == {"good": 15, "bad": 3, "mixed": 15}
    assert s[s.method == "good"]["MAE"].max() < s[s.method == "bad"]["MAE"].min()


def test_each_target_gets_its_own_encoder_size_and_a_typo_is_refused():
    from qlib import profiles

    ps = profiles.get("quick").predictor
    assert set(ps.size("top-1")) == {"d_model", "heads", "layers", "weight_decay"}
    assert ps.fit_kwargs("top-1")["weight_decay"] == ps.size("top-1")["weight_decay"]
    assert ps.fit_kwargs("residual", weight_decay=0.5)["weight_decay"] == 0.5
    with pytest.raises(ValueError, match="unknown target"):
        ps.size("top1")


def test_per_image_counts_sum_to_the_tokens_of_any_subset():
    torch.manual_seed(0)
    m = models.build("resnet").eval()
    imgs = torch.randn(12, 1, 28, 28)
    ranges = tokens.float_ranges(m, imgs)
    q = quant.quantize(m, imgs, w_bits=4, a_bits=6, rounding="nearest", progress=False)
    counts, vpi = tokens.per_image_counts(q, imgs, 16, ranges, batch_size=5)
    assert counts.shape == (12, len(tokens.token_layers(q)), 16)
    assert torch.equal(counts.sum(2), torch.tensor(vpi, dtype=torch.float32).expand(12, -1)), \
        "each image's counts hold every one of its values"
    for subset in ([3], [0, 7, 11], list(range(12))):
        got = tokens.tokens_from_counts(counts[subset].sum(0), len(subset), vpi)
        want = tokens.layer_histograms(q, imgs[subset], 16, ranges)
        assert tokens.difference(got, want)[0] < 1e-5, subset
