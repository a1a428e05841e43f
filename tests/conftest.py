
import pytest
import torch

# Keep unit tests off the real cache; the notebook tests use the real one on purpose.
@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLIB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def randomise_bn_stats(model):
    """Give every BatchNorm2d non-trivial running statistics and affine parameters, so that
    folding them is a real test; returns the model in eval mode."""
    import torch.nn as nn

    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def randomise_bn():
    return randomise_bn_stats


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
