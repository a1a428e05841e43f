"""Chapter 6's machinery: soft histograms, the generator, stage 2, the baselines' images."""
import math

import numpy as np
import pytest
import torch

from qlib import generator, models, predictor, quant, tokens
from qlib.graph import fold_bn


def test_soft_histogram_tends_to_the_hard_one():
    torch.manual_seed(0)
    v = torch.cat([torch.randn(20000) * 1.5, torch.tensor([-9.0, 9.0, 4.0])])
    hard = tokens.histogram_counts(v, 16, -3.0, 3.0)
    gaps = []
    for s in (1.0, 0.3, 0.1, 0.01, 1e-6):
        soft = generator.soft_histogram_counts(v, 16, -3.0, 3.0, s)
        assert math.isclose(float(soft.sum()), v.numel(), rel_tol=1e-5), "mass is conserved"
        gaps.append(float((soft - hard).abs().max()))
    assert all(b <= a for a, b in zip(gaps, gaps[1:])), f"the gap shrinks with the softness: {gaps}"
    assert gaps[0] > 10, "softness 1 really is soft"
    assert gaps[-1] <= 1.0, f"softness → 0 gives the hard counts, got a gap of {gaps[-1]}"


def test_soft_histogram_has_a_gradient_inside_the_range_only():
    v = torch.tensor([-5.0, -0.6, 0.1, 0.55, 5.0], requires_grad=True)
    c = generator.soft_histogram_counts(v, 4, -1.0, 1.0, 1.0)
    (c * torch.arange(4.0)).sum().backward()  # moving a value up moves mass to higher bins
    g = v.grad
    assert g[0] == 0 and g[-1] == 0, "outliers sit in the end bins whatever their value"
    assert (g[1:4] > 0).all()


@pytest.fixture(scope="module")
def small():
    """A randomly initialised ResNet, its ranges and a few quantized versions."""
    torch.manual_seed(0)
    m = models.build("resnet").eval()
    calib = torch.randn(32, 1, 28, 28)
    ranges = tokens.float_ranges(m, calib)
    qs = [quant.quantize(m, calib, w_bits=b, a_bits=a, rounding="nearest", progress=False)
          for b, a in ((8, None), (4, None), (3, 8), (2, None), (2, 4), (5, 6))]
    return m, calib, ranges, qs


def test_image_tokens_equal_the_hard_histograms_and_reach_the_pixels(small):
    m, calib, ranges, qs = small
    img = calib[:1].clone().requires_grad_(True)
    tok = generator.image_tokens(qs[1], img, 8, ranges)
    assert torch.allclose(tok, tokens.layer_histograms(qs[1], calib[:1], 8, ranges), atol=1e-6), \
        "straight-through: the forward value is the use-time token"
    (tok * torch.linspace(0, 1, 16)).sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_generator_output_shape_and_range(shape):
    lo, hi = torch.full((shape[0],), -0.8), torch.linspace(1.0, 2.0, shape[0])
    G = generator.ImageGenerator(16, shape, (lo, hi), d_model=32, heads=2)
    tok = torch.rand(7, 16)
    x = G(tok)
    assert x.shape == (1, *shape)
    assert (x >= lo.view(1, -1, 1, 1)).all() and (x <= hi.view(1, -1, 1, 1)).all()
    opt = torch.optim.Adam(G.parameters(), lr=1e-2)
    for _ in range(2):  # the head starts at zero: after one step the encoder's input matters
        opt.zero_grad()
        G(tok).square().sum().backward()
        opt.step()
    assert G.embed.weight.grad.abs().sum() > 0, "the image depends on the encoder's input"
    assert not torch.allclose(G(tok), G(torch.rand(7, 16)))


def test_generator_starts_exactly_at_its_init_image():
    lo, hi = torch.tensor([-0.8]), torch.tensor([2.0])
    init = torch.rand(1, 28, 28) * 2.5 - 0.7          # inside the range, away from its ends
    G = generator.ImageGenerator(16, (1, 28, 28), (lo, hi), d_model=32, heads=2, init_image=init, seed=3)
    for tok in (torch.rand(7, 16), torch.rand(12, 16) * 5):
        assert torch.allclose(G(tok)[0], init, atol=1e-5), "the decoder adds nothing at initialisation"
    groups = G.param_groups(1e-3, 0.05)
    assert [g["lr"] for g in groups] == [1e-3, 0.05] and groups[1]["params"] == [G.pixel_bias]
    assert sum(len(g["params"]) for g in groups) == len(list(G.parameters()))


def test_a_k_image_generator_writes_k_images_that_part_once_trained():
    lo, hi = torch.tensor([-0.8]), torch.tensor([2.0])
    init = torch.rand(1, 28, 28) * 2.5 - 0.7
    G1 = generator.ImageGenerator(16, (1, 28, 28), (lo, hi), d_model=32, heads=2, init_image=init, seed=3)
    G = generator.ImageGenerator(16, (1, 28, 28), (lo, hi), d_model=32, heads=2, init_image=init,
                                 n_images=4, seed=3)
    tok = torch.rand(2, 7, 16)
    x = G(tok)
    assert x.shape == (2, 4, 1, 28, 28)
    assert torch.allclose(x, init.expand_as(x), atol=1e-5), "every image starts at the init image"
    # the extra slot parameters come last: the one-image generator's initialisation is the same
    assert all(torch.equal(p, G.state_dict()[n]) for n, p in G1.state_dict().items() if n != "pixel_bias")
    opt = torch.optim.Adam(G.parameters(), lr=1e-2)
    w = torch.linspace(-1, 1, 28 * 28).view(1, 1, 28, 28)
    for _ in range(3):  # a loss symmetric in the K images: only the slots can tell them apart
        opt.zero_grad()
        (G(tok[0]) * w).sum().backward()
        opt.step()
    y = G(tok[0])[0]
    assert (y[0] - y[1]).abs().max() > 1e-4, "the slots part the images"
    with pytest.raises(ValueError, match="n_images"):
        generator.ImageGenerator(16, (1, 28, 28), (lo, hi), n_images=0)


