"""A quantized model leaves qlib as ONNX (QuantizeLinear/DequantizeLinear pairs) and
onnxruntime computes what qlib computes; a wrong scale or zero point is caught."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from qlib import deploy, models, quant, rounding

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _trained_like(arch: str) -> nn.Module:
    """A book architecture with BatchNorm statistics that keep activations alive (a freshly
    built network's logits are ~1e-12 on MobileNetV2, where every tolerance passes)."""
    from conftest import randomise_bn_stats
    return randomise_bn_stats(models.build(arch))


def _onnx_out(path, x):
    return deploy.logits(deploy.session(path, threads=1), x)


def _rel_err(a, b):
    """Mean absolute difference relative to the mean absolute logit: a single activation
    that lands one grid step apart (float summation order at a rounding tie) moves it by
    ~1e-4, a wrong scale or zero point by over 1e-2."""
    return float(np.abs(a - b).mean() / np.abs(b).mean())


@pytest.mark.parametrize("arch,w_bits,a_bits", [("resnet", 4, 8), ("mobilenetv2", 4, 8), ("vgg", 4, 8),
                                                ("vgg", 3, 4), ("mobilenetv2", 4, 4), ("mobilenetv2", 8, None),
                                                ("resnet", 8, 8)])
def test_export_round_trips_through_onnxruntime(arch, w_bits, a_bits, tmp_path):
    m = _trained_like(arch)
    calib, x = torch.randn(64, 1, 28, 28), torch.randn(16, 1, 28, 28)
    q = quant.quantize(m, calib, w_bits=w_bits, a_bits=a_bits, rounding="nearest", progress=False)
    path = quant.to_onnx(q, tmp_path / "q.onnx", calib[:1])
    with torch.no_grad():
        ref = quant.integer_bias(q)(x).numpy()
    assert _rel_err(_onnx_out(path, x), ref) < 1e-3
    # every quantized layer is there, BatchNorm stays folded, the bits travel as metadata
    proto = onnx.load(str(path))
    ops = deploy.node_counts(path)
    layers = quant.quant_layers(q)
    n_act = sum(m.act is not None and m.act.enabled for m in layers.values())
    assert ops.get("QuantizeLinear", 0) == n_act
    assert "BatchNormalization" not in ops
    int8_weights = [i for i in proto.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) > 1]
    assert len(int8_weights) == len(layers)
    bits = json.loads({p.key: p.value for p in proto.metadata_props}["qlib.bits"])
    assert {n: b["w_bits"] for n, b in bits.items()} == {n: m.w_bits for n, m in layers.items()}
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    alias = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}

    def value(name):  # through the Identity nodes the exporter puts on shared constants
        while name not in inits:
            name = alias[name]
        return inits[name]

    for n, m in layers.items():  # each weight's integers inside its own b-bit grid, and qlib's
        w = value(f"{n}.w_int")
        lo, hi = rounding.grid(m.w_bits)
        assert lo <= w.min() and w.max() <= hi and np.array_equal(w, m.w_int.numpy())
    # zero points 0, int8 for signed inputs and uint8 for unsigned ones (the exporter shares
    # equal constants between layers, so they are read off the QuantizeLinear nodes)
    zeros = [value(n.input[2]) for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert all(int(z) == 0 for z in zeros)
    assert {z.dtype for z in zeros} == {np.dtype(np.int8 if m.act.signed else np.uint8) for m in layers.values()
                                        if m.act is not None and m.act.enabled}
    # below 8 bits a Clip holds the input to its b-bit grid (MobileNetV2's ReLU6 adds its own)
    assert ops.get("Clip", 0) >= sum(m.act is not None and m.act.enabled and m.act.bits < 8 for m in layers.values())


def _tamper(path, out, what):
    """A copy of the ONNX model at ``path`` with the first weight's per-channel scales ×1.05
    ("scale"), or the first activation DequantizeLinear reading a zero point 3 above its
    QuantizeLinear's ("zero point")."""
    proto = onnx.load(str(path))
    tensors = {i.name: i for i in proto.graph.initializer}
    consts = {n.output[0]: n.attribute[0].t for n in proto.graph.node if n.op_type == "Constant"}
    if what == "scale":
        dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in tensors
                  and len(tensors[n.input[0]].dims) > 1)
        t = tensors.get(dq.input[1]) or consts[dq.input[1]]
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t) * np.float32(1.05), t.name))
    else:
        q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
        dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == q.output[0])
        zp = onnx.numpy_helper.to_array(tensors.get(q.input[2]) or consts[q.input[2]])
        proto.graph.initializer.append(onnx.numpy_helper.from_array((zp.astype(np.int32) + 3).astype(zp.dtype),
                                                                    "tampered_zero_point"))
        dq.input[2] = "tampered_zero_point"
    onnx.save(proto, str(out))
    return out


@pytest.mark.parametrize("what", ["scale", "zero point"])
def test_the_parity_tolerance_catches_a_wrong_scale_or_zero_point(what, tmp_path):
    m = _trained_like("resnet")
    calib, x = torch.randn(64, 1, 28, 28), torch.randn(16, 1, 28, 28)
    q = quant.quantize(m, calib, w_bits=4, a_bits=8, rounding="nearest", progress=False)
    path = quant.to_onnx(q, tmp_path / "q.onnx", calib[:1])
    with torch.no_grad():
        ref = quant.integer_bias(q)(x).numpy()
    assert _rel_err(_onnx_out(path, x), ref) < 1e-3
    bad = _tamper(path, tmp_path / "bad.onnx", what)
    assert _rel_err(_onnx_out(bad, x), ref) > 1e-2


