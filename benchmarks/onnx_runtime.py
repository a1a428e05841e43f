"""ONNX export benchmark: file size and onnxruntime CPU latency of the float model against
its quantized exports (``quant.to_onnx``), for the book's three models (the shipped quick
checkpoints, 28×28) and torchvision's resnet18 at 224×224 (random weights and images: the
timing does not need ImageNet). Quantized with nearest rounding (how the weights were
rounded does not change the graph), activation steps from 256 calibration images.

    python benchmarks/onnx_runtime.py                       # everything, 2 threads
    python benchmarks/onnx_runtime.py --models resnet --threads 1
    python benchmarks/onnx_runtime.py --parity              # also top-1 and agreement on the 10,000 test images

Prints a table; it is a benchmark, not a test.
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from qlib import data, deploy, models, quant

SETTINGS = {"float": None, "W8A8": (8, 8), "W4A8": (4, 8), "W4A32": (4, None)}


def case(name: str):
    """(float model, calibration images, image shape) for a model name."""
    g = torch.Generator().manual_seed(0)
    if name == "resnet18-224":
        import torchvision
        torch.manual_seed(0)
        return torchvision.models.resnet18(weights=None).eval(), torch.randn(32, 3, 224, 224, generator=g), (3, 224, 224)
    calib = data.calibration_set(data.load("fashion-mnist", "train"), 256, seed=0)
    return models.pretrained(name, "quick"), calib, (1, 28, 28)


def fused_ops(path: Path, threads: int) -> str:
    """The integer kernels onnxruntime chose after its graph optimisations (QLinear*, QGemm...)."""
    import onnxruntime as ort
    out = Path(tempfile.mkdtemp()) / "optimized.onnx"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    counts = deploy.node_counts(out)
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()) if k.startswith(("QLinear", "QGemm", "MatMulInteger",
                                                                                    "ConvInteger"))) or "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet", "mobilenetv2", "vgg", "resnet18-224"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--parity", action="store_true", help="top-1 and agreement on the test set (book models)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    test = data.load("fashion-mnist", "test") if args.parity else None
    print(f"onnxruntime CPU, {args.threads} intra-op threads; latency = median of {args.repeats} runs (ms)")
    head = f"{'model':14s}{'setting':8s}{'file MB':>9s}" + "".join(f"{'batch ' + str(b) + ' ms':>14s} (×float)" for b in args.batches)
    print(head + ("  top-1 qlib  top-1 ort  agree%" if args.parity else "") + "  integer kernels")
    for name in args.models:
        model, calib, shape = case(name)
        base = {}
        for setting, wa in SETTINGS.items():
            path = tmp / f"{name}-{setting}.onnx"
            if wa is None:
                q = None
                quant.float_to_onnx(model, path, calib[:1])
            else:
                q = quant.quantize(model, calib, w_bits=wa[0], a_bits=wa[1], rounding="nearest",
                                   batch_size=min(64, len(calib)), progress=False)
                quant.to_onnx(q, path, calib[:1])
            sess = deploy.session(path, threads=args.threads)
            row = f"{name:14s}{setting:8s}{path.stat().st_size / 1e6:9.2f}"
            for b in args.batches:
                x = torch.randn(b, *shape, generator=torch.Generator().manual_seed(1))
                reps = args.repeats if b * shape[-1] ** 2 <= 256 * 28 * 28 else max(3, args.repeats // 4)
                ms = 1e3 * deploy.latency(sess, x, repeats=reps)
                base.setdefault(b, ms)
                row += f"{ms:14.2f} " + (f"({base[b] / ms:5.2f}×)" if setting != "float" else " " * 9)
            if args.parity and q is not None and name != "resnet18-224":
                r = deploy.parity(q, sess, test)
                row += f"  {r['top1_qlib']:10.2f} {r['top1_onnx']:10.2f} {r['agreement']:7.2f}"
            elif args.parity:
                row += " " * 31
            print(row + "  " + (fused_ops(path, args.threads) if q is not None else ""), flush=True)


if __name__ == "__main__":
    main()
