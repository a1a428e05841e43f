import gzip
import shutil
import struct

import pytest
import torch

from qlib import data


@pytest.fixture(scope="module")
def test_split():
    return data.load("fashion-mnist", "test")


def test_fashion_mnist_shapes_dtypes(test_split):
    x, y = test_split.tensors
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert set(y.unique().tolist()) == set(range(10))
    assert torch.bincount(y).tolist() == [1000] * 10  # the test split is balanced


def test_train_split_is_standardised():
    x, y = data.load("fashion-mnist", "train").tensors
    assert x.shape == (55000, 1, 28, 28)
    # normalised with the training images' mean/std (published values): ~zero mean, unit std
    assert abs(x.mean().item()) < 1e-3
    assert abs(x.std().item() - 1.0) < 1e-2
    lo = (0 - data.FASHION_MNIST_MEAN[0]) / data.FASHION_MNIST_STD[0]
    hi = (1 - data.FASHION_MNIST_MEAN[0]) / data.FASHION_MNIST_STD[0]
    assert x.min().item() == pytest.approx(lo, abs=1e-5)
    assert x.max().item() == pytest.approx(hi, abs=1e-5)


def test_validation_split_is_held_out_of_training():
    """train and val partition the published 60,000 training images; val is fixed."""
    tr, va = data.load("fashion-mnist", "train"), data.load("fashion-mnist", "val")
    assert len(va.tensors[0]) == data.VAL_SIZE and len(tr.tensors[0]) + data.VAL_SIZE == 60000
    idx = data.val_indices(60000)
    assert torch.equal(idx, data.val_indices(60000)) and len(idx.unique()) == data.VAL_SIZE
    # no validation image appears in the training split (compare by exact pixels)
    train_rows = {r.numpy().tobytes() for r in tr.tensors[0].flatten(1)}
    dup = sum(r.numpy().tobytes() in train_rows for r in va.tensors[0].flatten(1))
    assert dup == 0, f"{dup} validation images also in train"
    assert set(va.tensors[1].unique().tolist()) == set(range(10))


def test_load_is_memoised(test_split):
    assert data.load("fashion-mnist", "test") is test_split


def test_calibration_set_fixed_and_seeded(test_split):
    a = data.calibration_set(test_split, n=64, seed=0)
    b = data.calibration_set(test_split, n=64, seed=0)
    c = data.calibration_set(test_split, n=64, seed=1)
    assert a.shape == (64, 1, 28, 28)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # each row is one of the dataset's images
    flat = test_split.tensors[0].flatten(1)
    assert all((flat == row).all(1).any() for row in a.flatten(1)[:8])
    with pytest.raises(ValueError, match="calibration size"):
        data.calibration_set(test_split, n=0)


def test_unknown_names():
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load("imagenet", "train")
    with pytest.raises(ValueError, match="unknown split"):
        data.load("fashion-mnist", "validation")


def _copy_files(dst):
    src = data.find_fashion_mnist()
    for f in src.glob("*.gz"):
        shutil.copy(f, dst / f.name)


def test_truncated_gzip_names_file_and_fix(tmp_path):
    _copy_files(tmp_path)
    f = tmp_path / "t10k-images-idx3-ubyte.gz"
    blob = f.read_bytes()
    f.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(data.DataError) as e:
        data.load("fashion-mnist", "test", root=tmp_path)
    msg = str(e.value)
    assert str(f) in msg and "apt-get install -y dataset-fashion-mnist" in msg


def test_wrong_item_count_is_corrupt(tmp_path):
    _copy_files(tmp_path)
    f = tmp_path / "t10k-labels-idx1-ubyte.gz"
    with gzip.open(f, "wb") as g:  # a well-formed IDX header that promises 5 labels
        g.write(struct.pack(">HBBI", 0, 8, 1, 5) + bytes(5))
    with pytest.raises(data.DataError, match="holds 5 items, expected 10000"):
        data.load("fashion-mnist", "test", root=tmp_path)


def test_missing_files_list_where_it_looked(tmp_path):
    with pytest.raises(data.DataError) as e:
        data.load("fashion-mnist", "test", root=tmp_path / "nowhere")
    assert "nowhere" in str(e.value) and "dataset-fashion-mnist" in str(e.value)


def test_cifar10_missing_gives_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="CIFAR-10 not found"):
        data.load("cifar10", "test", root=tmp_path)
