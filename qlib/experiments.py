"""The experiment harness the chapters share: load a profile's data and float models once,
run a PTQ setting over seeds into flat records, and turn records into tables::

    S = experiments.setup("quick")
    hp = experiments.tuned(S, "resnet", "attention")     # {"lr": …}, chosen on validation
    recs = experiments.run_seeds(S, "resnet", "attention", w_bits=3, **hp)
    experiments.summarize(recs, ["arch", "rounding"])        # mean, std, count, seconds

A record is a plain dict (arch, rounding, w_bits, a_bits, seed, tau, lr, split, acc in %,
seconds, images, iters, device, plus any tags the caller adds), so lists of them go
straight into pandas.

The fair-comparison protocol (the introduction's "validation split"): every hyperparameter the book picks is picked by
:func:`select` on the validation split, never on the test split; :func:`tuned` applies it
to each learned method's learning rate, per model, at one stated setting, with the same
calibration images and iteration budget for every method. Selections are cached.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm

from qlib import cache, data, models, profiles, quant, report

FIXED_DETERMINISTIC = ("nearest", "floor", "ceil")  # the same result for every seed
SELECTION_VERSION = 1  # bump when a change to qlib alters what a cached selection means
RUN_VERSION = 1        # the same for cached run records


@dataclass
class Setup:
    """What a chapter quantizes and measures against: one profile's data, calibration
    images and trained float models with their test accuracy (%)."""
    profile: profiles.Profile
    train_set: TensorDataset
    val_set: TensorDataset
    test_set: TensorDataset
    calib: torch.Tensor
    float_models: dict[str, nn.Module]
    float_acc: dict[str, float]   # on the test split, %
    device: torch.device

    @property
    def quant(self) -> profiles.Quant:
        return self.profile.quant

    def split(self, name: str) -> TensorDataset:
        """The ``"val"`` or ``"test"`` split."""
        if name not in ("val", "test"):
            raise ValueError(f"split must be 'val' (selection) or 'test' (reported numbers), got {name!r}")
        return self.val_set if name == "val" else self.test_set

    def digest(self, what: str) -> str:
        """Content hash of the calibration images ("calib"), a split ("val", "test") or a
        float model ("model:<arch>") for cache keys, computed once per Setup: hashing the
        10k test images on every run would cost more than a cache hit saves."""
        memo = self.__dict__.setdefault("_digests", {})
        if what not in memo:
            if what == "calib":
                tensors = (self.calib,)
            elif what.startswith("model:"):
                tensors = tuple(self.float_models[what[len("model:"):]].state_dict().values())
            else:
                tensors = self.split(what).tensors
            memo[what] = cache.digest(*tensors)
        return memo[what]

    def run_settings(self) -> dict:
        """The settings every chapter states at its top (for glue)."""
        q = self.quant
        return {"profile": self.profile.name, "n_calib": q.calib_images, "iters": q.iters,
                "lr": q.lr, "act_lr": q.act_lr, "batch": q.batch_size,
                "device": models.describe_device(self.device), "seeds": ", ".join(map(str, q.seeds)),
                "n_val": len(self.val_set.tensors[1]), "n_test": len(self.test_set.tensors[1]),
                "lr_grid": ", ".join(f"{v:g}" for v in q.lr_grid), "tune_setting": quant.setting_name(q.tune_w_bits)}


def setup(profile: str = "quick", dataset: str = "fashion-mnist", archs=models.ARCHS,
          device: str | torch.device = "auto", quant_profile: str | None = None) -> Setup:
    """Load the data, draw the calibration set (seed 0, the profile's size), and load (or
    train once) and evaluate every float model. ``quant_profile`` quantizes the float
    models of ``profile`` with another profile's PTQ settings (e.g. quick models, paper
    calibration)."""
    p = profiles.get(profile)
    if quant_profile is not None:
        p = dataclasses.replace(p, quant=profiles.get(quant_profile).quant)
    train_set = data.load(dataset, "train")
    # a scaled profile's fixed random share of the held-out images (None: all of them)
    val_set = data.subset(data.load(dataset, "val"), p.val_subset)
    test_set = data.subset(data.load(dataset, "test"), p.test_subset)
    calib = data.calibration_set(train_set, n=p.quant.calib_images, seed=0)
    float_models = {a: models.pretrained(a, profile, dataset) for a in archs}
    S = Setup(p, train_set, val_set, test_set, calib, float_models, {}, models.resolve_device(device))
    for a, m in float_models.items():
        # cached under the weights' and the test images' hashes: every chapter starts with this
        # setup, and a 10k-image pass per model costs more than the rest of it
        path = cache.path_for("float_acc", {"model": S.digest(f"model:{a}"), "test": S.digest("test"),
                                            "device": S.device.type})
        hit = cache.load(path)
        if hit is None:
            hit = {"acc": 100 * models.evaluate(m, test_set, device=S.device)}
            cache.save(hit, path)
        S.float_acc[a] = float(hit["acc"])
    return S


def run(S: Setup, arch: str, rounding: str, w_bits, a_bits: int | None = None, *, seed: int = 0,
        split: str = "test", tags: dict | None = None, keep_model: bool = False, cache_record: bool = True,
        **overrides) -> dict:
    """Quantize one float model with the profile's settings (``overrides`` replace any of
    quantize()'s keyword arguments) and return its record, top-1 measured on ``split``; with
    ``keep_model`` the record also holds the quantized model under "model".

    Records are cached (``cache_record``) under a key covering the float weights, the
    calibration and evaluation images and every quantize() argument, so a later chapter that
    needs a run an earlier one made (chapter 7's recipe baselines are chapter 3's runs) reads
    it instead of calibrating again; its "seconds" are those of the run that made it, and
    "from_cache" says which it was (:func:`cost_note`)."""
    eval_set = S.split(split)
    kwargs = S.quant.kwargs(seed=seed, **overrides)
    spec = {"v": RUN_VERSION, "arch": arch, "rounding": rounding, "w_bits": w_bits, "a_bits": a_bits,
            "split": split, "kwargs": kwargs, "model": S.digest(f"model:{arch}"), "calib": S.digest("calib"),
            "eval": S.digest(split)}
    path = cache.path_for("run", spec)
    hit = cache.load(path) if cache_record and not keep_model else None
    if hit is not None:
        return {**(tags or {}), **hit, "from_cache": True}
    q = quant.quantize(S.float_models[arch], S.calib, w_bits=w_bits, a_bits=a_bits,
                       rounding=rounding, progress=False, **kwargs)
    rep = q.quant_report
    rec = {"arch": arch, "rounding": rounding,
           "w_bits": w_bits if isinstance(w_bits, int) else "mixed", "a_bits": a_bits or 32,
           "seed": seed, "tau": kwargs.get("tau", 0.5), "lr": kwargs["lr"], "split": split,
           "acc": 100 * models.evaluate(q, eval_set), "seconds": rep["seconds"],
           "images": rep["images"], "iters": rep["iters_per_module"], "device": rep["device"]}
    if cache_record:
        cache.save(rec, path)
    rec = {**(tags or {}), **rec, "from_cache": False}
    if keep_model:
        rec["model"] = q
    return rec


def cost_note(records: list[dict], wall_seconds: float) -> str:
    """What a table cost, honest about the cache: the calibration minutes its runs took when
    they were made (their stored "seconds"), how many were computed now and how many read
    from the cache, and this execution's wall time. A record without "from_cache" came out
    of another cached result (a selection) and counts as read."""
    n = len(records)
    if n == 0:
        raise ValueError("cost_note needs the table's records")
    made = sum(r.get("seconds", 0.0) for r in records) / 60
    fresh = sum(not r.get("from_cache", True) for r in records)
    every = "" if n == 1 else ("both " if n == 2 else f"all {n} ")
    where = (f"{every}computed in this run" if fresh == n else f"{every}read from the cache" if fresh == 0
             else f"{fresh} of {n} computed in this run, {n - fresh} read from the cache")
    runs = "its run was" if n == 1 else f"its {n} runs were"
    return (f"{made:.1f} minutes of calibration when {runs} made ({where}); "
            f"this execution took {wall_seconds / 60:.1f} minutes")


def run_seeds(S: Setup, arch: str, rounding: str, w_bits, a_bits: int | None = None, *,
              seeds=None, **kw) -> list[dict]:
    """:func:`run` once per seed (default: the profile's seeds); nearest, floor and ceil
    have no randomness and run once."""
    seeds = list(S.quant.seeds if seeds is None else seeds)
    if rounding in FIXED_DETERMINISTIC:
        seeds = seeds[:1]
    return [run(S, arch, rounding, w_bits, a_bits, seed=s, **kw) for s in seeds]


def needs_more_seeds(first: dict[str, float], nearest: float, float_acc: float,
                     margin: float = 1.0) -> bool:
    """Chapter 3's seed rule. ``first``: each learned method's accuracy (%) at the first
    seed. More seeds are run only where the methods land within ``margin`` points of each
    other (a single seed cannot tell them apart) *and* the setting is hard (nearest rounding
    loses at least ``margin`` points against float; otherwise every method sits at float
    level and there is nothing to resolve)."""
    accs = list(first.values())
    close = max(accs) - min(accs) < margin
    hard = float_acc - nearest >= margin
    return close and hard


def compare_setting(S: Setup, arch: str, w_bits, a_bits: int | None = None, *,
                    methods=quant.LEARNED, hparams: dict[str, dict] | None = None,
                    tags: dict | None = None, **kw) -> list[dict]:
    """Nearest rounding once, each learned method at the first seed, and the remaining
    seeds for all learned methods where :func:`needs_more_seeds` says so. ``hparams`` maps
    a method to its own keyword arguments (e.g. ``{"adaround": {"lr": 0.2}}``, from
    :func:`tuned`); ``kw`` go to every call."""
    def learned(m: str, seed: int) -> dict:
        return run(S, arch, m, w_bits, a_bits, seed=seed, tags=tags, **{**kw, **(hparams or {}).get(m, {})})

    seeds = list(S.quant.seeds)
    near = run(S, arch, "nearest", w_bits, a_bits, tags=tags, **kw)
    recs = [near] + [learned(m, seeds[0]) for m in methods]
    first = {r["rounding"]: r["acc"] for r in recs[1:]}
    if needs_more_seeds(first, near["acc"], S.float_acc[arch]):
        recs += [learned(m, s) for s in seeds[1:] for m in methods]
    return recs


# --- selection on the validation split ------------------------------------------------------

def select(S: Setup, arch: str, rounding: str, name: str, grid, *, w_bits, a_bits: int | None = None,
           seeds=(0,), split: str = "val", fixed: dict | None = None, use_cache: bool = True,
           progress: bool = True) -> dict:
    """Pick the value of one of quantize()'s hyperparameters (``name``, e.g. ``"lr"`` or
    ``"tau"``) from ``grid`` by top-1 on the **validation** split, averaged over ``seeds``;
    ``fixed`` holds the other keyword arguments. Ties go to the first grid value.

    Returns ``{"best": value, "grid": [...], "val_acc": [mean per value], "at_edge": bool,
    "records": [one per value and seed], ...}``; ``at_edge`` warns that the best value is
    the grid's first or last, so the grid may be too narrow. The result is cached under a
    key that covers the float model's weights, the calibration and validation images and
    every setting, so a later chapter reads the same selection."""
    if split != "val":
        raise ValueError(f"hyperparameters are selected on the validation split ('val'); got split={split!r}. "
                         "The test split is for reported numbers only.")
    grid, seeds, fixed = list(grid), list(seeds), dict(fixed or {})
    if not grid:
        raise ValueError(f"the grid for {name!r} is empty; give at least one value")
    if not seeds:
        raise ValueError("seeds is empty; give at least one quantization seed")
    if name in fixed or name == "seed":
        raise ValueError(f"{name!r} cannot be both selected and fixed")
    spec = {"v": SELECTION_VERSION, "rounding": rounding, "name": name, "grid": grid, "seeds": seeds,
            "w_bits": w_bits, "a_bits": a_bits, "fixed": fixed, "quant": S.quant.kwargs(),
            "model": S.digest(f"model:{arch}"), "calib": S.digest("calib"), "val": S.digest("val")}
    path = cache.path_for("selection", spec)
    hit = cache.load(path) if use_cache else None
    if hit is not None:
        return hit
    todo = [(v, s) for v in grid for s in seeds]
    bar = tqdm(todo, desc=f"select {name}: {arch} {rounding}", disable=not progress, leave=False)
    recs = [run(S, arch, rounding, w_bits, a_bits, seed=s, split="val", cache_record=use_cache,
                **{**fixed, name: v})
            for v, s in bar]
    for r, (v, _) in zip(recs, todo):
        r[name] = v
    means = [sum(r["acc"] for r in recs if r[name] == v) / len(seeds) for v in grid]
    k = max(range(len(grid)), key=lambda i: (means[i], -i))
    out = {"arch": arch, "rounding": rounding, "name": name, "best": grid[k], "grid": grid,
           "val_acc": means, "at_edge": len(grid) > 1 and k in (0, len(grid) - 1),
           "setting": quant.setting_name(w_bits, a_bits), "seeds": seeds, "records": recs}
    if use_cache:  # stored without "from_cache": a later read of the selection is a cache read
        cache.save({**out, "records": [{k: v for k, v in r.items() if k != "from_cache"} for r in recs]}, path)
    return out


def select_lr(S: Setup, arch: str, rounding: str, *, progress: bool = True) -> dict:
    """The fair-comparison protocol for one learned method on one model: its learning rate
    selected by :func:`select` from the profile's ``lr_grid`` on the validation split at
    W{tune_w_bits}A32, seeds ``tune_seeds``, everything else at the profile's settings (τ
    stays 0.5 for Attention Round; AdaRound keeps its own schedule). The full selection:
    the curve is chapter 3's sensitivity plot."""
    if rounding not in quant.LEARNED:
        raise ValueError(f"{rounding!r} has no learning rate; the tuned methods are {quant.LEARNED}")
    q = S.quant
    return select(S, arch, rounding, "lr", q.lr_grid, w_bits=q.tune_w_bits, seeds=q.tune_seeds,
                  progress=progress)