def test_integer_bias_is_the_only_difference_from_fake_quant(tmp_path):
    """With zero biases there is nothing to round: onnxruntime's integer kernels give qlib's
    own outputs; with biases, integer_bias() is what they compute."""
    m = _trained_like("vgg")
    for mod in m.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)) and mod.bias is not None:
            nn.init.zeros_(mod.bias)
    for mod in m.modules():  # BN's shift would fold into a bias again
        if isinstance(mod, nn.BatchNorm2d):
            mod.bias.data.zero_()
            mod.running_mean.zero_()
    calib, x = torch.randn(64, 1, 28, 28), torch.randn(16, 1, 28, 28)
    q = quant.quantize(m, calib, w_bits=4, a_bits=4, rounding="nearest", progress=False)
    path = quant.to_onnx(q, tmp_path / "q.onnx", calib[:1])
    with torch.no_grad():
        assert _rel_err(_onnx_out(path, x), q(x).numpy()) < 1e-4


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models_export(name, tmp_path):
    import torchvision

    torch.manual_seed(0)
    m = getattr(torchvision.models, name)(weights=None).eval()
    from conftest import randomise_bn_stats
    randomise_bn_stats(m)
    calib, x = torch.randn(8, 3, 64, 64), torch.randn(4, 3, 64, 64)
    q = quant.quantize(m, calib, w_bits=4, a_bits=8, rounding="nearest", batch_size=4, progress=False)
    path = quant.to_onnx(q, tmp_path / f"{name}.onnx", calib[:1])
    with torch.no_grad():
        ref = quant.integer_bias(q)(x).numpy()
    # 20 layers deep with random weights: activations landing one step apart at rounding ties
    # (onnxruntime's QuantizeLinear against torch's division) add up to ~5e-3 here, with
    # onnxruntime's graph optimisations on or off
    assert _rel_err(_onnx_out(path, x), ref) < 2e-2
    assert deploy.node_counts(path)["DequantizeLinear"] >= len(quant.quant_layers(q))


def test_float_export_and_parity_report(tmp_path):
    from torch.utils.data import TensorDataset

    m = _trained_like("vgg")
    calib = torch.randn(64, 1, 28, 28)
    path = quant.float_to_onnx(m, tmp_path / "f.onnx", calib[:1])
    with torch.no_grad():
        assert _rel_err(_onnx_out(path, calib), m(calib).numpy()) < 1e-4
    assert "BatchNormalization" not in deploy.node_counts(path)
    q = quant.quantize(m, calib, w_bits=4, a_bits=8, rounding="nearest", progress=False)
    qpath = quant.to_onnx(q, tmp_path / "q.onnx", calib[:1])
    ds = TensorDataset(calib, torch.arange(64) % 10)
    r = deploy.parity(quant.integer_bias(q), deploy.session(qpath, 1), ds)
    assert r["agreement"] == 100.0 and r["top1_qlib"] == r["top1_onnx"]


def test_bad_exports_give_clear_errors(tmp_path):
    m = models.build("vgg").eval()
    calib = torch.randn(64, 1, 28, 28)
    with pytest.raises(ValueError, match="has no QuantLayer: export a float model with float_to_onnx"):
        quant.to_onnx(m, tmp_path / "x.onnx", calib[:1])
    wide = quant.quantize(m, calib, w_bits=12, rounding="nearest", progress=False)
    with pytest.raises(ValueError, match="more than 8 bits"):
        quant.to_onnx(wide, tmp_path / "x.onnx", calib[:1])
    q = quant.quantize(m, calib, w_bits=4, rounding="nearest", progress=False)
    with pytest.raises(ValueError, match="takes a float model"):
        quant.float_to_onnx(q, tmp_path / "x.onnx", calib[:1])
    with pytest.raises(ValueError, match="takes 1-channel images"):
        quant.to_onnx(q, tmp_path / "x.onnx", torch.randn(1, 3, 28, 28))
    with pytest.raises(FileNotFoundError, match="no ONNX model at"):
        deploy.session(tmp_path / "missing.onnx")
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*tmp"))


def test_a_failed_export_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    m = _trained_like("vgg")
    calib = torch.randn(64, 1, 28, 28)
    q = quant.quantize(m, calib, w_bits=4, a_bits=8, rounding="nearest", progress=False)
    path = quant.to_onnx(q, tmp_path / "q.onnx", calib[:1])
    before = path.read_bytes()

    def broken(*a, **k):
        raise RuntimeError("checker failed")

    monkeypatch.setattr(onnx.checker, "check_model", broken)
    with pytest.raises(RuntimeError, match="checker failed"):
        quant.to_onnx(q, path, calib[:1])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]


def test_a_dead_channel_gets_a_weight_step_its_bias_fits(tmp_path):
    """A channel whose weights all round to 0 has a tiny weight step after the search; its
    bias would overflow int32 at input step × weight step unless the step is raised."""
    m = _trained_like("vgg")
    with torch.no_grad():
        m.features[3].weight[0].zero_()   # the second conv: its input is quantized
        m.features[4].running_var[0] = 1.0
        m.features[4].bias[0] = 0.5
    calib, x = torch.randn(64, 1, 28, 28), torch.randn(16, 1, 28, 28)
    q = quant.quantize(m, calib, w_bits=4, a_bits=8, rounding="nearest", progress=False)
    layer = quant.quant_layers(q)["features.3"]
    assert bool((layer.w_int[0] == 0).all()) and float(layer.act.scale * layer.scale.flatten()[0]) * 2 ** 31 < 0.5
    path = quant.to_onnx(q, tmp_path / "q.onnx", calib[:1])
    with torch.no_grad():
        ref = quant.integer_bias(q)(x).numpy()
    assert _rel_err(_onnx_out(path, x), ref) < 1e-3
