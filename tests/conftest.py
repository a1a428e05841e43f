import os

import pytest
import torch

# Keep unit tests off the real cache; the notebook tests use the real one on purpose.
@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLIB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
