"""Hostile inputs and interrupted runs.

* every bad input a user is likely to pass gets a ValueError that names the argument
  (one table, one row per mistake);
* properties of the quantizer and the rounding functions over many generated inputs
  (hypothesis), not a few hand-picked ones;
* work killed at a random point — a population build, a chapter's execution, a cache
  write — loses nothing that was finished and leaves nothing half-written that is trusted.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from qlib import book, cache, data, mixed, models, population, quant, rounding, tokens, widgets

REPO = Path(__file__).resolve().parent.parent


# --- bad inputs -----------------------------------------------------------------------------

def _vgg():
    torch.manual_seed(0)
    return models.build("vgg").eval()


def _calib(n=8, c=1):
    return torch.randn(n, c, 28, 28, generator=torch.Generator().manual_seed(0))


def _nan_model():
    m = _vgg()
    with torch.no_grad():
        m.features[0].weight[0, 0, 0, 0] = float("nan")
    return m


def _nan_calib():
    x = _calib()
    x[3, 0, 5, 5] = float("nan")
    return x


def _q(**kw):
    """quantize() on the small VGG with everything valid but what ``kw`` overrides."""
    args = {"model": _vgg(), "calib": _calib(), "w_bits": 4, "rounding": "nearest", "batch_size": 4}
    args.update(kw)
    model, calib = args.pop("model"), args.pop("calib")
    return lambda: quant.quantize(model, calib, progress=False, **args)


def _corrupt_file(tmp_path):
    p = tmp_path / "model.pt"
    p.write_bytes(b"not a quantized model")
    return p


BAD_INPUTS = {
    # quantize: the five, then their neighbours
    "tau=inf": (_q(tau=float("inf"), rounding="attention"), r"tau must be finite"),
    "tau=nan": (_q(tau=float("nan"), rounding="attention"), r"tau must be finite"),
    "tau<0": (_q(tau=-0.5), r"tau must be ≥ 0"),
    "tau as text": (_q(tau="0.5"), r"tau must be a number"),
    "NaN calibration image": (_q(calib=_nan_calib()), r"calib has NaN or infinite values in 1 of 8 inputs \(the first is #3\)"),
    "inf calibration image": (_q(calib=_calib().index_fill(0, torch.tensor([0]), float("inf"))), r"calib has NaN or infinite"),
    "lr<0": (_q(lr=-1.0, rounding="attention"), r"lr must be > 0 \(Adam's step size\), got -1.0"),
    "lr=0": (_q(lr=0.0, rounding="adaround"), r"lr must be > 0"),
    "lr=nan": (_q(lr=float("nan")), r"lr must be finite"),
    "act_lr<0": (_q(act_lr=-1e-3, a_bits=4), r"act_lr must be > 0"),
    "batch_size=0": (_q(batch_size=0), r"batch_size must be an integer ≥ 1"),
    "batch_size float": (_q(batch_size=2.5), r"batch_size must be an integer ≥ 1"),
    "iters<0": (_q(iters=-1, rounding="attention"), r"iters must be an integer ≥ 0"),
    "seed<0": (_q(seed=-1), r"seed must be an integer ≥ 0"),
    "RGB images for a grey model": (_q(calib=_calib(c=3)), r"calib has shape \(8, 3, 28, 28\), but the model's first layer 'features.0' takes 1-channel images"),
    "flat images": (_q(calib=torch.randn(8, 784)), r"first layer 'features.0' takes 1-channel images"),
    "numpy calibration": (_q(calib=np.zeros((8, 1, 28, 28), np.float32)), r"calib must be a torch.Tensor"),
    "integer images": (_q(calib=torch.zeros(8, 1, 28, 28, dtype=torch.uint8)), r"calib must be floating point"),
    "no images": (_q(calib=torch.zeros(0, 1, 28, 28)), r"calib must hold at least one input"),
    "non-finite float weights": (_q(model=_nan_model()), r"parameter 'features.0.weight' has NaN or infinite values"),
    "not a model": (_q(model={"weight": torch.ones(3)}), r"model must be a torch.nn.Module"),
    "w_bits=1": (_q(w_bits=1), r"between 2 and 16, got 1"),
    "w_bits=17": (_q(w_bits=17), r"between 2 and 16, got 17"),
    "w_bits=4.0": (_q(w_bits=4.0), r"between 2 and 16, got 4.0"),
    "a_bits=1": (_q(a_bits=1), r"a_bits must be an integer between 2 and 16"),
    "unknown rounding": (_q(rounding="truncate"), r"unknown rounding 'truncate'"),
    "fewer images than a batch": (_q(rounding="adaround", batch_size=16), r"8 calibration images are fewer than the batch size 16"),
    "LayerNorm model": (_q(model=nn.Sequential(nn.Conv2d(1, 4, 3), nn.LayerNorm([4, 26, 26]), nn.Flatten(),
                                                   nn.Linear(4 * 26 * 26, 10)).eval()), r"LayerNorm"),
    # mixed precision
    "empty bit list": (lambda: mixed.allocate_bits(_vgg(), [], 1e-3), r"bitlist is empty"),
    "bit list as text": (lambda: mixed.allocate_bits(_vgg(), "3456", 1e-3), r"every bit width in bitlist must be an integer"),
    "bit width 1 in list": (lambda: mixed.allocate_bits(_vgg(), [1, 4], 1e-3), r"between 2 and 16, got 1"),
    "eps2=0": (lambda: mixed.allocate_bits(_vgg(), [3, 4], 0.0), r"eps2 must be > 0 \(the coding distortion ε²\)"),
    "eps2=nan": (lambda: mixed.coding_length(torch.ones(4, 4), float("nan")), r"eps2 must be finite"),
    "NaN weights for coding length": (lambda: mixed.coding_length(torch.full((4, 4), float("nan")), 1e-3), r"W has NaN"),
    # the widgets' pure functions
    "explorer tau<0": (lambda: widgets.tau_explorer_data(0.3, -1.0), r"tau must be ≥ 0"),
    "explorer tau=inf": (lambda: widgets.tau_explorer_data(0.3, float("inf")), r"tau must be finite"),
    "explorer v=nan": (lambda: widgets.tau_explorer_data(float("nan"), 0.5), r"v must be finite"),
    "explorer bits=1": (lambda: widgets.tau_explorer_data(0.3, 0.5, bits=1), r"between 2 and 16"),
    "picker empty list": (lambda: widgets.bit_picker_data(_vgg(), [], 1e-3), r"bitlist is empty"),
    # quantizer, data, models, artefacts, predictor
    "grid(17)": (lambda: rounding.grid(17), r"between 2 and 16, got 17"),
    "bits=True": (lambda: rounding.check_bits(True), r"between 2 and 16, got True"),
    "unknown dataset": (lambda: data.load("imagenet", "train"), r"imagenet"),
    "unknown split": (lambda: data.load("fashion-mnist", "validation"), r"validation"),
    "unknown architecture": (lambda: models.build("resnet152"), r"resnet152"),
    "histogram with 0 bins": (lambda: tokens.histogram_counts(torch.ones(5), 0, 0.0, 1.0), r"bins"),
    "NaN probe images": (lambda: tokens.float_ranges(_vgg(), _nan_calib()), r"images has NaN or infinite values"),
    "RGB probe images": (lambda: tokens.float_ranges(_vgg(), _calib(c=3)), r"images have 3 channels; the model's first layer takes 1"),
    "infinite histogram range": (lambda: tokens.histogram_counts(torch.ones(5), 8, 0.0, float("inf")), r"must be finite with hi > lo"),
    "probe of 0 images": (lambda: population.probe_indices(100, 0), r"probe size must be in 1..100"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_gets_a_clear_error(case):
    call, message = BAD_INPUTS[case]
    with pytest.raises(ValueError, match=message):
        call()


def test_artefact_files_bad_or_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no quantized model at"):
        quant.load(tmp_path / "missing.pt", "vgg")
    with pytest.raises(ValueError, match="is not a readable qlib quantized model"):
        quant.load(_corrupt_file(tmp_path), "vgg")


# --- properties ---------------------------------------------------------------------------

BITS = st.integers(2, 10)
SCALES = st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False)
VALUES = st.lists(st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False), min_size=1, max_size=64)


@settings(max_examples=200, deadline=None)
@given(VALUES, SCALES, BITS, st.booleans())
def test_fake_quant_lands_on_the_grid_and_is_idempotent(values, s, bits, signed):
    w = torch.tensor(values, dtype=torch.float64)
    q = rounding.fake_quant(w, s, bits, signed)
    lo, hi = rounding.grid(bits, signed)
    k = q / s
    assert torch.allclose(k, k.round(), rtol=0, atol=1e-6)
    assert k.round().min() >= lo and k.round().max() <= hi
    assert torch.equal(rounding.fake_quant(q, s, bits, signed), q)


@settings(max_examples=200, deadline=None)
@given(VALUES, SCALES, BITS)
def test_nearest_error_is_at_most_half_a_step_inside_the_grid(values, s, bits):
    lo, hi = rounding.grid(bits)
    w = torch.tensor(values, dtype=torch.float64).clamp(lo * s, hi * s)
    err = (rounding.fake_quant(w, s, bits) - w).abs().max().item()
    assert err <= s / 2 * (1 + 1e-9)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=32),
       st.floats(0, 1e2, allow_nan=False), st.booleans())
def test_eq6_factor_is_a_probability(alpha, tau, positive):
    a = torch.tensor(alpha, dtype=torch.float64)
    f = rounding.backward_factor(a, tau, torch.full_like(a, positive, dtype=torch.bool))
    assert torch.all((f >= 0) & (f <= 1))
    g = rounding.backward_factor(a, tau, torch.full_like(a, not positive, dtype=torch.bool))
    assert torch.allclose(f + g, torch.ones_like(f))   # the two branches of eq. 6 sum to 1


@settings(max_examples=100, deadline=None)
@given(st.floats(1e-5, 1e2), st.floats(1.001, 1e3), st.integers(1, 24), st.integers(1, 24), st.integers(0, 2**16))
def test_coding_length_falls_as_distortion_grows(eps2, factor, n, m, seed):
    W = torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    loose, tight = mixed.coding_length(W, eps2 * factor), mixed.coding_length(W, eps2)
    assert 0 <= loose <= tight + 1e-9


# --- interrupted work ---------------------------------------------------------------------

def _run(script: str, cache_dir: Path, **kw) -> subprocess.Popen:
    env = dict(os.environ, QLIB_CACHE=str(cache_dir), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kw)


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0, jitter: float = 0.5) -> None:
    """SIGKILL ``proc`` and its children at a random moment after ``ready()`` first holds."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the process ended before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, "the process never got going"
        time.sleep(0.05)
    time.sleep(random.uniform(0, jitter))
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


