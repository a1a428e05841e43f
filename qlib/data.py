"""Datasets as in-memory tensors: Fashion-MNIST (default) and CIFAR-10.

Fashion-MNIST is read straight from the IDX files (gzip) that Debian's package
``dataset-fashion-mnist`` installs in ``/usr/share/datasets/fashion-mnist``; nothing
here touches the network unless you ask for :func:`download`. Whole splits fit in memory
(60,000 × 28 × 28 floats is 188 MB), so the models train from tensors without a DataLoader.

Three disjoint splits: ``train`` (the published training images minus a held-out set;
float training and calibration images), ``val`` (:data:`VAL_SIZE` training images, fixed
by :data:`VAL_SEED`, never seen by float training: every hyperparameter the book selects
is selected on it) and ``test`` (the published test images: reported numbers only).
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from qlib.cache import cache_dir

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
# Per-channel statistics of the published training images (all 60,000 / 50,000), used to
# normalise every split alike. The 55,000 Fashion-MNIST images left after the validation
# hold-out give 0.2859 and 0.3529: the constants shift the inputs by 0.0003 of a standard
# deviation, and keep the usual published values.
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FIX_HINT = (
    "Install the data with `sudo apt-get install -y dataset-fashion-mnist` (Debian/Ubuntu), "
    "or run `python -m qlib.data --download` on a machine with internet access, "
    "or point QLIB_DATA at a folder holding the four Fashion-MNIST .gz files."
)
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}


SPLITS = ("train", "val", "test")
#: Training images held out of float training for selecting hyperparameters.
VAL_SIZE = 5000
#: Which ones: a fixed random draw, the same on every machine.
VAL_SEED = 0


class DataError(RuntimeError):
    """The data files are missing, truncated or corrupt; the message says how to fix it."""


def _download_dir() -> Path:
    return cache_dir() / "data"


def _candidate_dirs(root: str | os.PathLike | None) -> list[Path]:
    if root is not None:
        return [Path(root)]
    dirs = []
    if os.environ.get("QLIB_DATA"):
        dirs.append(Path(os.environ["QLIB_DATA"]))
    dirs += [DEBIAN_DIR, _download_dir() / "FashionMNIST" / "raw"]
    return dirs


def find_fashion_mnist(root: str | os.PathLike | None = None) -> Path:
    """The first folder holding all four Fashion-MNIST files: ``root``, else $QLIB_DATA,
    else the Debian package's folder, else the folder :func:`download` writes to."""
    names = [n for img, lab, _ in _FILES.values() for n in (img, lab)]
    tried = _candidate_dirs(root)
    for d in tried:
        if all((d / n).is_file() for n in names):
            return d
    raise DataError(
        "Fashion-MNIST files not found; looked for " + ", ".join(names) + " in: "
        + ", ".join(str(d) for d in tried) + ". " + FIX_HINT
    )


def read_idx(path: Path, expected_dims: int, expected_count: int) -> torch.Tensor:
    """Parse one gzip-compressed IDX file (the MNIST format) into a uint8 tensor."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise DataError(f"{path} does not exist. {FIX_HINT}") from e
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{path} is truncated or not a gzip file ({e}). {FIX_HINT}") from e
    header = 4 + 4 * expected_dims
    if len(raw) < header:
        raise DataError(f"{path} is too short to be an IDX file ({len(raw)} bytes). {FIX_HINT}")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        raise DataError(
            f"{path} has a bad IDX header (dtype 0x{dtype_code:02x}, {ndim} dims; expected "
            f"unsigned bytes with {expected_dims} dims). {FIX_HINT}"
        )
    shape = struct.unpack(">" + "I" * ndim, raw[4:header])
    if shape[0] != expected_count:
        raise DataError(f"{path} holds {shape[0]} items, expected {expected_count}. {FIX_HINT}")
    n = 1
    for d in shape:
        n *= d
    if len(raw) - header != n:
        raise DataError(
            f"{path} holds {len(raw) - header} bytes of data, its header promises {n}. {FIX_HINT}"
        )
    return torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8).reshape(shape)


def normalise(images_uint8: torch.Tensor, mean: tuple, std: tuple) -> torch.Tensor:
    """uint8 N×C×H×W → float32, scaled to [0, 1] then standardised per channel."""
    x = images_uint8.float().div_(255.0)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x - m) / s


def _fashion_mnist(split: str, root) -> TensorDataset:
    img_name, lab_name, count = _FILES[split]
    d = find_fashion_mnist(root)
    images = read_idx(d / img_name, 3, count)
    labels = read_idx(d / lab_name, 1, count)
    if int(labels.max()) > 9:
        raise DataError(f"{d / lab_name} has labels outside 0..9; the file is corrupt. {FIX_HINT}")
    x = normalise(images.unsqueeze(1), FASHION_MNIST_MEAN, FASHION_MNIST_STD)
    return TensorDataset(x, labels.long())


def _cifar10(split: str, root) -> TensorDataset:
    import numpy as np
    from torchvision.datasets import CIFAR10

    root = Path(root) if root is not None else _download_dir()
    try:
        ds = CIFAR10(str(root), train=(split == "train"), download=False)
    except RuntimeError as e:
        raise DataError(
            f"CIFAR-10 not found or corrupt under {root} ({e}). Download it once with "
            f"`python -c \"from torchvision.datasets import CIFAR10; CIFAR10('{root}', download=True)\"`."
        ) from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2)
    x = normalise(images, CIFAR10_MEAN, CIFAR10_STD)
    return TensorDataset(x, torch.tensor(ds.targets, dtype=torch.long))


_LOADERS = {"fashion-mnist": _fashion_mnist, "cifar10": _cifar10}
_memo: dict = {}


def val_indices(n_train: int, size: int = VAL_SIZE, seed: int = VAL_SEED) -> torch.Tensor:
    """Indices (sorted) of the published training images that form the validation split."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=g)[:size].sort().values


