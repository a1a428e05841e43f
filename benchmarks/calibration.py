"""Calibration benchmark: wall time, iterations per second and peak memory of
``quantize(..., rounding="attention")`` at the paper's settings (1,024 images, batch 64,
2,000 Adam steps per module), for the book's three models and torchvision's resnet18 at
224×224 (random weights and images: the timing does not need ImageNet).

    python benchmarks/calibration.py                 # all models, paper settings
    python benchmarks/calibration.py --iters 50      # fewer steps per module (it/s is per step)
    python benchmarks/calibration.py --models resnet --iters 100 --profile   # where time goes

Prints a table; it is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import contextlib
import resource
import time

import torch

from qlib import data, models, quant


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def profiler(on: bool, dev: torch.device):
    if not on:
        return contextlib.nullcontext()
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=acts)


def case(name: str):
    if name == "resnet18-224":
        import torchvision

        g = torch.Generator().manual_seed(0)
        return torchvision.models.resnet18(weights=None).eval(), lambda n: torch.randn(n, 3, 224, 224, generator=g)
    model = models.build(name).eval()  # random weights time the same as trained ones
    train = data.load("fashion-mnist", "train")
    return model, lambda n: data.calibration_set(train, n=n, seed=0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["resnet", "mobilenetv2", "vgg", "resnet18-224"])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--a-bits", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--profile", action="store_true",
                   help="run under torch.profiler and print the 25 most expensive operators")
    args = p.parse_args()
    dev = models.resolve_device(args.device)
    print(f"device: {models.describe_device(dev)}"
          f"; torch {torch.__version__}; images {args.images}, batch {args.batch_size}, "
          f"{args.iters} iters/module, W4A{args.a_bits or 32}")
    print(f"{'model':14s} {'modules':>7s} {'wall s':>9s} {'it/s':>8s} {'s/module':>9s} {'peak MB':>9s}")
    for name in args.models:
        model, make = case(name)
        calib = make(args.images)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        with profiler(args.profile, dev) as prof:
            q = quant.quantize(model, calib, w_bits=4, a_bits=args.a_bits, rounding="attention",
                               iters=args.iters, batch_size=args.batch_size, device=dev, progress=False)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
        wall = time.perf_counter() - t0
        n_units = len(q.quant_report["losses"])
        steps = n_units * args.iters
        print(f"{name:14s} {n_units:7d} {wall:9.1f} {steps / wall:8.1f} {wall / n_units:9.2f} "
              f"{peak_memory_mb(dev):9.0f}", flush=True)
        if prof is not None:
            key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=key, row_limit=25), flush=True)


if __name__ == "__main__":
    main()