POPULATION = """
    import json, time, torch
    from torch.utils.data import TensorDataset
    from qlib import graph, models, population, tokens
    torch.manual_seed(0)
    model = models.build("vgg").eval()
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    probe, probe_labels = images[:16], labels[:16]
    folded = graph.fold_bn(model).eval()
    ranges = tokens.float_ranges(model, probe)
    fl = tokens.histogram_pass(folded, probe, 8, ranges, labels=probe_labels)
    configs = population.sensitivity_configs("vgg", model)
    label = population.label
    def slow_label(*a, **k):   # labelling a real configuration takes seconds: leave time to kill
        time.sleep(0.4)
        return label(*a, **k)
    population.label = slow_label
    recs, reused = population.label_all(configs, model, folded, images[:16], TensorDataset(images, labels),
                                        probe, fl["preds"], probe_labels, ranges, 8, 3, progress=False)
    print(json.dumps({"n": len(recs), "reused": reused, "acc": [r["acc"] for r in recs],
                      "tokens": [float(r["tokens_probe"].sum()) for r in recs]}))
"""


def test_killed_population_build_resumes_from_what_it_finished(tmp_path):
    labels = tmp_path / "killed" / "label"
    proc = _run(POPULATION, tmp_path / "killed")
    _kill_when(proc, lambda: labels.is_dir() and any(labels.glob("*.pt")))
    finished = len(list(labels.glob("*.pt")))
    assert finished >= 1

    resumed = _run(POPULATION, tmp_path / "killed")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    resumed = json.loads(out.strip().splitlines()[-1])
    assert resumed["reused"] == finished and resumed["n"] > finished, (resumed["n"], finished)

    fresh = _run(POPULATION, tmp_path / "fresh")
    out, err = fresh.communicate(timeout=300)
    assert fresh.returncode == 0, err
    fresh = json.loads(out.strip().splitlines()[-1])
    assert fresh["reused"] == 0
    assert resumed["acc"] == fresh["acc"] and resumed["tokens"] == fresh["tokens"]


