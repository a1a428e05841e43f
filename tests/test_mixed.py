import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from qlib import mixed, models, quant, widgets


def direct_length(W, eps2):
    n, m = W.shape
    W = W.double()
    A = torch.eye(n, dtype=torch.float64) + n / (m * eps2) * W @ W.T
    return 0.5 * torch.logdet(A).item() / math.log(2.0)


@pytest.mark.parametrize("shape", [(6, 40), (40, 6), (12, 12), (1, 5), (5, 1)])
@pytest.mark.parametrize("eps2", [1e-3, 0.1, 2.0])
def test_coding_length_is_eq12(shape, eps2):
    W = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert mixed.coding_length(W, eps2) == pytest.approx(direct_length(W, eps2), rel=1e-9, abs=1e-9)


def test_coding_length_gram_trick_is_transpose_invariant():
    # L(W) uses c = n/(mε²); with c fixed, det(I + cWWᵀ) = det(I + cWᵀW): swap n and m and
    # rescale ε² so c is unchanged, and the length must not move
    W = torch.randn(30, 7, generator=torch.Generator().manual_seed(1))
    n, m = W.shape
    eps2 = 0.05
    c = n / (m * eps2)
    eps2_t = m / (n * c)
    assert mixed.coding_length(W, eps2) == pytest.approx(mixed.coding_length(W.T, eps2_t), rel=1e-12)


def test_coding_length_bad_input():
    with pytest.raises(ValueError, match="eps2"):
        mixed.coding_length(torch.ones(3, 3), 0.0)
    with pytest.raises(ValueError, match="n × m"):
        mixed.coding_length(torch.ones(3), 1.0)


def test_conv_weight_axes():
    w = torch.randn(16, 8, 3, 3)
    V = mixed.as_vectors(w)
    assert V.shape == (8 * 9, 16)  # n = C_in·k·k dimensions, m = C_out vectors
    assert torch.equal(V[:, 5], w[5].flatten())


def test_cluster_1d_is_optimal_on_small_cases():
    g = torch.Generator().manual_seed(2)
    for trial in range(20):
        x = torch.rand(7, generator=g).tolist()
        k = 3
        labels = mixed.cluster_1d(x, k)

        def sse(lab):
            tot = 0.0
            for c in set(lab):
                pts = [v for v, l in zip(x, lab) if l == c]
                mu = sum(pts) / len(pts)
                tot += sum((p - mu) ** 2 for p in pts)
            return tot
        best = min(sse(lab) for lab in itertools.product(range(k), repeat=len(x)) if len(set(lab)) == k)
        assert sse(labels) == pytest.approx(best, abs=1e-12)
        # cluster 0 holds the smallest values: labels are monotone in the values
        pairs = sorted(zip(x, labels))
        assert [l for _, l in pairs] == sorted(l for _, l in pairs)


