import dataclasses
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

from qlib import experiments, profiles, report


def test_seed_rule():
    rule = experiments.needs_more_seeds
    # close (0.4 apart) and hard (nearest loses 5 points): more seeds
    assert rule({"adaround": 85.0, "attention": 85.4}, nearest=80.0, float_acc=85.0)
    # far apart: one seed resolves it
    assert not rule({"adaround": 83.0, "attention": 85.4}, nearest=80.0, float_acc=85.0)
    # easy setting (nearest within a point of float): nothing to resolve
    assert not rule({"adaround": 85.0, "attention": 85.1}, nearest=84.5, float_acc=85.0)
    # the edges: a gap of exactly one point is not close; a loss of exactly one point is hard
    assert not rule({"a": 85.0, "b": 86.0}, nearest=80.0, float_acc=85.0)
    assert rule({"a": 85.0, "b": 85.2}, nearest=84.0, float_acc=85.0)


def test_fmt_mean_std():
    assert experiments.fmt_mean_std(90.123, 0.456, 3) == "90.12 ± 0.46 (3)"
    assert experiments.fmt_mean_std(90.123, 0.456, 3, show_n=False) == "90.12 ± 0.46"
    assert experiments.fmt_mean_std(90.123, math.nan, 1) == "90.12"


def test_verdict_words():
    assert report.verdict(91.0, 90.0, 3, 3, 0.1, 10, names=("A", "B"))[1] == "A better"
    assert report.verdict(90.0, 91.0, 3, 3, 0.1, 10, names=("A", "B"))[1] == "B better"
    assert report.verdict(90.05, 90.0, 3, 3, 0.3, 10)[1] == "tie"


def test_verdicts_pool_the_spread_over_a_models_settings():
    recs = [{"arch": "resnet", "w_bits": w, "a_bits": 32, "rounding": r, "acc": acc, "seed": s}
            for w, r, accs in ((3, "attention", (90.0, 90.0)), (3, "adaround", (89.8, 89.8)),
                               (2, "attention", (80.0, 81.0)), (2, "adaround", (79.0, 80.2)))
            for s, acc in enumerate(accs)]
    v = experiments.verdicts(recs, "attention", "adaround").set_index("w_bits")
    sd = math.sqrt((0 + 0 + 0.5 + 0.72) / 4)   # the two W2 groups' variances, one df each
    assert v.loc[3, "pooled seed sd"] == pytest.approx(sd)
    assert v.loc[3, "verdict"] == "tie", "0.00 std at W3 does not make a 0.2 gap real"


def test_profiles_are_typed_and_give_quantize_kwargs():
    q = profiles.get("quick").quant
    assert q.kwargs() == {"iters": q.iters, "batch_size": q.batch_size, "lr": q.lr, "act_lr": q.act_lr,
                          "seed": q.seeds[0]}
    assert list(q.lr_grid) == sorted(q.lr_grid) and len(q.lr_grid) >= 5
    assert q.kwargs(seed=1, tau=0.2)["seed"] == 1 and q.kwargs(tau=0.2)["tau"] == 0.2
    paper = profiles.get("paper")
    assert (paper.quant.calib_images, paper.quant.iters, paper.quant.lr, paper.quant.batch_size) == (1024, 2000, 4e-4, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        paper.quant.iters = 5
    with pytest.raises(ValueError, match="unknown profile"):
        profiles.get("fast")


def _tiny_setup():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)).eval()
    x = torch.randn(64, 1, 8, 8)
    y = net(x).argmax(1).detach()
    test = TensorDataset(x, y)  # the float model is right on every image: 100%
    quick = profiles.get("quick")
    p = dataclasses.replace(quick, quant=dataclasses.replace(quick.quant, iters=3, batch_size=16, seeds=(0, 1, 2)))
    return experiments.Setup(p, test, test, test, x[:32], {"net": net}, {"net": 100.0}, torch.device("cpu"))


def test_run_seeds_and_compare_setting_records(tmp_cache):
    S = _tiny_setup()
    near = experiments.run_seeds(S, "net", "nearest", 4)
    assert len(near) == 1, "nearest has no randomness: one run"
    att = experiments.run_seeds(S, "net", "attention", 4, tags={"table": "x"})
    assert [r["seed"] for r in att] == [0, 1, 2] and all(r["table"] == "x" for r in att)
    assert all(0 <= r["acc"] <= 100 and r["iters"] == 3 and r["images"] == 32 for r in att)
    recs = experiments.compare_setting(S, "net", 2, None)
    first = {r["rounding"]: r["acc"] for r in recs if r["seed"] == 0 and r["rounding"] != "nearest"}
    near_acc = next(r["acc"] for r in recs if r["rounding"] == "nearest")
    extra = experiments.needs_more_seeds(first, near_acc, 100.0)
    assert len(recs) == (1 + 2 * 3 if extra else 1 + 2)
    table = experiments.results_table(recs, S.float_acc, index=("arch", "w_bits", "a_bits"))
    assert list(table.columns[:4]) == ["float", "nearest", "adaround", "attention"]
    v = experiments.verdicts(recs, "attention", "adaround")
    assert v.loc[0, "verdict"] in ("Attention Round better", "AdaRound better", "tie")