def load(name: str = "fashion-mnist", split: str = "train", root=None) -> TensorDataset:
    """One split as a ``TensorDataset(images, labels)``: images float32 N×C×H×W, normalised
    with the training images' per-channel mean and std; labels int64 in 0..9.

    ``name`` is ``"fashion-mnist"`` (28×28×1) or ``"cifar10"`` (32×32×3, via torchvision).
    ``split`` is ``"train"`` (55,000 Fashion-MNIST images), ``"val"`` (5,000 held out of the
    published training set; disjoint from ``train``) or ``"test"`` (10,000).
    Results are memoised per process, so chapters can call this freely."""
    if name not in _LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(_LOADERS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(map(repr, SPLITS))}")
    key = (name, split, str(root))
    if key not in _memo:
        if split == "test":
            _memo[key] = _LOADERS[name]("test", root)
        else:  # one read of the published training images gives both train and val
            x, y = _LOADERS[name]("train", root).tensors
            held = torch.zeros(len(y), dtype=torch.bool)
            held[val_indices(len(y))] = True
            _memo[(name, "val", str(root))] = TensorDataset(x[held], y[held])
            _memo[(name, "train", str(root))] = TensorDataset(x[~held], y[~held])
    return _memo[key]


def classes(name: str = "fashion-mnist") -> tuple[str, ...]:
    """Class names of a dataset, indexed by label."""
    return {"fashion-mnist": FASHION_MNIST_CLASSES, "cifar10": CIFAR10_CLASSES}[name]


def subset(dataset: TensorDataset, n: int | None, seed: int = 0) -> TensorDataset:
    """A fixed random subset of ``n`` examples with their labels (``None``: ``dataset``
    itself), the same for the same ``seed``: how a scaled profile shrinks the training and
    test sets (qlib.profiles.scaled)."""
    if n is None:
        return dataset
    size = len(dataset.tensors[0])
    if not 0 < n <= size:
        raise ValueError(f"subset size n={n} must be in 1..{size} (the dataset size), or None for all of it")
    idx = torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:n]
    return TensorDataset(*(t[idx] for t in dataset.tensors))


def calibration_set(dataset: TensorDataset, n: int = 1024, seed: int = 0) -> torch.Tensor:
    """A fixed random subset of ``n`` images (no labels: PTQ calibration is label-free),
    the same for the same ``seed``."""
    images = dataset.tensors[0]
    if not 0 < n <= len(images):
        raise ValueError(f"calibration size n={n} must be in 1..{len(images)} (the dataset size)")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[:n]
    return images[idx].clone()


def download(root=None) -> Path:
    """Fetch Fashion-MNIST with torchvision (needs internet) for machines without the
    Debian package; :func:`load` finds it there afterwards."""
    from torchvision.datasets import FashionMNIST

    root = Path(root) if root is not None else _download_dir()
    FashionMNIST(str(root), train=True, download=True)
    FashionMNIST(str(root), train=False, download=True)
    return root / "FashionMNIST" / "raw"


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Check or fetch the Fashion-MNIST files.")
    p.add_argument("--download", action="store_true", help="download with torchvision if missing")
    args = p.parse_args()
    try:
        print("Fashion-MNIST found in", find_fashion_mnist())
    except DataError:
        if not args.download:
            raise
        print("Fashion-MNIST downloaded to", download())