class Net(nn.Module):
    """first conv, two middle convs of equal shape (one structured, one near rank one), last."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(1, 8, 3)
        self.rich = nn.Conv2d(8, 8, 3)
        self.poor = nn.Conv2d(8, 8, 3)
        self.mid = nn.Conv2d(8, 8, 3)
        self.last = nn.Linear(8, 2)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            self.rich.weight.copy_(torch.randn(8, 8, 3, 3, generator=g) * 0.3)
            v = torch.randn(1, 8, 3, 3, generator=g) * 0.3
            self.poor.weight.copy_(v.repeat(8, 1, 1, 1) + 1e-4 * torch.randn(8, 8, 3, 3, generator=g))
            self.mid.weight.copy_(torch.randn(8, 8, 3, 3, generator=g) * 0.1)

    def forward(self, x):
        return self.last(self.mid(self.poor(self.rich(self.first(x)))).mean((2, 3)))


def test_allocate_bits_gives_structure_more_bits_and_is_deterministic():
    net = Net()
    a1 = mixed.allocate_bits(net, [6, 3, 4, 3], eps2=1e-3)  # unsorted, duplicated: normalised
    a2 = mixed.allocate_bits(net, [3, 4, 6], eps2=1e-3)
    assert a1 == a2
    assert set(a1) == {"rich", "poor", "mid"}  # first and last stay at 8 bits in quantize()
    assert a1["rich"] > a1["poor"]
    assert a1["poor"] == 3 and a1["rich"] == 6


def test_allocate_bits_edge_cases():
    net = Net()
    with pytest.raises(ValueError, match="empty"):
        mixed.allocate_bits(net, [], eps2=1e-3)
    with pytest.raises(ValueError, match="between 2 and 16"):
        mixed.allocate_bits(net, [1, 4], eps2=1e-3)
    one = mixed.allocate_bits(net, [5], eps2=1e-3)
    assert set(one.values()) == {5}
    # three layers, seven widths: at most three clusters, spread over the list
    many = mixed.allocate_bits(net, [2, 3, 4, 5, 6, 7, 8], eps2=1e-3)
    assert len(set(many.values())) <= 3 and all(2 <= b <= 8 for b in many.values())
    # identical layers: one distinct length, one cluster, the middle width
    same = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        same[2].weight.copy_(same[1].weight)
    assert set(mixed.allocate_bits(same, [3, 4, 5], eps2=1e-2).values()) == {4}


def test_model_size_by_hand():
    net = Net()  # convs: first 8·1·9 = 72, rich/poor/mid 8·8·9 = 576 each; linear 16
    bits = {"rich": 3, "poor": 4, "mid": 5}
    convs = (72 * 8 + 576 * 3 + 576 * 4 + 576 * 5) / 8 / 1e6
    assert mixed.model_size_mb(net, bits) == pytest.approx(convs + 16 * 8 / 8 / 1e6), "every quantized layer"
    assert mixed.model_size_mb(net, bits, conv_only=True) == pytest.approx(convs)
    assert mixed.model_size_mb(net, 4, conv_only=True) == pytest.approx((72 * 8 + 3 * 576 * 4) / 8 / 1e6)


def test_greedy_meets_budget_and_spends_it():
    m = models.build("resnet")
    budget = mixed.model_size_mb(m, 4)
    alloc = mixed.allocate_greedy(m, [3, 4, 5, 6], budget)
    size = mixed.model_size_mb(m, alloc)
    assert size <= budget + 1e-12
    assert size > mixed.model_size_mb(m, 3)
    assert len(set(alloc.values())) > 1


def test_bit_picker_data_sizes():
    net = Net()
    d = widgets.bit_picker_data(net, [3, 5], eps2=1e-3)
    assert d["bits"] == mixed.allocate_bits(net, [3, 5], eps2=1e-3)
    assert d["size_mb"] == pytest.approx(mixed.model_size_mb(net, d["bits"]))
    assert d["uniform_mb"] == {3: pytest.approx(mixed.model_size_mb(net, 3)),
                               5: pytest.approx(mixed.model_size_mb(net, 5))}
    assert list(d["lengths"]) == ["first", "rich", "poor", "mid", "last"]
    with pytest.raises(ValueError, match="empty"):
        widgets.bit_picker_data(net, [], eps2=1e-3)


def test_allocate_to_size_spends_the_budget_and_refuses_an_impossible_one():
    m = models.build("resnet")
    target = mixed.model_size_mb(m, 4)
    r = mixed.allocate_to_size(m, target, widths=(2, 3, 4, 5, 6))
    assert r["size_mb"] <= target + 1e-12 and r["size_mb"] == pytest.approx(mixed.model_size_mb(m, r["bits"]))
    assert r["bits"] == mixed.allocate_bits(m, r["bitlist"], r["eps2"])
    assert r["tried"] == 6 * 10  # ε² grid × contiguous lists of at least two of five widths
    looser = mixed.allocate_to_size(m, mixed.model_size_mb(m, 5), widths=(2, 3, 4, 5, 6))
    assert looser["size_mb"] >= r["size_mb"], "a larger budget never buys a smaller model"
    with pytest.raises(ValueError, match="smallest is"):
        mixed.allocate_to_size(m, 1e-6)
    with pytest.raises(ValueError, match="two widths"):
        mixed.allocate_to_size(m, target, widths=(4,))


def _tiny_picker():
    """A small conv net (random weights) and a residual predictor with everything predict() needs."""
    from qlib import models, predictor, tokens

    torch.manual_seed(0)
    # small enough that a quantization takes milliseconds: three convolutions and a classifier
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    probe, labels = torch.randn(24, 1, 28, 28), torch.randint(0, 10, (24,))
    ranges = tokens.float_ranges(model, probe)
    enc = predictor.AccuracyPredictor(token_dim=2 * 8, d_model=8, heads=2, layers=1)
    enc.residual.fill_(1)
    fl = tokens.histogram_pass(model, probe, 8, ranges, labels=labels)
    trained = {"model": enc, "probe": probe, "probe_labels": labels, "bins": 8, "ranges": ranges,
               "float_acc": 50.0, "float_probe_acc": fl["acc"]}
    test_set = torch.utils.data.TensorDataset(torch.randn(40, 1, 28, 28), torch.randint(0, 10, (40,)))
    return model, trained, widgets.picker_context(model, trained, torch.randn(32, 1, 28, 28), test_set)


def test_allocation_estimate_is_the_predictor_on_the_nearest_quantized_allocation():
    from qlib import models, predictor, tokens

    model, trained, ctx = _tiny_picker()
    d = widgets.allocation_estimate(ctx, [3, 5], 1e-3, a_bits=8)
    assert d["bits"] == mixed.allocate_bits(model, [3, 5], 1e-3)
    assert d["size_mb"] == pytest.approx(mixed.model_size_mb(model, d["bits"]))
    assert d["estimate"] == pytest.approx(predictor.predict(trained, d["qmodel"]), abs=1e-4)
    q_probe = tokens.histogram_pass(d["qmodel"], trained["probe"], 8, trained["ranges"], labels=trained["probe_labels"])
    assert d["paired"] == pytest.approx(50.0 + q_probe["acc"] - trained["float_probe_acc"])
    # no validation errors in this predictor: the ± is the paired interval
    assert d["half_width"] == d["paired_half"] >= 300 / 24 and d["measured"] is None
    layers = [m for m in d["qmodel"].modules() if isinstance(m, quant.QuantLayer)]
    assert {m.w_bits for m in layers} >= {3, 5} and any(m.act is not None and m.act.bits == 8 for m in layers)
    # float activations: no activation quantizer; the frontier keeps what was shown, in order
    d32 = widgets.allocation_estimate(ctx, [3, 5], 1e-3, a_bits=None)
    assert all(m.act is None for m in d32["qmodel"].modules() if isinstance(m, quant.QuantLayer))
    assert ctx["tried"] == []
    widgets.remember(ctx, d), widgets.remember(ctx, d32)
    assert [t["a_bits"] for t in ctx["tried"]] == [8, None] and ctx["tried"][-1] is d32["summary"]
    assert widgets.measure(ctx, d) == pytest.approx(100 * models.evaluate(d["qmodel"], ctx["test_set"]))
    assert "measured" in widgets.picker_readout(d) and "estimated top-1" in widgets.picker_readout(d)
    # with the predictor's validation errors, the ± is their 95th percentile
    trained["val_abs_err"] = np.arange(1, 101, dtype=float)
    ctx2 = widgets.picker_context(model, trained, ctx["calib"], ctx["test_set"])
    assert ctx2["half_width"] == pytest.approx(np.quantile(np.arange(1, 101), 0.95))
    assert widgets.allocation_estimate(ctx2, [4], 1.0, None)["half_width"] == ctx2["half_width"]


def test_the_picker_refuses_a_predictor_of_another_architecture_and_missing_inputs():
    model, trained, ctx = _tiny_picker()
    with pytest.raises(ValueError, match="trained for"):
        widgets.picker_context(models.build("resnet"), trained, ctx["calib"], ctx["test_set"])
    with pytest.raises(ValueError, match="calib"):
        widgets.picker_context(model, trained, None, ctx["test_set"])
    with pytest.raises(ValueError, match="lacks probe"):
        widgets.picker_context(model, {k: v for k, v in trained.items() if k != "probe"}, ctx["calib"], ctx["test_set"])
    with pytest.raises(ValueError, match="a_bits must be one of"):
        widgets.bit_picker(model, (3, 4), a_bits=5)


def test_paired_interval_from_the_disagreements():
    f = torch.ones(100, dtype=torch.bool)
    f[:5] = False
    q = f.clone()
    q[:5], q[5:10] = True, False   # ten disagreements, five each way: d = ±1 on 10 of 100 images
    # by hand: std of d = sqrt(10/99) = 0.31782; 1.96 × 0.31782 / √100 × 100 points = 6.229
    assert widgets.paired_interval(q, f) == pytest.approx(6.229, abs=1e-3)
    assert widgets.paired_interval(f, f) == pytest.approx(3.0)   # none: the rule of three, 300/n
    one = f.clone()
    one[0] = True   # one disagreement: 1.96 standard errors = 1.96 points, below the floor
    assert widgets.paired_interval(one, f) == pytest.approx(3.0)
    assert widgets.paired_interval(q, f, z=1.0) < widgets.paired_interval(q, f)


def test_fast_toggling_runs_one_update_for_the_last_change():
    import threading
    import time

    calls, done = [], threading.Event()

    def work(gen):
        calls.append((gen, current(gen)))
        done.set()
    trigger, current = widgets.debounced(work, 0.2)
    for _ in range(5):   # five toggles inside the debounce window
        trigger()
    assert done.wait(5)
    time.sleep(0.3)
    assert calls == [(5, True)], calls
    trigger()
    assert not current(5)   # a result computed for generation 5 is stale now


def test_the_picker_draws_its_first_picture_at_once():
    model, trained, ctx = _tiny_picker()
    box = widgets.bit_picker(model, (3, 4), 1e-3, trained=trained, calib=ctx["calib"], test_set=ctx["test_set"])
    out, readout = box.children[-2], box.children[-1]
    assert any("image/png" in o["data"] for o in out.outputs) and "estimated top-1" in readout.value