def test_run_records_are_cached_under_every_setting(tmp_cache):
    S = _tiny_setup()
    first = experiments.run(S, "net", "attention", 3, seed=1, tags={"table": "a"})
    again = experiments.run(S, "net", "attention", 3, seed=1, tags={"table": "b"})
    assert not first["from_cache"] and again["from_cache"]
    assert again == {**first, "table": "b", "from_cache": True}, "a cache hit returns the same record with the caller's tags"
    assert len(list((tmp_cache / "run").glob("*.pt"))) == 1
    # any argument that changes the result changes the key
    experiments.run(S, "net", "attention", 3, seed=1, variant={"backward": "ste"})
    experiments.run(S, "net", "attention", 3, seed=1, lr=0.5)
    experiments.run(dataclasses.replace(S, calib=S.calib[:16]), "net", "attention", 3, seed=1, batch_size=16)
    assert len(list((tmp_cache / "run").glob("*.pt"))) == 4
    # keep_model always quantizes (a record from the cache has no model) and leaves the cache alone
    kept = experiments.run(S, "net", "attention", 3, seed=1, keep_model=True)
    assert kept["acc"] == first["acc"] and isinstance(kept["model"], nn.Module)
    assert len(list((tmp_cache / "run").glob("*.pt"))) == 4


def _toy_selection_setup():
    """A 3-conv net whose labels are its own float predictions (float = 100% on every split)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    x = torch.randn(384, 1, 6, 6)
    y = net(x).argmax(1).detach()
    quick = profiles.get("quick")
    p = dataclasses.replace(quick, quant=dataclasses.replace(quick.quant, iters=30, batch_size=32, seeds=(0,)))
    split = lambda a, b: TensorDataset(x[a:b], y[a:b])  # noqa: E731
    return experiments.Setup(p, split(0, 128), split(128, 256), split(256, 384), x[:128], {"net": net},
                             {"net": 100.0}, torch.device("cpu"))


def test_selection_refuses_the_test_split():
    S = _toy_selection_setup()
    with pytest.raises(ValueError, match="validation split"):
        experiments.select(S, "net", "attention", "lr", [1e-2], w_bits=2, split="test")
    with pytest.raises(ValueError, match="empty"):
        experiments.select(S, "net", "attention", "lr", [], w_bits=2)
    with pytest.raises(ValueError, match="both selected and fixed"):
        experiments.select(S, "net", "attention", "lr", [1e-2], w_bits=2, fixed={"lr": 1e-3})


def test_selection_picks_the_known_best_lr(tmp_cache):
    """Every layer at 2 bits and α drawn with τ = 1 grid step: rounding starts far from any
    good solution. At lr 1e-7 α cannot move in 30 steps (the start stays), at 1e4 Adam
    throws every α past the grid's ends; only the middle lr can reconstruct. The test
    split's labels are scrambled, so a selection that looked at it would be lost."""
    S = _toy_selection_setup()
    scrambled = S.test_set.tensors[1][torch.randperm(len(S.test_set.tensors[1]))]
    S.test_set = TensorDataset(S.test_set.tensors[0], (scrambled + 1) % 10)
    fixed = {"tau": 1.0, "first_last_bits": 2}
    grid = [1e-7, 3e-2, 1e4]
    sel = experiments.select(S, "net", "attention", "lr", grid, w_bits=2, fixed=fixed, progress=False)
    assert sel["best"] == 3e-2, sel["val_acc"]
    assert not sel["at_edge"] and sel["setting"] == "W2A32"
    assert [r["lr"] for r in sel["records"]] == grid and all(r["split"] == "val" for r in sel["records"])
    assert sel["val_acc"][1] > max(sel["val_acc"][0], sel["val_acc"][2]) + 5
    # cached: a second call reads the same selection without quantizing
    again = experiments.select(S, "net", "attention", "lr", grid, w_bits=2, fixed=fixed, progress=False)
    assert all(r["from_cache"] is False for r in sel["records"]) and all("from_cache" not in r for r in again["records"])
    strip = lambda d: {**d, "records": [{k: v for k, v in r.items() if k != "from_cache"} for r in d["records"]]}
    assert strip(again) == strip(sel), "a cached selection returns what the first one found"
    assert len(list((tmp_cache / "selection").glob("*.pt"))) == 1


def test_tuned_returns_each_methods_lr_and_nothing_for_fixed_rules(tmp_cache):
    S = _toy_selection_setup()
    S.profile = dataclasses.replace(S.profile, quant=dataclasses.replace(S.quant, lr_grid=(1e-2, 1e-1)))
    assert experiments.tuned(S, "net", "nearest") == {}
    hp = experiments.tuned(S, "net", "adaround", progress=False)
    assert set(hp) == {"lr"} and hp["lr"] in (1e-2, 1e-1)


def test_cost_note_says_what_came_from_the_cache():
    recs = [{"seconds": 60.0, "from_cache": False}, {"seconds": 120.0, "from_cache": True}, {"seconds": 60.0}]
    note = experiments.cost_note(recs, 30.0)
    assert note.startswith("4.0 minutes of calibration when its 3 runs were made")
    assert "1 of 3 computed in this run, 2 read from the cache" in note and note.endswith("took 0.5 minutes")
    one = experiments.cost_note(recs[1:2], 0.0)
    assert one.startswith("2.0 minutes of calibration when its run was made (read from the cache)"), one
    assert "(both computed in this run)" in experiments.cost_note([recs[0], recs[0]], 0.0)
    with pytest.raises(ValueError, match="records"):
        experiments.cost_note([], 1.0)
