import copy

import pytest
import torch
import torch.nn as nn

from qlib import models, quant, rounding
from qlib.rounding import grid


@pytest.fixture(scope="module")
def w():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 8, 3, 3, generator=g) * 0.1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("mode", ["nearest", "floor", "ceil", "stochastic", "adaround", "attention"])
def test_every_rounding_lands_on_the_grid(w, bits, mode):
    layer = nn.Conv2d(8, 16, 3, bias=False)
    layer.weight.data.copy_(w)
    q = quant.QuantLayer(layer, bits).start(layer.weight, mode, tau=0.5,
                                            generator=torch.Generator().manual_seed(0))
    if mode == "adaround":  # random V: any soft state must still round onto the grid
        q.V.data.normal_()
    z = q.integer_weight()
    lo, hi = grid(bits)
    assert torch.equal(z, torch.round(z))
    assert z.min() >= lo and z.max() <= hi
    wq = q.weight()
    assert torch.allclose(wq / q.scale, z)


def test_nearest_floor_ceil_bounds(w):
    s = rounding.search_weight_scale(w, 4)
    v = w / s
    lo, hi = grid(4)
    inside = (v > lo) & (v < hi)
    err = (s * torch.round(v) - w).abs()
    assert (err[inside] <= (s / 2).expand_as(w)[inside] + 1e-7).all()
    f, c = rounding.round_fixed(v, "floor"), rounding.round_fixed(v, "ceil")
    assert (f <= v).all() and (v <= c).all() and ((c - f) <= 1).all()


def test_stochastic_rounding_is_unbiased():
    v = torch.tensor([0.1, 0.5, 0.9, -1.3, 2.75]).repeat(40000, 1)
    r = rounding.round_fixed(v, "stochastic", torch.Generator().manual_seed(0))
    assert ((r == torch.floor(v)) | (r == torch.ceil(v))).all()
    # 40,000 draws: the std of the mean is ≤ 0.5/200 = 0.0025; allow four of them
    assert torch.allclose(r.mean(0), v[0], atol=0.01)


def test_weight_scale_search_beats_max_scaling(w):
    s = rounding.search_weight_scale(w, 3)
    s_max = w.abs().amax((1, 2, 3), keepdim=True) / 3
    err = (rounding.fake_quant(w, s, 3) - w).pow(2).sum((1, 2, 3))
    err_max = (rounding.fake_quant(w, s_max, 3) - w).pow(2).sum((1, 2, 3))
    assert (err <= err_max + 1e-9).all() and (err < err_max).any()


@pytest.mark.parametrize("tau", [0.0, 0.2, 0.5, 1.0])
def test_attention_backward_is_eq6(tau):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(200, generator=g) * 3
    alpha = (torch.randn(200, generator=g) * max(tau, 0.3)).requires_grad_()
    alpha.data[:5] = 0.0  # exercise α = 0 (the τ = 0 step's midpoint)
    upstream = torch.randn(200, generator=g)  # both signs
    z = rounding.attention_round(v, alpha, tau)
    assert torch.equal(z, torch.round(v + alpha.detach()))
    z.backward(upstream)
    a = alpha.detach().double()
    if tau > 0:
        phi = 0.5 + 0.5 * torch.erf(a / (2 ** 0.5 * tau))
    else:
        phi = torch.where(a > 0, 1.0, torch.where(a < 0, 0.0, 0.5)).double()
    expected = upstream.double() * torch.where(upstream > 0, phi, 1 - phi)
    assert torch.allclose(alpha.grad.double(), expected, atol=1e-6)


def test_attention_probabilities_sum_to_one_and_match_nearest_at_tau0():
    p = rounding.attention_probabilities(1.3, 0.5, -8, 7)
    assert p.sum().item() == pytest.approx(1.0)
    assert p.argmax().item() + -8 == 1
    p0 = rounding.attention_probabilities(1.3, 0.0, -8, 7)
    assert p0[1 + 8] == 1.0 and p0.sum() == 1.0
    # far outside the grid: the clipped end cell takes everything
    assert rounding.attention_probabilities(50.0, 0.5, -8, 7)[-1].item() == pytest.approx(1.0)


