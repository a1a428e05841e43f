"""The shipped population record (qlib.record): packing is lossless where it must be, files
are checked against the manifest, a record built for something else is refused with the
command that rebuilds it, and a shipped float checkpoint is what pretrained() serves."""
import dataclasses
import json

import pytest
import torch
from torch.utils.data import TensorDataset

from qlib import cache, models, profiles, record


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setattr(record, "ROOT", tmp_path / "populations")
    return record.ROOT


def _population(n=5, layers=4, bins=8, n_test=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    # layer names out of alphabetical order, as a model's are: packing must keep the order
    recs = [{"config": {"arch": "vgg", "w_bits": {"features.3": 8, "features.10": 4 + i, "classifier.1": 8},
                        "a_bits": None, "rounding": "nearest",
                        "seed": 0, "quant": {}, "kind": "uniform"},
             "acc": 90.0 + i / 7, "probe_acc": 88.5, "probe_agree": 97.25, "quant_seconds": 0.1, "seconds": 1.5,
             "correct_full": torch.rand(n_test, generator=g) < 0.8,
             "tokens_probe": torch.rand(layers, 2 * bins, generator=g),
             "tokens_full": torch.rand(layers, 2 * bins, generator=g),
             "sqnr": [20.0 + i, 15.5]} for i in range(n)]
    return {"arch": "vgg", "records": recs, "probe_idx": torch.arange(3), "ranges": {"a": [0.0, 1.0]},
            "bins": bins, "stride": 31, "seconds": 12.5,
            "float": {"acc": 92.0, "probe_acc": 91.0, "correct_full": torch.ones(n_test, dtype=torch.bool)}}


SPEC = {"version": 3, "arch": "vgg", "float": "abc"}


def test_pack_unpack_round_trip():
    pop = _population()
    back = record.unpack(record.pack(pop, SPEC))
    assert len(back["records"]) == len(pop["records"])
    for a, b in zip(pop["records"], back["records"]):
        assert a["config"] == b["config"]
        assert list(a["config"]["w_bits"]) == list(b["config"]["w_bits"])  # the layer order, too
        assert torch.equal(a["correct_full"], b["correct_full"])  # bits: exact, odd length included
        for k in record.RECORD_FLOATS:
            assert a[k] == b[k]
        # float16 tokens: values in [0, 1] keep 3 significant digits
        assert torch.allclose(a["tokens_probe"], b["tokens_probe"], atol=5e-4, rtol=0)
        assert torch.allclose(a["tokens_full"], b["tokens_full"], atol=5e-4, rtol=0)
        assert b["tokens_probe"].dtype == torch.float32
        assert b["sqnr"] == a["sqnr"]
    assert back["seconds"] == pop["seconds"] and back["bins"] == pop["bins"]


def test_pack_refuses_an_empty_population():
    with pytest.raises(ValueError, match="empty"):
        record.pack({**_population(), "records": []}, SPEC)


def test_written_record_loads_and_a_changed_spec_is_refused(root):
    pop = _population()
    man = record.write("quick", {"vgg.pt": record.pack(pop, SPEC)}, {"commit": "x", "device": "cpu"})
    assert man["files"]["vgg.pt"]["sha256"] == record.sha256(root / "quick" / "vgg.pt")
    assert json.loads((root / "quick" / "manifest.json").read_text())["commit"] == "x"
    got = record.population("quick", "vgg", SPEC)
    assert [r["acc"] for r in got["records"]] == [r["acc"] for r in pop["records"]]
    assert record.population("quick", "resnet", SPEC) is None  # not shipped: None, the caller labels live
    assert record.population("paper", "vgg", SPEC) is None
    with pytest.raises(record.RecordError, match=r"python -m qlib\.study build --profile quick"):
        record.population("quick", "vgg", {**SPEC, "float": "other weights"})


def test_a_corrupt_or_missing_file_is_refused(root):
    record.write("quick", {"vgg.pt": record.pack(_population(), SPEC)}, {})
    path = root / "quick" / "vgg.pt"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(record.RecordError, match="checksum.*git checkout"):
        record.population("quick", "vgg", SPEC)
    path.unlink()
    with pytest.raises(record.RecordError, match="missing"):
        record.population("quick", "vgg", SPEC)


def test_manifest_merges_per_arch_info(root):
    record.write("quick", {"a.pt": {"x": 1}}, {"archs": {"vgg": {"configs": 3}}, "date": "d1"})
    man = record.write("quick", {"b.pt": {"x": 2}}, {"archs": {"resnet": {"configs": 4}}, "date": "d2"})
    assert set(man["archs"]) == {"vgg", "resnet"} and man["date"] == "d2"
    assert set(man["files"]) == {"a.pt", "b.pt"}


def test_pretrained_serves_the_shipped_checkpoint(root, tmp_cache, monkeypatch):
    quick = profiles.get("quick")
    monkeypatch.setitem(profiles.PROFILES, "tiny", dataclasses.replace(quick, name="tiny"))
    small = TensorDataset(torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,)))
    monkeypatch.setattr("qlib.data.load", lambda name, split, root=None: small)
    monkeypatch.setattr(models, "train", lambda *a, **k: pytest.fail("a shipped checkpoint must not be retrained"))
    torch.manual_seed(3)
    shipped = models.build("vgg")
    key = cache.key(models._spec("vgg", "tiny", "fashion-mnist"))
    record.write("tiny", {"float_vgg.pt": {"state_dict": shipped.state_dict(), "info": {"seconds": 1.0},
                                          "spec": key}}, {})
    m, info = models.pretrained("vgg", "tiny", return_info=True, device="cpu")
    assert info["shipped"] and all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                                      shipped.state_dict().values()))
    # a checkpoint trained under other settings is not served (the profile's own training is)
    record.write("tiny", {"float_vgg.pt": {"state_dict": shipped.state_dict(), "info": {}, "spec": "other"}}, {})
    assert record.float_checkpoint("vgg", "tiny", key) is None


def _tiny_setup(shipped: bool):
    from qlib import experiments

    quick = profiles.get("quick")
    p = dataclasses.replace(quick, name="tiny", predictor=dataclasses.replace(
        quick.predictor, configs=2, probe_images=16, shipped=shipped))
    images = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    test = TensorDataset(images, torch.randint(0, 10, (40,)))
    return experiments.Setup(p, test, test, test, images[:8], {"vgg": models.build("vgg").eval()}, {"vgg": 10.0},
                             torch.device("cpu"))


def test_a_profile_that_ships_refuses_to_label_live_and_reads_its_record(root, tmp_cache, monkeypatch):
    from qlib import study

    monkeypatch.setattr(study, "configs", lambda S, arch: [])  # no calibration runs: nothing to label
    S = _tiny_setup(shipped=True)
    with pytest.raises(record.RecordError, match=r"has none.*python -m qlib\.study build --profile tiny"):
        study.population_of(S, "vgg", progress=False)
    # a record written for this Setup's spec is what population_of returns
    pop = _population()
    record.write("tiny", {"vgg.pt": record.pack(pop, study.record_spec(S, "vgg"))}, {})
    got = study.population_of(S, "vgg", progress=False)
    assert [r["acc"] for r in got["records"]] == [r["acc"] for r in pop["records"]]
    # ...and a record built for other float weights is refused, naming the command
    S2 = _tiny_setup(shipped=True)
    S2.float_models["vgg"] = models.build("vgg")
    torch.nn.init.constant_(S2.float_models["vgg"].features[0].weight, 0.5)
    with pytest.raises(record.RecordError, match="rebuild it"):
        study.population_of(S2, "vgg", progress=False)
