import os

import pytest
import torch

from qlib import cache


def test_round_trip(tmp_cache):
    path = cache.path_for("things", {"a": 1})
    obj = {"w": torch.arange(6.0).view(2, 3), "info": {"acc": 0.91, "hist": [0.1, 0.2], "dev": "cpu"}}
    cache.save(obj, path)
    back = cache.load(path)
    assert torch.equal(back["w"], obj["w"]) and back["info"] == obj["info"]
    assert path.parent == tmp_cache / "things"


def test_interrupted_write_leaves_nothing_that_loads(tmp_cache, monkeypatch):
    path = cache.path_for("things", {"a": 2})

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        cache.save({"w": torch.ones(3)}, path)
    assert not path.exists()
    assert os.listdir(path.parent) == []  # the temp file is gone too
    assert cache.load(path) is None


def test_interrupted_overwrite_keeps_old_file(tmp_cache, monkeypatch):
    path = cache.path_for("things", {"a": 3})
    cache.save({"w": torch.zeros(2)}, path)
    monkeypatch.setattr(torch, "save", lambda obj, f: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        cache.save({"w": torch.ones(2)}, path)
    assert torch.equal(cache.load(path)["w"], torch.zeros(2))


def test_corrupt_file_is_a_miss_not_a_crash(tmp_cache):
    path = cache.path_for("things", {"a": 4})
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage that is not a torch file")
    with pytest.warns(UserWarning, match="unreadable cache file"):
        assert cache.load(path) is None


class Arbitrary:  # any class outside torch's allow-list stands for pickled code
    pass


def test_load_refuses_pickled_code(tmp_cache):
    path = cache.path_for("things", {"a": 5})
    path.parent.mkdir(parents=True)
    torch.save({"obj": Arbitrary()}, path)
    with pytest.warns(UserWarning, match="unreadable cache file"):
        assert cache.load(path) is None