def _tiny_chapter(path: Path, seconds: float) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "quick"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(f"import time\ntime.sleep({seconds})"),
                nbformat.v4.new_code_cell("print('done', profile)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_killed_chapter_leaves_no_executed_copy(tmp_path):
    src, out_dir = _tiny_chapter(tmp_path / "99_tiny.ipynb", 30), tmp_path / "executed"
    out_dir.mkdir()
    (out_dir / "99_tiny.ipynb").write_text("{}")   # an executed copy from an earlier run
    partial = out_dir / ".99_tiny.partial.ipynb"
    proc = _run(f"""
        from pathlib import Path
        from qlib import book
        book.execute_one(Path({str(src)!r}), "quick", Path({str(out_dir)!r}))
    """, tmp_path / "cache")
    def started():   # papermill has begun writing its output, wherever it writes it
        try:
            return partial.exists() or (out_dir / "99_tiny.ipynb").stat().st_size > 2
        except FileNotFoundError:
            return False

    _kill_when(proc, started, jitter=2.0)
    assert not (out_dir / "99_tiny.ipynb").exists(), "a killed run must not leave (or keep) an executed copy"
    assert not book.is_complete(partial)

    done = book.execute_one(_tiny_chapter(tmp_path / "99_tiny.ipynb", 0), "quick", out_dir)
    assert book.is_complete(done) and not partial.exists()


def test_killed_cache_write_leaves_the_old_file_or_the_new(tmp_path):
    path = tmp_path / "cache" / "things" / "x.pt"
    proc = _run(f"""
        import torch
        from pathlib import Path
        from qlib import cache
        for i in range(10**6):
            cache.save({{"i": i, "w": torch.full((300_000,), float(i))}}, Path({str(path)!r}))
    """, tmp_path / "cache")
    _kill_when(proc, path.exists, jitter=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # a half-written file would warn and be removed
        obj = cache.load(path)
    assert obj["w"].shape == (300_000,) and torch.all(obj["w"] == obj["i"])


def test_corrupt_cache_file_is_reported_removed_and_rebuilt(tmp_cache):
    model, calib = _vgg(), _calib(16)
    cfg = population.sensitivity_configs("vgg", model)[0]
    first = population.quantized(cfg, model, calib)          # built and cached
    digests = (cache.digest(*model.state_dict().values()), cache.digest(calib))
    path = cache.path_for("qmodel", population.model_spec(cfg, *digests))
    path.write_bytes(path.read_bytes()[:100])                 # truncated, as by a full disk
    with pytest.warns(UserWarning, match="rebuilding"):
        again = population.quantized(cfg, model, calib)
    x = _calib(4)
    assert torch.equal(first(x), again(x))
    assert quant.load(path, _vgg()) is not None               # the file was rewritten whole

    path.write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="removed unreadable cache file"):
        assert cache.load(path) is None
    assert not path.exists()


def test_a_hung_chapter_is_timed_out_and_run_again(tmp_path, capsys):
    """A cell past the timeout counts as a hung run: the chapter runs again from the top
    (here the cell hangs only the first time), and a run that hangs every time fails."""
    mark = tmp_path / "ran-once"
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "quick"')
    params.metadata["tags"] = ["parameters"]
    hang = f"import os, time\nfirst = not os.path.exists({str(mark)!r})\nopen({str(mark)!r}, 'w').close()\n" \
           "time.sleep(60 if first else 0)"
    nb.cells = [params, nbformat.v4.new_code_cell(hang)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    src = tmp_path / "99_hang.ipynb"
    nbformat.write(nb, src)
    out = book.execute_one(src, "quick", tmp_path / "executed", cell_timeout=8)
    assert book.is_complete(out) and "running it again (2 of 2)" in capsys.readouterr().out
    from nbclient.exceptions import CellTimeoutError

    mark.unlink()
    with pytest.raises(CellTimeoutError):
        book.execute_one(src, "quick", tmp_path / "executed", cell_timeout=8, attempts=1)
    assert not (tmp_path / "executed" / "99_hang.ipynb").exists()