@pytest.mark.parametrize("arch", models.ARCHS)
def test_fold_bn_is_equivalent(arch, randomise_bn):
    m = randomise_bn(models.build(arch))
    f = quant.fold_bn(m)
    assert not any(isinstance(x, nn.BatchNorm2d) for x in f.modules())
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(f(x), m(x), atol=1e-5, rtol=1e-5)
    assert any(isinstance(x, nn.BatchNorm2d) for x in m.modules())  # the original is untouched


def test_quantize_leaves_input_untouched_and_is_deterministic(randomise_bn):
    m = randomise_bn(models.build("resnet"))
    before = copy.deepcopy(m.state_dict())
    calib = torch.randn(64, 1, 28, 28)
    q1 = quant.quantize(m, calib, w_bits=3, a_bits=4, rounding="attention", iters=5,
                        batch_size=32, progress=False)
    q2 = quant.quantize(m, calib, w_bits=3, a_bits=4, rounding="attention", iters=5,
                        batch_size=32, progress=False)
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(q1(x), q2(x))
    layers = [x for x in q1.modules() if isinstance(x, quant.QuantLayer)]
    assert layers[0].w_bits == 8 and layers[-1].w_bits == 8 and layers[1].w_bits == 3
    assert layers[0].act is None and layers[-1].act.bits == 8 and layers[1].act.bits == 4


def test_capture_many_matches_one_at_a_time_despite_inplace_relu(randomise_bn):
    # VGG's convs are followed by ReLU(inplace=True): a capture that lets the forward run on
    # must not hand back the conv outputs after the ReLU has overwritten them
    m = quant.fold_bn(randomise_bn(models.build("vgg")))
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    data = torch.randn(40, 1, 28, 28)
    for want in ("input", "output"):
        together = quant.capture_many(m, convs, data, 16, torch.device("cpu"), want)
        for conv, got in zip(convs, together):
            alone = quant.capture(m, conv, data, 16, torch.device("cpu"), want)
            assert torch.equal(got, alone)
    outs = quant.capture_many(m, convs, data, 16, torch.device("cpu"), "output")
    assert all((o < 0).any() for o in outs)  # pre-ReLU outputs, negatives kept


def test_reconstruction_reduces_block_error(randomise_bn):
    m = randomise_bn(models.build("vgg"))
    calib = torch.randn(128, 1, 28, 28)
    q = quant.quantize(m, calib, w_bits=2, rounding="attention", tau=0.5, iters=60, lr=1e-2,
                       batch_size=32, progress=False)
    for name, losses in q.quant_report["losses"].items():
        if name not in ("features.0", "classifier.4"):  # 8-bit layers start near zero error
            assert sum(losses[-10:]) < sum(losses[:10]), name


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "resnet50"])
def test_torchvision_models_quantize(name):
    import torchvision

    m = getattr(torchvision.models, name)(weights=None).eval()
    calib = torch.randn(8, 3, 64, 64)
    q = quant.quantize(m, calib, w_bits=4, a_bits=8, rounding="attention", iters=1,
                       batch_size=4, progress=False)
    out = q(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 1000) and torch.isfinite(out).all()