def tuned(S: Setup, arch: str, rounding: str, *, progress: bool = True) -> dict:
    """quantize()'s keyword arguments that the protocol selected for ``rounding`` on
    ``arch``: ``{"lr": best}`` from :func:`select_lr` for a learned method, ``{}`` for the
    fixed rules (nothing to tune). Pass them on: ``run(S, arch, r, 3, **tuned(S, arch, r))``."""
    if rounding not in quant.LEARNED:
        return {}
    return {"lr": select_lr(S, arch, rounding, progress=progress)["best"]}


# --- tables ------------------------------------------------------------------------------

def fmt_mean_std(mean: float, std: float, n: int, digits: int = 2, show_n: bool = True) -> str:
    """"90.12 ± 0.05 (3)" over several seeds, "90.12" for one."""
    if n > 1 and not math.isnan(std):
        return f"{mean:.{digits}f} ± {std:.{digits}f}" + (f" ({n})" if show_n else "")
    return f"{mean:.{digits}f}"


def summarize(records: list[dict], by: list[str], value: str = "acc"):
    """One row per group: mean, std and count of ``value`` over seeds, mean seconds."""
    import pandas as pd

    df = pd.DataFrame(records)
    g = df.groupby(by, sort=False)
    out = g[value].agg(["mean", "std", "count"])
    if "seconds" in df:
        out = out.join(g["seconds"].mean().rename("seconds"))
    return out.reset_index()


