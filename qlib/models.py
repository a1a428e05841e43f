"""The book's three model families, sized for 28×28 inputs, and how they are trained.

* ``resnet``: a CIFAR-style ResNet (3 stages of torchvision ``BasicBlock`` modules, 1×1 conv
  downsample shortcuts), the counterpart of the paper's ResNet-18/50.
* ``mobilenetv2``: torchvision's ``MobileNetV2`` class (inverted residuals, depthwise
  convs) with a short block list, a 1-channel stride-1 stem and a narrower last conv.
* ``vgg``: plain 3×3 conv + BatchNorm + ReLU units with max-pooling (VGG-style).

Module names follow torchvision (``conv1``, ``layer1.0``, ``features.3``, ``fc``), so the
quantization code treats our models and torchvision's alike.
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import TensorDataset
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import Conv2dNormActivation
from tqdm.auto import tqdm

from qlib import cache, data, parallel, profiles, record
from qlib.hooks import forward_hooks

ARCHS = ("resnet", "mobilenetv2", "vgg")
# How tables and figures name architectures and methods.
DISPLAY_NAMES = {"resnet": "ResNet", "mobilenetv2": "MobileNetV2", "vgg": "VGG",
                 "nearest": "Nearest", "adaround": "AdaRound", "attention": "Attention Round"}


def display_name(key: str) -> str:
    """"ResNet" for "resnet", "Attention Round" for "attention"; anything else unchanged."""
    return DISPLAY_NAMES.get(key, key)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem, three stages of BasicBlocks (stride 1, 2, 2)."""

    def __init__(self, widths=(8, 16, 32), blocks=(2, 2, 2), in_channels=1, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        stages, c_in = [], widths[0]
        for i, (c, n) in enumerate(zip(widths, blocks)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                down = None
                if stride != 1 or c_in != c:
                    down = nn.Sequential(nn.Conv2d(c_in, c, 1, stride=stride, bias=False), nn.BatchNorm2d(c))
                layers.append(BasicBlock(c_in, c, stride=stride, downsample=down))
                c_in = c
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class VGG(nn.Module):
    """Plain conv units (3×3 conv, BatchNorm, ReLU) with max-pooling, then two linear layers."""

    def __init__(self, cfg=(16, 16, "M", 32, 32, "M", 64, 64, "M"), in_channels=1,
                 num_classes=10, image_size=28, hidden=128):
        super().__init__()
        layers, c_in, size = [], in_channels, image_size
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [nn.Conv2d(c_in, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c_in = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c_in * size * size, hidden), nn.ReLU(inplace=True),
            nn.Dropout(0.3), nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        return self.classifier(self.features(x))


# t (expansion), c (channels), n (blocks), s (stride of the first block)
MOBILENETV2_SETTING = [[1, 16, 1, 1], [6, 24, 2, 2], [6, 32, 2, 1], [6, 64, 1, 1]]


def mobilenetv2(in_channels=1, num_classes=10, last_channel=256) -> MobileNetV2:
    """torchvision's MobileNetV2 with a 1-channel stem (stride 2: 28×28 → 14×14, then one
    stride-2 stage leaves 7×7 maps) and a 256-wide last 1×1 conv instead of 1280."""
    model = MobileNetV2(num_classes=num_classes, inverted_residual_setting=MOBILENETV2_SETTING)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(in_channels, stem.out_channels, 3, stride=2, padding=1, bias=False)
    c = model.features[-1][0].in_channels
    model.features[-1] = Conv2dNormActivation(c, last_channel, kernel_size=1, activation_layer=nn.ReLU6)
    model.last_channel = last_channel
    model.classifier[-1] = nn.Linear(last_channel, num_classes)
    for m in (model.features[0][0], model.features[-1][0]):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
    nn.init.normal_(model.classifier[-1].weight, 0, 0.01)
    nn.init.zeros_(model.classifier[-1].bias)
    return model


def build(arch: str, in_channels: int = 1, num_classes: int = 10, image_size: int = 28) -> nn.Module:
    """A freshly initialised model of one of the three families (see the module docstring)."""
    if arch == "resnet":
        return ResNet(in_channels=in_channels, num_classes=num_classes)
    if arch == "mobilenetv2":
        return mobilenetv2(in_channels=in_channels, num_classes=num_classes)
    if arch == "vgg":
        return VGG(in_channels=in_channels, num_classes=num_classes, image_size=image_size)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")


def count_params(model: nn.Module) -> int:
    """The number of parameters (weights, biases, BatchNorm affines)."""
    return sum(p.numel() for p in model.parameters())


def layer_table(model: nn.Module, input_shape=(1, 1, 28, 28)) -> list[dict]:
    """One row per conv/linear layer: name, type, weight shape, params, output shape and
    multiply-accumulates for one input."""
    rows = []

    def hook(name):
        def f(mod, inp, out):
            w = mod.weight
            per_output = w[0].numel()
            macs = out[0].numel() * per_output if isinstance(mod, nn.Conv2d) else w.numel()
            kind = "Linear" if isinstance(mod, nn.Linear) else (
                "Conv2d (depthwise)" if mod.groups > 1 and mod.groups == mod.in_channels else "Conv2d")
            rows.append({"layer": name, "type": kind, "weight shape": tuple(w.shape),
                         "params": sum(p.numel() for p in mod.parameters(recurse=False)),
                         "output shape": tuple(out.shape[1:]), "MACs": int(macs)})
        return f

    layers = [(m, hook(name)) for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with forward_hooks(layers), torch.no_grad():
            model(torch.zeros(input_shape))
    finally:
        model.train(was_training)
    return rows


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` is CUDA when available, else the CPU; anything else as torch reads it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def describe_device(device: str | torch.device = "auto") -> str:
    """"NVIDIA H100 80GB HBM3" or "CPU, 2 threads": what a result was measured on."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    n = torch.get_num_threads()
    return f"CPU, {n} thread{'s' if n != 1 else ''}"


@torch.no_grad()
def evaluate(model: nn.Module, dataset: TensorDataset, batch_size: int = 250,
             device: str | torch.device = "auto") -> float:
    """Top-1 accuracy of ``model`` on ``dataset``, a number in [0, 1]. Batches of 250 keep
    each activation map in the CPU's cache: 3× faster than 1,000 for the quantized
    MobileNetV2, whose expanded maps are large."""
    dev = resolve_device(device)
    images, labels = dataset.tensors
    was_training = model.training
    # channels-last lets oneDNN's convolutions skip a layout change per layer: 1.5–2× faster
    # on the CPU; the model is put back in the layout it came in
    fmt = torch.channels_last if images.dim() == 4 else torch.contiguous_format
    w4 = next((p for p in model.parameters() if p.dim() == 4), None)
    was_cl = w4 is not None and not w4.is_contiguous() and w4.is_contiguous(memory_format=torch.channels_last)
    model.eval().to(dev, memory_format=fmt)
    correct = 0
    try:
        for i in range(0, len(images), batch_size):
            logits = model(images[i:i + batch_size].to(dev).contiguous(memory_format=fmt))
            correct += (logits.argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    finally:
        model.train(was_training).to(memory_format=torch.channels_last if was_cl else torch.contiguous_format)
    return correct / len(images)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random shift of up to 2 pixels (pad + crop), on a batch."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=g) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    dx, dy = torch.randint(0, 5, (2,), generator=g).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]


def train(model: nn.Module, train_set: TensorDataset, val_set: TensorDataset | None = None, *,
          epochs: int, batch_size: int = 128, lr: float = 0.1, momentum: float = 0.9,
          weight_decay: float = 5e-4, augment: bool = False, seed: int = 0,
          device: str | torch.device = "auto", desc: str = "train") -> dict:
    """Train in place with SGD (Nesterov momentum) and a one-cycle learning rate; the batch
    order, initialisation-independent randomness and augmentation all follow ``seed``.

    Returns a history dict: per-epoch ``train_loss``, ``train_acc``, ``val_acc`` (if a
    validation set is given; the test set has no place here) and the total ``seconds``."""
    if epochs < 1:
        raise ValueError(f"epochs must be ≥ 1, got {epochs}")
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(seed)
    images, labels = train_set.tensors
    steps_per_epoch = math.ceil(len(images) / batch_size)
    # channels_last makes the CPU convolutions ~25% faster (measured on 2 cores)
    model.to(dev, memory_format=torch.channels_last).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=True,
                          weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs,
                                                steps_per_epoch=steps_per_epoch, pct_start=0.25)
    hist = {"train_loss": [], "train_acc": [], "val_acc": []}
    start = time.perf_counter()
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, unit="batch", mininterval=2.0)
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=g)
        loss_sum, correct = 0.0, 0
        for i in range(steps_per_epoch):
            idx = order[i * batch_size:(i + 1) * batch_size]
            x, y = images[idx], labels[idx]
            if augment:
                x = _augment(x, g)
            x = x.to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(dev, non_blocking=True)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            bar.update()
        hist["train_loss"].append(loss_sum / len(images))
        hist["train_acc"].append(correct / len(images))
        if val_set is not None:
            hist["val_acc"].append(evaluate(model, val_set, device=dev))
            model.train()
        bar.set_postfix(loss=f"{hist['train_loss'][-1]:.3f}",
                        val=f"{hist['val_acc'][-1]:.4f}" if hist["val_acc"] else "-")
    bar.close()
    hist["seconds"] = time.perf_counter() - start
    model.eval()
    return hist


def _spec(arch: str, profile: str, dataset: str) -> dict:
    return {"arch": arch, "dataset": dataset, "profile": profile,
            "val_holdout": {"size": data.VAL_SIZE, "seed": data.VAL_SEED},
            "train": profiles.get(profile).train.as_dict(), "model_repr": repr(build(arch))}


def pretrained_path(arch: str, profile: str = "quick", dataset: str = "fashion-mnist") -> Path:
    """Where :func:`pretrained` caches the trained float model (it may not exist yet)."""
    return cache.path_for("models", _spec(arch, profile, dataset))


def available(arch: str, profile: str = "quick", dataset: str = "fashion-mnist") -> bool:
    """Whether :func:`pretrained` would load ``arch`` (shipped or cached) rather than train it."""
    spec = _spec(arch, profile, dataset)
    return record.float_checkpoint(arch, profile, cache.key(spec)) is not None or pretrained_path(
        arch, profile, dataset).is_file()


def pretrained(arch: str, profile: str = "quick", dataset: str = "fashion-mnist",
               device: str | torch.device = "auto", return_info: bool = False, shipped: bool = True):
    """The trained float model of ``arch`` for a profile: the checkpoint the profile ships
    with its population record (:mod:`qlib.record`; the quick profile's float models, so
    every machine labels and quantizes the same weights), else trained once with a fixed
    seed and loaded from the cache (key: architecture, data, profile, training settings).
    ``shipped=False`` skips the shipped checkpoint: this machine's own training (chapter 0).

    With ``return_info=True`` also returns the training record: history (per-epoch loss
    and validation accuracy), wall time, device, final validation and test accuracy,
    whether it came from the cache and whether it is the shipped checkpoint."""
    spec = _spec(arch, profile, dataset)
    path = pretrained_path(arch, profile, dataset)
    model = build(arch)
    ckpt = record.float_checkpoint(arch, profile, cache.key(spec)) if shipped else None
    rec = ckpt if ckpt is not None else cache.load(path)
    if rec is not None:
        model.load_state_dict(rec["state_dict"])
        info = dict(rec["info"], from_cache=True, shipped=ckpt is not None)
    else:
        settings = profiles.get(profile).train.as_dict()
        torch.manual_seed(settings["seed"])
        model = build(arch)
        train_set = data.subset(data.load(dataset, "train"), settings.pop("train_images", None))
        val_set = data.load(dataset, "val")
        hist = train(model, train_set, val_set, device=device, desc=f"train {arch}", **settings)
        model.cpu()
        info = {"history": {k: hist[k] for k in ("train_loss", "train_acc", "val_acc")},
                "seconds": hist["seconds"], "device": str(resolve_device(device)),
                "val_acc": hist["val_acc"][-1],
                "test_acc": evaluate(model, data.load(dataset, "test")),
                "threads": torch.get_num_threads()}
        cache.save({"state_dict": model.state_dict(), "info": info, "spec": cache.key(spec)}, path)
        info = dict(info, from_cache=False, shipped=False)
    model.eval()
    return (model, info) if return_info else model


def train_missing(archs, profile: str = "quick", dataset: str = "fashion-mnist") -> list[str]:
    """Train, as :func:`pretrained` with ``shipped=False`` would, every architecture of
    ``archs`` whose float model is not cached yet, and return those. On a CPU they train side
    by side, one forked process and one torch thread each (qlib.parallel): three small models
    at once use two cores ~1.3× better than one after another at two threads. On a GPU one
    after another, in this process."""
    todo = [a for a in archs if not pretrained_path(a, profile, dataset).is_file()]
    if resolve_device("auto").type != "cpu" or len(todo) < 2:
        for a in todo:
            pretrained(a, profile, dataset, shipped=False)
        return todo
    parallel.map_forked([lambda a=a: pretrained(a, profile, dataset, shipped=False, return_info=True)[1]["seconds"]
                         for a in todo], workers=len(todo), desc="training")
    return todo


def checkpoint(arch: str, profile: str = "quick", dataset: str = "fashion-mnist") -> dict:
    """The float model :func:`pretrained` serves, as the record a shipped checkpoint holds:
    ``state_dict``, ``info`` (the training record) and ``spec`` (the training spec's key)."""
    model, info = pretrained(arch, profile, dataset, return_info=True)
    return {"state_dict": model.state_dict(),
            "info": {k: v for k, v in info.items() if k not in ("from_cache", "shipped")},
            "spec": cache.key(_spec(arch, profile, dataset))}
