"""A quantized model is an artefact: its state moves, saves and loads whole, and exports to
integers a deployment can use."""
import copy
import io

import pytest
import torch
import torch.nn as nn

from qlib import models, quant


@pytest.fixture(scope="module", params=models.ARCHS)
def quantized(request, randomise_bn):
    """(arch, float model, a W3A4 Attention Round model with a mixed 9-bit layer)."""
    torch.manual_seed(0)
    fp = randomise_bn(models.build(request.param))
    names = quant.quantizable_layers(quant.fold_bn(fp))
    bits = {n: 3 for n in names[1:-1]}
    bits[names[1]] = 9  # one layer above 8 bits: stored as int16
    calib = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    q = quant.quantize(fp, calib, w_bits=bits, a_bits=4, rounding="attention", iters=3,
                       batch_size=16, progress=False)
    return request.param, fp, q


X = torch.randn(6, 1, 28, 28, generator=torch.Generator().manual_seed(2))


def _out(m):
    with torch.no_grad():
        return m(X)


def test_finalized_layers_hold_only_integers_and_scales(quantized):
    _, _, q = quantized
    for name, m in quant.quant_layers(q).items():
        assert m.v is None and not hasattr(m, "alpha") and not hasattr(m, "V") and not hasattr(m, "sigma")
        assert m.w_int.dtype == (torch.int16 if m.w_bits > 8 else torch.int8), name
        assert m.w_int.min() >= m.lo and m.w_int.max() <= m.hi
        own = dict(m.named_parameters(recurse=False)) | dict(m.named_buffers(recurse=False))
        assert set(own) <= {"w_int", "scale", "bias"}, f"{name} keeps {sorted(own)}"
        assert not any(p.dtype.is_floating_point and p.shape == m.w_int.shape for p in own.values())


def test_every_tensor_is_module_state(quantized):
    """.to() moves all of it: after .to('meta') no plain tensor attribute stays behind."""
    _, _, q = quantized
    moved = copy.deepcopy(q).to("meta")
    for name, m in moved.named_modules():
        for attr, val in vars(m).items():
            if isinstance(val, torch.Tensor):
                assert val.is_meta, f"{name}.{attr} is a plain tensor attribute that .to() leaves behind"
        for t in list(m.parameters(recurse=False)) + list(m.buffers(recurse=False)):
            assert t.is_meta


def test_state_dict_round_trip_through_torch_save(quantized):
    arch, fp, q = quantized
    assert "quant_report" in q.state_dict(), "the calibration report is part of the state"
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    q2 = quant.quantize(fp, torch.randn(16, 1, 28, 28), w_bits={n: m.w_bits for n, m in quant.quant_layers(q).items()},
                        a_bits=4, rounding="nearest", progress=False)
    assert not torch.equal(_out(q2), _out(q))  # a different calibration before loading
    q2.load_state_dict(sd)
    assert torch.equal(_out(q2), _out(q))
    assert q2.quant_report["rounding"] == "attention" and q2.quant_report["a_bits"] == 4
    assert q2.quant_report["losses"] == q.quant_report["losses"]


def test_save_load_rebuilds_the_model_from_arch_or_float_model(quantized, tmp_path):
    arch, fp, q = quantized
    path = quant.save(q, tmp_path / f"{arch}.pt")
    assert not list(tmp_path.glob(".*.tmp")), "atomic write leaves no temp file"
    for structure in (arch, models.build(arch)):
        q2 = quant.load(path, structure)
        assert torch.equal(_out(q2), _out(q))
        assert q2.quant_report["w_bits"] == q.quant_report["w_bits"]
        for (n, a), (_, b) in zip(quant.quant_layers(q).items(), quant.quant_layers(q2).items()):
            assert a.w_bits == b.w_bits and a.rounding == b.rounding, n
            assert (a.act is None) == (b.act is None)
            if a.act is not None:
                assert (a.act.bits, a.act.signed, a.act.enabled) == (b.act.bits, b.act.signed, b.act.enabled)


def test_export_rebuilds_every_float_weight(quantized):
    _, _, q = quantized
    exported = quant.export(q)
    layers = quant.quant_layers(q)
    assert list(exported) == list(layers)
    for name, e in exported.items():
        m = layers[name]
        assert e["weight_int"].dtype in (torch.int8, torch.int16) and e["bits"] == m.w_bits
        assert e["scale"].shape == (m.w_int.shape[0],)
        w = e["weight_int"].float() * e["scale"].view(-1, *[1] * (e["weight_int"].dim() - 1))
        assert torch.equal(w, m.weight()), name
        if m.act is None:
            assert e["act_step"] is None
        else:
            assert e["act_step"] == pytest.approx(float(m.act.scale)) and e["act_bits"] == m.act.bits


def test_load_refuses_foreign_and_corrupt_files(quantized, tmp_path):
    arch, _, q = quantized
    path = quant.save(q, tmp_path / "q.pt")
    other = "vgg" if arch != "vgg" else "resnet"
    with pytest.raises((ValueError, RuntimeError)):
        quant.load(path, other)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="not a readable qlib quantized model"):
        quant.load(bad, arch)
    with pytest.raises(FileNotFoundError):
        quant.load(tmp_path / "missing.pt", arch)
    with pytest.raises(ValueError, match="no QuantLayer"):
        quant.save(models.build(arch), tmp_path / "float.pt")


class Tower(nn.Module):
    """A user's block whose class name means nothing to qlib."""

    def __init__(self, c):
        super().__init__()
        self.a = nn.Conv2d(c, c, 3, padding=1)
        self.b = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.b(torch.relu(self.a(x)))


def _tower_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), Tower(4), Tower(4), nn.Flatten(),
                         nn.Linear(4 * 28 * 28, 10)).eval()


def test_user_blocks_are_recognised_by_type():
    net = _tower_net()
    calib = torch.randn(32, 1, 28, 28)
    kw = dict(w_bits=3, rounding="attention", iters=2, batch_size=16, progress=False)
    by_layer = quant.quantize(net, calib, **kw)
    assert list(by_layer.quant_report["losses"]) == ["0", "1.a", "1.b", "2.a", "2.b", "4"]
    by_block = quant.quantize(net, calib, blocks=(Tower,), **kw)
    assert list(by_block.quant_report["losses"]) == ["0", "1", "2", "4"]
    with pytest.raises(ValueError, match="nn.Module subclasses"):
        quant.quantize(net, calib, blocks=("Tower",), **kw)


def test_torchvision_blocks_are_units_by_default():
    import torchvision

    m = torchvision.models.resnet18(weights=None).eval()
    q = quant.quantize(m, torch.randn(4, 3, 32, 32), w_bits=4, rounding="attention", iters=1,
                       batch_size=4, progress=False)
    units = list(q.quant_report["losses"])
    assert "layer1.0" in units and "layer4.1" in units and "layer1.0.conv1" not in units
    layer_wise = quant.quantize(m, torch.randn(4, 3, 32, 32), w_bits=4, rounding="attention",
                                iters=1, batch_size=4, progress=False, blocks=())
    assert "layer1.0.conv1" in layer_wise.quant_report["losses"]