def results_table(records: list[dict], float_acc: dict[str, float],
                  index=("arch", "w_bits", "a_bits"), column: str = "rounding",
                  order=("nearest", "adaround", "attention"), seconds_of: str | None = "attention",
                  show_n: bool = True):
    """A wide table: one row per setting, one column per method as "mean ± std (n)", the
    float accuracy first and, if ``seconds_of``, that method's mean seconds per run last."""
    s = summarize(records, [*index, column])
    s["cell"] = [fmt_mean_std(m, sd, int(n), show_n=show_n) for m, sd, n in zip(s["mean"], s["std"], s["count"])]
    wide = s.pivot_table(index=list(index), columns=column, values="cell", aggfunc="first", sort=False)
    wide = wide[[c for c in order if c in wide.columns]]
    wide.insert(0, "float", [f"{float_acc[key[0]]:.2f}" for key in wide.index])
    if seconds_of is not None:
        secs = s[s[column] == seconds_of].set_index(list(index))["seconds"]
        wide[f"{models.display_name(seconds_of)} s/run"] = secs.round(1).astype(str)
    return wide


def verdicts(records: list[dict], a: str, b: str, by=("arch", "w_bits", "a_bits"),
             column: str = "rounding", names: tuple[str, str] | None = None,
             pool_over=None) -> "pd.DataFrame":  # noqa: F821
    """For every setting (``by``, which starts with "arch"), the ``column`` value ``a``
    against ``b`` (two methods, or two configurations) by :func:`qlib.report.verdict`: the
    difference of means, its 95% half-width from the seed-to-seed spread pooled over every
    setting of the model for the ``column`` values ``pool_over`` (default: ``a`` and ``b``;
    leave out deterministic ones such as nearest rounding, whose spread is 0), and
    "<a> better" / "<b> better" / "tie", with ``names`` (default: their display names) in
    the words; ``a``'s and ``b``'s means beside it."""
    import pandas as pd

    if by[0] != "arch":
        raise ValueError(f"verdicts pools the seed spread per model: `by` must start with 'arch', got {by}")
    names = names or (models.display_name(a), models.display_name(b))
    s = summarize(records, [*by, column])
    both = s[s[column].isin(list(pool_over) if pool_over is not None else [a, b])]
    spread = {arch: report.pooled_sd(g["std"], g["count"]) for arch, g in both.groupby("arch", sort=False)}
    rows = []
    for key, g in s.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        ra, rb = (g[g[column] == m].iloc[0] for m in (a, b))
        sd, df = spread[key[0]]
        half, word = report.verdict(ra["mean"], rb["mean"], int(ra["count"]), int(rb["count"]), sd, df,
                                    names=names)
        rows.append({**dict(zip(by, key)), "seeds": int(ra["count"]), a: ra["mean"], b: rb["mean"],
                     f"{a} − {b}": ra["mean"] - rb["mean"], "± 95%": half, "pooled seed sd": sd,
                     "verdict": word})
    return pd.DataFrame(rows)
