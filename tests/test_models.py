import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from qlib import cache, models

# Parameter counts pin the architectures: a change to a model changes every cached result.
EXPECTED_PARAMS = {"resnet": 44226, "mobilenetv2": 80586, "vgg": 147162}


@pytest.mark.parametrize("arch", models.ARCHS)
def test_forward_shape_and_param_count(arch):
    m = models.build(arch).eval()
    out = m(torch.randn(5, 1, 28, 28))
    assert out.shape == (5, 10)
    assert models.count_params(m) == EXPECTED_PARAMS[arch]


def test_families_have_their_defining_layers():
    from torchvision.models.mobilenetv2 import InvertedResidual
    from torchvision.models.resnet import BasicBlock

    r, mb, v = (models.build(a) for a in models.ARCHS)
    blocks = [m for m in r.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 6 and sum(b.downsample is not None for b in blocks) == 2
    assert all(b.downsample[0].kernel_size == (1, 1) for b in blocks if b.downsample is not None)
    inv = [m for m in mb.modules() if isinstance(m, InvertedResidual)]
    depthwise = [m for m in mb.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    assert len(inv) == 6 and len(depthwise) == len(inv)
    assert any(isinstance(m, nn.BatchNorm2d) for m in v.modules())
    assert not any(isinstance(m, (BasicBlock, InvertedResidual)) for m in v.modules())


def test_other_input_sizes_and_unknown_arch():
    assert models.build("vgg", in_channels=3, image_size=32)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert models.build("resnet", in_channels=3)(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown architecture"):
        models.build("alexnet")


def test_layer_table_counts_every_weight():
    m = models.build("resnet")
    rows = models.layer_table(m)
    assert rows[0]["layer"] == "conv1" and rows[-1]["layer"] == "fc"
    weights = sum(p.numel() for n, p in m.named_parameters() if n.endswith("weight") and p.dim() > 1)
    fc_bias = m.fc.bias.numel()
    assert sum(r["params"] for r in rows) == weights + fc_bias
    assert rows[0]["MACs"] == 28 * 28 * 8 * 9  # 8 output maps of 28×28, 3×3×1 taps each


def test_evaluate_counts_correct():
    class Fixed(nn.Module):  # always predicts class 3
        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((len(x),), 3), 10).float()

    y = torch.tensor([3, 3, 1, 3, 0])
    ds = TensorDataset(torch.zeros(5, 1, 28, 28), y)
    assert models.evaluate(Fixed(), ds, batch_size=2, device="cpu") == pytest.approx(3 / 5)


def test_train_learns_a_separable_toy_problem():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (512,), generator=g)
    # unit-variance noise, so BatchNorm's running statistics (initialised at 0 and 1)
    # settle within the few steps of this test; the label is written on the diagonal
    x = torch.randn(512, 1, 28, 28, generator=g)
    x[torch.arange(512), 0, 2 * y, 2 * y] += 6.0
    ds = TensorDataset(x, y)
    m = models.build("vgg")
    hist = models.train(m, ds, ds, epochs=4, batch_size=64, lr=0.05, device="cpu")
    assert hist["train_loss"][-1] < hist["train_loss"][0]
    assert hist["val_acc"][-1] > 0.9


def test_pretrained_trains_once_then_loads(tmp_cache, monkeypatch):
    import dataclasses

    from qlib import profiles

    quick = profiles.get("quick")
    tiny = dataclasses.replace(quick, name="tiny", train=dataclasses.replace(quick.train, epochs=1))
    monkeypatch.setitem(profiles.PROFILES, "tiny", tiny)
    n = 256
    small = TensorDataset(torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,)))
    monkeypatch.setattr("qlib.data.load", lambda name, split, root=None: small)
    calls = []
    real_train = models.train
    monkeypatch.setattr(models, "train", lambda *a, **k: calls.append(1) or real_train(*a, **k))

    m1, info1 = models.pretrained("vgg", "tiny", return_info=True, device="cpu")
    m2, info2 = models.pretrained("vgg", "tiny", return_info=True, device="cpu")
    assert len(calls) == 1 and not info1["from_cache"] and info2["from_cache"]
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert info2["history"] == info1["history"]
    assert len(list((tmp_cache / "models").glob("*.pt"))) == 1


def test_cache_key_changes_with_settings():
    a = {"arch": "vgg", "train": {"epochs": 3}}
    b = {"arch": "vgg", "train": {"epochs": 4}}
    assert cache.key(a) == cache.key(dict(reversed(list(a.items()))))
    assert cache.key(a) != cache.key(b)