def test_image_tokens_of_k_images_are_the_hard_histogram_over_all_of_them(small):
    m, calib, ranges, qs = small
    imgs = calib[:4].clone().requires_grad_(True)
    tok = generator.image_tokens(qs[1], imgs, 8, ranges)
    assert torch.allclose(tok, tokens.layer_histograms(qs[1], calib[:4], 8, ranges), atol=1e-6)
    tok.sum().backward()
    assert imgs.grad.abs().flatten(1).sum(1).min() > 0, "every image gets a gradient"


def _truth_predictor(small, bins=8):
    """A frozen random predictor and labels it gives on a hidden target image: a population
    whose accuracy is a known function of one image's tokens (zero loss is reachable)."""
    m, calib, ranges, qs = small
    torch.manual_seed(1)
    P = predictor.AccuracyPredictor(2 * bins, d_model=32, heads=2, layers=1, dropout=0.0)
    P.y_mean.fill_(80.0)
    P.y_std.fill_(10.0)
    with torch.no_grad():  # a steep function of the tokens, so images differ by many points
        P.head.weight.mul_(30)
    target = calib[3]
    labels = generator.evaluate_images(P, [("resnet", q, 0.0) for q in qs], {"resnet": target}, {"resnet": ranges}, bins)
    return P, [("resnet", q, float(y)) for q, y in zip(qs, labels)]


def test_stage2_lowers_its_loss_and_never_runs_held_out_models(small):
    m, calib, ranges, qs = small
    P, entries = _truth_predictor(small)
    train, val, held_out = entries[:4], entries[4:5], entries[5:]
    calls = []
    h = held_out[0][1].register_forward_hook(lambda *a: calls.append(1))
    z = torch.nn.Parameter(torch.zeros(1, 1, 28, 28))
    hist = generator.stage2([z], lambda: {"resnet": torch.tanh(z)[0] * 2}, P, train, val,
                            ranges={"resnet": ranges}, bins=8, steps=60, batch=4, lr=0.05, eval_every=5,
                            patience=100, progress=False)
    h.remove()
    assert not calls, "a held-out model was run during stage 2"
    first, last = np.mean(hist["loss"][:5]), np.mean(hist["loss"][-10:])
    assert last < 0.5 * first, f"stage 2 did not lower its loss: {first:.3f} → {last:.3f}"
    assert hist["best_val_mae"] <= hist["val_mae"][0]


def test_stage2_refuses_bad_inputs(small):
    m, calib, ranges, qs = small
    P, entries = _truth_predictor(small)
    z = torch.nn.Parameter(torch.zeros(1, 28, 28))
    kw = dict(ranges={"resnet": ranges}, bins=8, steps=2, progress=False)
    with pytest.raises(ValueError, match="at least one training"):
        generator.stage2([z], lambda: {"resnet": z}, P, [], entries, **kw)
    with pytest.raises(ValueError, match="both"):
        generator.stage2([z], lambda: {"resnet": z}, P, entries[:3], entries[2:4], **kw)


def test_bad_inputs_raise_clear_errors(small):
    m, calib, ranges, qs = small
    v = torch.randn(10)
    for s in (0, -1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="softness"):
            generator.soft_histogram_counts(v, 4, -1.0, 1.0, s)
    with pytest.raises(ValueError, match="bins"):
        generator.soft_histogram_counts(v, 1, -1.0, 1.0)
    with pytest.raises(ValueError, match="channels"):
        generator.image_tokens(qs[0], torch.randn(1, 3, 28, 28), 8, ranges)
    with pytest.raises(ValueError, match="patch"):
        generator.ImageGenerator(16, (1, 30, 30), (-1.0, 1.0), patch=4)
    with pytest.raises(ValueError, match="hi > lo"):
        generator.ImageGenerator(16, (1, 28, 28), (1.0, -1.0))
    with pytest.raises(ValueError, match="BatchNorm"):
        generator.bn_statistics_image(fold_bn(m), (1, 28, 28), steps=1)


def test_bn_statistics_image_matches_the_running_statistics():
    torch.manual_seed(0)
    m = models.build("vgg")
    m.train()
    with torch.no_grad():  # give the BN layers non-trivial running statistics
        for _ in range(20):
            m(torch.randn(64, 1, 28, 28) * 0.5 + 0.3)
    m.eval()
    bns = [b for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)]

    def gap(x):
        seen = []
        hs = [b.register_forward_pre_hook(lambda mod, i: seen.append((mod, i[0]))) for b in bns]
        with torch.no_grad():
            m(x.unsqueeze(0))
        for h in hs:
            h.remove()
        return sum(float((t.mean((0, 2, 3)) - b.running_mean).pow(2).sum()) for b, t in seen)

    x = generator.bn_statistics_image(m, (1, 28, 28), steps=150, lr=0.1)
    assert x.shape == (1, 28, 28)
    assert gap(x) < 0.2 * gap(torch.randn(1, 28, 28))
