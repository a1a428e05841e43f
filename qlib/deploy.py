"""The quantized model outside qlib: an ONNX file (``quant.to_onnx``) run by onnxruntime on
the CPU, its accuracy against qlib's fake-quantized model, its size and its latency::

    quant.to_onnx(qmodel, "resnet-w4a8.onnx", images[:1])
    sess = deploy.session("resnet-w4a8.onnx", threads=2)
    deploy.parity(qmodel, sess, test_set)   # top-1 of both, agreement, largest logit gap

onnx and onnxruntime are an extra (``pip install -e '.[deploy]'``); this module imports
them when a function needs them, so the rest of qlib runs without them.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from qlib import checks


def _ort():
    try:
        import onnxruntime
    except ImportError as e:
        raise ImportError("running an ONNX model needs onnxruntime: pip install -e '.[deploy]'") from e
    return onnxruntime


def session(path: str | Path, threads: int = 2, optimize: bool = True):
    """An onnxruntime CPU session for the model at ``path`` with ``threads`` intra-op threads
    (one inter-op thread), its graph optimisations on (``optimize``) or off."""
    ort = _ort()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX model at {path}: write one with quant.to_onnx or quant.float_to_onnx")
    checks.integer(threads, "threads", low=1, meaning="onnxruntime's intra-op threads")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def logits(sess, images: torch.Tensor, batch_size: int = 250) -> np.ndarray:
    """The session's outputs for ``images`` (N × C × H × W), in batches."""
    checks.integer(batch_size, "batch_size", low=1)
    name = sess.get_inputs()[0].name
    x = images.detach().float().cpu().numpy()
    return np.concatenate([sess.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])


@torch.no_grad()
def parity(qmodel: nn.Module, sess, dataset: TensorDataset, batch_size: int = 250) -> dict:
    """qlib's fake-quantized model against the onnxruntime session on every image of
    ``dataset``: top-1 (%) of each, the share of images (%) on which they predict the same
    class, and the largest absolute logit difference."""
    images, labels = dataset.tensors
    qmodel = qmodel.eval()
    ref = torch.cat([qmodel(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]).numpy()
    out = logits(sess, images, batch_size)
    y = labels.numpy()
    return {"top1_qlib": 100 * float((ref.argmax(1) == y).mean()), "top1_onnx": 100 * float((out.argmax(1) == y).mean()),
            "agreement": 100 * float((ref.argmax(1) == out.argmax(1)).mean()),
            "max_logit_diff": float(np.abs(ref - out).max())}


def latency(sess, batch: torch.Tensor, repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time (s) of one ``sess.run`` on ``batch``, after ``warmup`` runs."""
    checks.integer(repeats, "repeats", low=1)
    name, x = sess.get_inputs()[0].name, batch.detach().float().cpu().numpy()
    for _ in range(warmup):
        sess.run(None, {name: x})
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sess.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def node_counts(path: str | Path) -> dict[str, int]:
    """How many nodes of each ONNX operator type the model at ``path`` holds."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("reading an ONNX model needs onnx: pip install -e '.[deploy]'") from e
    counts: dict[str, int] = {}
    for n in onnx.load(str(path)).graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
