"""Size of a quantized model as an artefact: bytes of tensor state held by the modules, of
its state_dict, and of the file ``quant.save`` writes, against the float model's parameters.

    python benchmarks/artefact_size.py            # W4, nearest rounding, the book's three models

Prints a table; it is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from qlib import models, quant


def tensor_bytes(model: torch.nn.Module) -> int:
    """Every distinct tensor a module holds: parameters, buffers and plain tensor attributes."""
    seen, total = set(), 0
    for mod in model.modules():
        for v in [*vars(mod).values(), *mod._parameters.values(), *mod._buffers.values()]:
            if isinstance(v, torch.Tensor) and id(v) not in seen:
                seen.add(id(v))
                total += v.numel() * v.element_size()
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--w-bits", type=int, default=4)
    args = p.parse_args()
    calib = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    print(f"W{args.w_bits}A32, nearest rounding; kB = 1000 bytes")
    print(f"{'model':12s} {'float params':>12s} {'held':>8s} {'state_dict':>10s} {'file':>8s}")
    for arch in models.ARCHS:
        m = models.build(arch).eval()
        q = quant.quantize(m, calib, w_bits=args.w_bits, rounding="nearest", progress=False)
        sd = sum(v.numel() * v.element_size() for v in q.state_dict().values() if isinstance(v, torch.Tensor))
        with tempfile.TemporaryDirectory() as d:
            size = quant.save(q, Path(d) / "q.pt").stat().st_size
        print(f"{arch:12s} {4 * models.count_params(m) / 1e3:12.1f} {tensor_bytes(q) / 1e3:8.1f} "
              f"{sd / 1e3:10.1f} {size / 1e3:8.1f}")


if __name__ == "__main__":
    main()