def test_bad_inputs_raise_clear_errors():
    m = models.build("vgg")
    calib = torch.randn(64, 1, 28, 28)
    with pytest.raises(ValueError, match="between 2 and 16"):
        quant.quantize(m, calib, w_bits=1, rounding="nearest")
    with pytest.raises(ValueError, match="between 2 and 16"):
        quant.quantize(m, calib, w_bits=4, a_bits=17, rounding="nearest")
    with pytest.raises(ValueError, match="tau must be"):
        quant.quantize(m, calib, w_bits=4, tau=-0.1)
    with pytest.raises(ValueError, match="unknown rounding 'truncate'"):
        quant.quantize(m, calib, w_bits=4, rounding="truncate")
    with pytest.raises(ValueError, match="fewer than the batch size 64"):
        quant.quantize(m, calib[:10], w_bits=4, rounding="adaround")
    bad = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LSTM(4, 4))
    with pytest.raises(ValueError, match=r"'2' of type LSTM .* supported weight layers: Conv2d, Linear"):
        quant.quantize(bad, calib, w_bits=4, rounding="nearest")
    with pytest.raises(ValueError, match="missing layers"):
        quant.quantize(m, calib, w_bits={"features.3": 4}, rounding="nearest")


def test_tau_explorer_computes_eq2_and_eq6():
    from math import erf, sqrt

    from qlib import widgets

    def Phi(x):
        return 0.5 * (1 + erf(x / sqrt(2)))

    d = widgets.tau_explorer_data(0.3, 0.5, bits=4)
    assert list(d["grid"]) == list(range(-8, 8))
    assert d["prob"][8] == pytest.approx(Phi((0.5 - 0.3) / 0.5) - Phi((-0.5 - 0.3) / 0.5))
    assert d["prob"][9] == pytest.approx(Phi((1.5 - 0.3) / 0.5) - Phi((0.5 - 0.3) / 0.5))
    assert d["prob"].sum() == pytest.approx(1.0)
    mid = len(d["alpha"]) // 2
    assert d["alpha"][mid] == pytest.approx(0, abs=1e-12) and d["factor_pos"][mid] == pytest.approx(0.5)
    assert (d["factor_pos"] + d["factor_neg"]) == pytest.approx(1.0)
    assert d["factor_pos"][-1] > 0.99 and d["factor_pos"][0] < 0.01  # Φ rises with α
    d0 = widgets.tau_explorer_data(0.3, 0.0, bits=4)
    assert d0["prob"][8] == 1.0
    with pytest.raises(ValueError, match="tau must be"):
        widgets.tau_explorer_data(0.3, -0.5)
    box = widgets.tau_explorer()  # builds without a browser
    assert len(box.children) == 2


# --- chapter 7's ablation switches ---------------------------------------------------------

def test_weight_step_variants():
    from qlib.rounding import search_weight_scale

    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * torch.linspace(0.1, 2.0, 6).view(-1, 1, 1, 1)
    mse = search_weight_scale(w, 4)
    maxabs = search_weight_scale(w, 4, method="maxabs")
    tensor = search_weight_scale(w, 4, per_channel=False)
    assert torch.allclose(maxabs.flatten(), w.reshape(6, -1).abs().amax(1) / 7)
    assert (mse <= maxabs + 1e-7).all(), "the search clips: its step is never above max-abs"
    assert tensor.shape == mse.shape and torch.unique(tensor).numel() == 1
    err = lambda s: float((rounding.fake_quant(w, s, 4) - w).pow(2).sum())
    assert err(mse) <= err(maxabs) and err(mse) <= err(tensor)
    with pytest.raises(ValueError, match="weight-step"):
        search_weight_scale(w, 4, method="minmax")


def test_variants_change_what_they_say_and_nothing_else():
    torch.manual_seed(0)
    model = models.build("resnet").eval()
    calib = torch.randn(64, 1, 28, 28)
    kw = dict(w_bits=3, rounding="attention", iters=5, batch_size=32, progress=False)
    base = quant.quantize(model, calib, **kw)
    again = quant.quantize(model, calib, **kw, variant={})
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), again.state_dict().values())
               if isinstance(a, torch.Tensor)), "an empty variant is the recipe"
    per_tensor = quant.quantize(model, calib, **kw, variant={"per_channel": False})
    scales = [m.scale for n, m in quant.quant_layers(per_tensor).items()]
    assert all(torch.unique(s).numel() == 1 for s in scales)
    zeros = quant.quantize(model, calib, w_bits=3, rounding="attention", iters=0, batch_size=32, progress=False,
                           variant={"alpha_init": "zeros"})
    nearest = quant.quantize(model, calib, w_bits=3, rounding="nearest", progress=False)
    assert all(torch.equal(a.w_int, b.w_int) for a, b in zip(quant.quant_layers(zeros).values(),
                                                            quant.quant_layers(nearest).values())), \
        "α = 0 and no training is nearest rounding"
    for bad in ({"backward": "sgd"}, {"per_channel": 1}, {"colour": "red"}, "ste"):
        with pytest.raises(ValueError, match="variant"):
            quant.quantize(model, calib, **kw, variant=bad)


def test_ste_backward_passes_the_gradient_unchanged():
    from qlib.rounding import attention_round, ste_round

    v = torch.tensor([0.2, 1.7, -0.4])
    a1 = torch.tensor([0.9, -0.8, 0.1], requires_grad=True)
    a2 = a1.detach().clone().requires_grad_(True)
    g = torch.tensor([1.0, -2.0, 0.5])
    (ste_round(v, a1) * g).sum().backward()
    (attention_round(v, a2, 0.5) * g).sum().backward()
    assert torch.equal(ste_round(v, a1), attention_round(v, a2, 0.5))
    assert torch.allclose(a1.grad, g)
    assert not torch.allclose(a2.grad, g), "eq. 6 scales the gradient by Φ"


def test_fixed_activation_steps_stay_at_their_initialisation():
    torch.manual_seed(0)
    model = models.build("vgg").eval()
    calib = torch.randn(64, 1, 28, 28)
    kw = dict(w_bits=4, a_bits=4, rounding="attention", batch_size=32, progress=False)
    init = quant.quantize(model, calib, iters=0, **kw)
    fixed = quant.quantize(model, calib, iters=20, **kw, variant={"learn_act_steps": False})
    learned = quant.quantize(model, calib, iters=20, **kw)
    steps = lambda q: torch.stack([m.act.scale.detach() for m in quant.quant_layers(q).values() if m.act is not None])
    assert torch.equal(steps(init), steps(fixed))
    assert not torch.equal(steps(init), steps(learned))


def test_freeze_is_bit_identical_and_never_stale(randomise_bn):
    m = randomise_bn(models.build("resnet"))
    calib = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    q = quant.quantize(m, calib, w_bits=3, a_bits=6, rounding="nearest", progress=False)
    with torch.no_grad():
        before = q(x)
        quant.freeze(q)
        assert all(layer.frozen is not None for layer in quant.quant_layers(q).values())
        assert torch.equal(q(x), before)
        assert not any(k.endswith("frozen") for k in q.state_dict())  # never saved
        # loading other weights drops the materialised ones (else the old ŵ would be used)
        other = quant.quantize(m, calib, w_bits=2, a_bits=6, rounding="nearest", progress=False)
        q.load_state_dict(other.state_dict())
        assert all(layer.frozen is None for layer in quant.quant_layers(q).values())
        assert torch.equal(q(x), other(x))
    # with gradients on (chapter 6 trains through quantized models) the frozen copy is not used
    quant.freeze(q)
    layer = next(iter(quant.quant_layers(q).values()))
    layer.frozen = torch.zeros_like(layer.frozen)
    assert torch.equal(q(x), other(x))  # runs through weight(), not the zeroed copy
    with torch.no_grad():
        assert not torch.equal(q(x), other(x))  # ...while no_grad uses it: the copy is what runs


def test_a_layer_being_calibrated_cannot_be_frozen():
    layer = quant.QuantLayer(nn.Conv2d(2, 3, 3), w_bits=4)
    layer.start(torch.randn(3, 2, 3, 3), "attention", generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="still being calibrated"):
        layer.freeze()
