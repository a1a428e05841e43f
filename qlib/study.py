"""Chapters 5–7's harness, as :mod:`qlib.experiments` is chapter 3's: everything that needs a
profile's :class:`~qlib.experiments.Setup` — its labelled populations and their split, the
probe-set counts chapter 7 re-bins, predictors trained on the pooled architectures, and
chapter 5's trained predictor — built from :mod:`qlib.population`, :mod:`qlib.tokens` and
:mod:`qlib.predictor`, and cached::

    S = experiments.setup("quick")
    pops = study.populations(S)                      # every architecture, labelled and split
    model, hist = study.fit_pooled(pops)             # the encoder on the pooled training configs
    trained = study.trained_predictor("resnet")      # chapter 5's, with its probe set and ranges
    predictor.predict(trained, qmodel)               # predicted top-1 of any quantized ResNet
"""
from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qlib import baselines, cache, experiments, models, parallel, population, predictor, quant, record, tokens
from qlib.experiments import Setup
from qlib.graph import fold_bn

PARTS = ("train", "val", "test")


def learned_kwargs(S: Setup, arch: str) -> dict[str, dict]:
    """Each learned rounding's calibration settings for ``arch``: the profile's, with the
    learning rate chapter 3 selected on validation."""
    q = S.quant
    return {r: {"iters": q.iters, "batch_size": q.batch_size, "act_lr": q.act_lr,
                "lr": experiments.tuned(S, arch, r, progress=False).get("lr", q.lr)}
            for r in quant.LEARNED}


def configs(S: Setup, arch: str) -> list[dict]:
    """The population's configurations: one sensitivity probe per middle layer, then the
    profile's sampled configurations."""
    ps, model = S.profile.predictor, S.float_models[arch]
    return population.sensitivity_configs(arch, model) + population.sample_configs(
        arch, model, ps.configs, seed=ps.seed, learned_share=ps.learned_share,
        learned_kwargs=learned_kwargs(S, arch))


def record_spec(S: Setup, arch: str) -> dict:
    """What a shipped population record of ``arch`` must have been built for (:mod:`qlib.record`):
    the population VERSION, the float weights, calibration and test images, the probe set,
    the histogram settings and the sampler's settings. Not the configurations themselves:
    the record's are authoritative (a learned rounding's lr in them is the one chapter 3
    selected on the machine that built the record; another machine might select another)."""
    ps = S.profile.predictor
    pidx = population.probe_indices(len(S.test_set.tensors[0]), ps.probe_images)
    return {"version": population.VERSION, "arch": arch, "profile": S.profile.name,
            "float": S.digest(f"model:{arch}"), "calib": S.digest("calib"), "test": S.digest("test"),
            "probe": pidx.tolist(), "bins": ps.bins, "stride": ps.full_stride,
            "sampler": {"configs": ps.configs, "seed": ps.seed, "learned_share": ps.learned_share}}


def population_of(S: Setup, arch: str, *, progress: bool = True, shipped: bool = True) -> dict:
    """The labelled population of ``arch`` for ``S``'s profile: the profile's shipped record
    if it has one (``shipped``; :mod:`qlib.record`), else from the cache or built (with a
    progress bar) and saved atomically. Returns ``records`` (one dict per configuration,
    see :func:`qlib.population.label`), ``float`` (the float model's own measurements),
    ``probe_idx``, ``ranges``, ``bins``, ``stride`` and ``seconds`` (labelling time)."""
    ps = S.profile.predictor
    pidx = population.probe_indices(len(S.test_set.tensors[0]), ps.probe_images)
    if shipped:
        hit = record.population(S.profile.name, arch, record_spec(S, arch))
        if hit is not None:
            return hit
        if ps.shipped:
            raise record.RecordError(
                f"the {S.profile.name} profile reads its {arch} population from {record.directory(S.profile.name)}, "
                "which has none: restore it from git or build it (hours on two cores): "
                + record.REBUILD.format(profile=S.profile.name))
    cfgs = configs(S, arch)
    spec = {**record_spec(S, arch), "configs": cache.key({"c": [population.config_key(c) for c in cfgs]})}
    path = cache.path_for("population", spec)
    hit = cache.load(path)
    if hit is not None:
        return hit
    pop = _label_population(S, arch, cfgs, pidx, progress)
    cache.save(pop, path)
    return pop


def _label_population(S: Setup, arch: str, cfgs: list[dict], pidx: torch.Tensor, progress: bool) -> dict:
    ps, model = S.profile.predictor, S.float_models[arch]
    images, labels = S.test_set.tensors
    probe, probe_labels = images[pidx], labels[pidx]
    start = time.perf_counter()
    folded = fold_bn(model).eval()
    ranges = tokens.float_ranges(model, probe)
    fl_full = tokens.histogram_pass(folded, images, ps.bins, ranges, stride=ps.full_stride, labels=labels)
    fl_probe = tokens.histogram_pass(folded, probe, ps.bins, ranges, labels=probe_labels)
    float_seconds = time.perf_counter() - start
    records, _ = population.label_all(cfgs, model, folded, S.calib, S.test_set, probe, fl_probe["preds"],
                                      probe_labels, ranges, ps.bins, ps.full_stride, progress=progress,
                                      desc=f"labelling {arch}")
    # labelling time: the float passes now plus each record's own cost, so a build that
    # resumed after an interruption reports what the population cost, not what was left
    seconds = float_seconds + sum(r["seconds"] for r in records)
    return {"arch": arch, "records": records, "probe_idx": pidx, "ranges": {k: list(v) for k, v in ranges.items()},
            "bins": ps.bins, "stride": ps.full_stride, "seconds": seconds,
            "float": {"acc": 100 * int((fl_full["preds"] == labels).sum()) / len(labels),
                      "probe_acc": fl_probe["acc"], "tokens_full": fl_full["tokens"],
                      "correct_full": fl_full["preds"] == labels,
                      "tokens_probe": fl_probe["tokens"], "probe_preds": fl_probe["preds"]}}


def label_extra(S: Setup, arch: str, cfgs: list[dict], *, progress: bool = True) -> list[dict]:
    """Records for configurations outside ``arch``'s population (e.g.
    :func:`qlib.population.stress_configs`), measured exactly as the population's were: the
    same probe images, bin ranges, bins and stride; each record cached."""
    pop = population_of(S, arch, progress=False)
    model = S.float_models[arch]
    images, labels = S.test_set.tensors
    pidx = pop["probe_idx"]
    ranges = {k: tuple(v) for k, v in pop["ranges"].items()}
    recs, _ = population.label_all(cfgs, model, fold_bn(model).eval(), S.calib, S.test_set, images[pidx],
                                   pop["float"]["probe_preds"], labels[pidx], ranges, pop["bins"], pop["stride"],
                                   progress=progress, desc=f"labelling {arch} (extra)")
    return recs


@dataclass
class Populations:
    """Every architecture's labelled population for one Setup, split by configuration
    (:func:`qlib.population.split`: the profile's fractions and grouping, ``split_seed``)."""
    S: Setup
    pops: dict[str, dict]                      # arch → population_of(S, arch)
    index: dict[str, dict[str, list[int]]]     # arch → "train" | "val" | "test" → record indices
    split_seed: int = 0

    @property
    def archs(self) -> list[str]:
        return list(self.pops)

    def records(self, arch: str, part: str | None = None) -> list[dict]:
        """``arch``'s records in ``part`` (in the split's order), or all of them."""
        recs = self.pops[arch]["records"]
        return recs if part is None else [recs[i] for i in self.index[arch][part]]

    def float_ref(self, arch: str) -> dict:
        """The float model's measurements (``acc`` on the test set, ``probe_acc``, tokens)."""
        return self.pops[arch]["float"]

    def labels(self, part: str, archs=None) -> np.ndarray:
        """Top-1 (%) of ``part``'s records, pooled over ``archs`` (default: all) in order."""
        return np.concatenate([baselines.labels(self.records(a, part)) for a in (archs or self.archs)])

    def arch_of(self, part: str) -> np.ndarray:
        """The architecture of each pooled record of ``part``, aligned with :meth:`labels`."""
        return np.array([a for a in self.archs for _ in self.index[a][part]])

    def resplit(self, split_seed: int) -> "Populations":
        """The same populations under another split seed (same fractions and grouping)."""
        ps = self.S.profile.predictor
        return Populations(self.S, self.pops, {a: population.split(p["records"], ps.split, split_seed, group=ps.group)
                                               for a, p in self.pops.items()}, split_seed)

    def subset(self, sizes: dict[str, int] | None, roundings=quant.FIXED, seed: int = 0) -> "Populations":
        """At most ``sizes[part]`` records per architecture and part, drawn (seeded) among
        those with one of ``roundings``: for chapters that rebuild a model per record (a
        fixed rounding rebuilds in a tenth of a second; a learned one is a calibration).
        ``sizes`` None: these populations unchanged."""
        if sizes is None:
            return self
        rng = np.random.default_rng(seed)
        index = {}
        for a in self.archs:
            index[a] = {}
            for part, n in sizes.items():
                ok = [i for i in self.index[a][part] if self.pops[a]["records"][i]["config"]["rounding"] in roundings]
                index[a][part] = sorted(rng.permutation(ok)[:n].tolist())
        return Populations(self.S, self.pops, index, self.split_seed)


def populations(S: Setup, *, progress: bool = True, split_seed: int | None = None) -> Populations:
    """:func:`population_of` for every float model of ``S``, split by configuration (the
    profile's split seed unless ``split_seed``)."""
    ps = S.profile.predictor
    pops = {a: population_of(S, a, progress=progress) for a in S.float_models}
    return Populations(S, pops, {}, 0).resplit(ps.seed if split_seed is None else split_seed)


def quantized(S: Setup, arch: str, record: dict) -> nn.Module:
    """A record's quantized model, loaded from where labelling saved it (built if missing)."""
    return population.quantized(record["config"], S.float_models[arch], S.calib,
                                digests=(S.digest(f"model:{arch}"), S.digest("calib")))


def paired_estimate(pops: Populations, arch: str, i: int) -> float:
    """Record ``i`` of ``arch``: the float model's exact top-1 plus the quantized − float
    difference on the probe images (:func:`qlib.baselines.paired`)."""
    return paired_of(pops, arch, pops.pops[arch]["records"][i])


def paired_of(pops: Populations, arch: str, rec: dict) -> float:
    """:func:`paired_estimate` of any record measured on ``arch``'s probe images (e.g. from
    :func:`label_extra`)."""
    return float(baselines.paired([rec], pops.float_ref(arch))[0])


def fit_pooled(pops: Populations, *, source: str | Callable[[str, int], torch.Tensor] = "tokens_probe",
               archs=None, train_index: dict[str, list[int]] | None = None, desc: str = "predictor",
               progress: bool = True, residual: bool = False, **overrides) -> tuple[predictor.AccuracyPredictor, dict]:
    """Chapter 5's encoder training on the pooled training configurations of ``archs``
    (default: all), early-stopped on their validation configurations, with the profile's
    settings and ``overrides`` (e.g. ``seed=1``, ``position_encoding=False``). ``source``:
    the record key of the tokens, or ``source(arch, record_index)`` for tokens made
    otherwise (chapter 7);
    ``train_index``: per architecture, the training records to use (default: all);
    ``residual``: learn the label minus the paired estimate (:func:`paired_estimate`), a
    correction the model adds back at prediction."""
    get = _token_getter(pops, source)
    archs = list(archs or pops.archs)

    def xy(pick):
        idx = [(a, i) for a in archs for i in pick(a)]
        base = [paired_estimate(pops, a, i) if residual else 0.0 for a, i in idx]
        return [get(a, i) for a, i in idx], [pops.pops[a]["records"][i]["acc"] - b for (a, i), b in zip(idx, base)]

    train = xy(lambda a: (train_index or {}).get(a, pops.index[a]["train"]))
    val = xy(lambda a: pops.index[a]["val"])
    model, hist = predictor.fit(train, val, progress=progress,
                                **pops.S.profile.predictor.fit_kwargs(_target(residual), desc=desc, **overrides))
    model.residual.fill_(int(residual))
    return model, hist


def _token_getter(pops: Populations, source) -> Callable[[str, int], torch.Tensor]:
    if isinstance(source, str):
        return lambda a, i: pops.pops[a]["records"][i][source]
    return source


def predict_part(model: predictor.AccuracyPredictor, pops: Populations, part: str = "test", *,
                 source: str | Callable[[str, int], torch.Tensor] = "tokens_probe", archs=None) -> np.ndarray:
    """``model``'s predictions for ``part``'s records (tokens from ``source``, as in
    :func:`fit_pooled`), pooled in :meth:`Populations.labels` order."""
    get = _token_getter(pops, source)
    idx = [(a, i) for a in (archs or pops.archs) for i in pops.index[a][part]]
    base = [paired_estimate(pops, a, i) for a, i in idx] if int(model.residual) else None
    return predictor.predict_tokens(model, [get(a, i) for a, i in idx], base=base)


def train_subset(pops: Populations, arch: str, share: float) -> list[int]:
    """The first ``share`` of a fixed shuffle of ``arch``'s training records (at least two):
    nested across shares, so a learning curve adds configurations rather than redraws them."""
    tr = pops.index[arch]["train"]
    order = np.random.default_rng(0).permutation(len(tr))
    return [tr[k] for k in order[: max(2, round(share * len(tr)))]]


CHEAP = ("training mean", "probe top-1", "paired probe", "ridge: agreement + bits", "ridge: weights only")
#: the encoder's two targets: the preprint's top-1, or a correction to the paired probe estimate
TARGETS = {"top-1": False, "residual": True}


def _target(residual: bool) -> str:
    return next(t for t, r in TARGETS.items() if r == bool(residual))


def _settings_spec(ps) -> dict:
    return {t: ps.fit_kwargs(t) for t in TARGETS}


def smallest_within_one_se(rows: list[dict]) -> dict:
    """A variant of the one-standard-error rule (Hastie, Tibshirani & Friedman, ESL §7.10) over
    a grid of encoder fits: among the rows (``val_mae`` and ``val_mae_std`` over ``n`` fitting
    seeds, ``val_mae_seeds``) whose validation MAE is within one standard error of the best,
    the cheapest: fewest blocks, then narrowest, then lowest MAE. ESL takes the best model's
    own standard error; with two seeds per point that is itself too noisy, so here it is the
    seed-to-seed std averaged over the grid (a mean of stds: one diverged fit does not
    dominate it), over √n. A grid point that is better only by noise does not buy a slower
    encoder."""
    if len(rows[0]["val_mae_seeds"]) < 2:
        raise ValueError("the one-standard-error rule needs at least two fitting seeds per grid point")
    best = min(r["val_mae"] for r in rows)
    se = float(np.mean([r["val_mae_std"] for r in rows])) / np.sqrt(len(rows[0]["val_mae_seeds"]))
    return min((r for r in rows if r["val_mae"] <= best + se),
               key=lambda r: (r["layers"], r["d_model"], r["val_mae"]))


def cheap_predictions(pops: Populations, arch: str, part: str = "test") -> dict[str, np.ndarray]:
    """The estimates an accuracy predictor must beat (:mod:`qlib.baselines`, names in
    ``CHEAP``) for ``arch``'s ``part`` records, each fitted on the training records and
    tuned on the validation ones."""
    tr, va, te = (pops.records(arch, p) for p in ("train", "val", part))
    return {"training mean": baselines.train_mean(tr, te),
            "probe top-1": baselines.probe_top1(te),
            "paired probe": baselines.paired(te, pops.float_ref(arch)),
            "ridge: agreement + bits": baselines.ridge(tr, va, te, "agree", pops.float_ref(arch))[0],
            "ridge: weights only": baselines.ridge(tr, va, te, "weights")[0]}


def _data_key(pops: Populations) -> str:
    # the labels and what the tokens were measured with (bins, probe set, stride, float weights)
    return cache.key({a: [[r["acc"] for r in p["records"]], record_spec(pops.S, a)] for a, p in pops.pops.items()})


def _split_spec(pops: Populations) -> list:
    ps = pops.S.profile.predictor
    return [list(ps.split), ps.group, pops.split_seed]


def encoder_settings(pops: Populations, *, progress: bool = True) -> dict:
    """The encoder's learning rate and loss for each target of ``TARGETS``, chosen by
    validation MAE on ``pops``'s split (fitting seed: the profile's) over the profile's
    ``lr_grid`` × ``loss_grid``. Returns ``chosen`` ({target: {"lr", "loss"}}), ``table`` (one
    row per grid point: validation MAE, epochs, seconds) and ``state`` (each target's chosen
    fit, a state dict: :func:`trained_predictor` reuses it). Cached."""
    ps = pops.S.profile.predictor
    spec = {"version": population.VERSION, "data": _data_key(pops), "settings": _settings_spec(ps),
            "grid": [list(ps.lr_grid), list(ps.loss_grid)], "split": _split_spec(pops)}
    path = cache.path_for("encoder_settings", spec)
    hit = cache.load(path)
    if hit is not None:
        return hit
    grid = [(target, lr, loss) for target in TARGETS for lr in ps.lr_grid for loss in ps.loss_grid]
    fits = parallel.map_forked([functools.partial(_fit_for_settings, pops, TARGETS[t], lr=lr, loss=loss)
                                for t, lr, loss in grid], desc="encoder settings", progress=progress)
    rows, state = [], {}
    for target in TARGETS:
        best = None
        for (t, lr, loss), (h, sd) in zip(grid, fits):
            if t != target:
                continue
            rows.append({"target": target, "lr": lr, "loss": loss, "val_mae": h["best_val_mae"],
                         "epochs": h["epochs_run"], "seconds": h["seconds"], "curve": h["val_mae"],
                         "best_epoch": h["best_epoch"]})
            if best is None or h["best_val_mae"] < best[0]:
                best = (h["best_val_mae"], {"lr": lr, "loss": loss}, {k: torch.from_numpy(v) for k, v in sd.items()})
        state[target] = best[2]
        rows_t = [r for r in rows if r["target"] == target]
        for r in rows_t:
            r["chosen"] = (r["lr"], r["loss"]) == (best[1]["lr"], best[1]["loss"])
    out = {"chosen": {t: next({"lr": r["lr"], "loss": r["loss"]} for r in rows if r["target"] == t and r["chosen"])
                      for t in TARGETS}, "table": rows, "state": state}
    cache.save(out, path)
    return out


def evaluate(S: Setup, *, progress: bool = True) -> dict:
    """Chapter 5's protocol: for each of the profile's ``split_seeds``, every cheap baseline
    (:func:`cheap_predictions`, once: they have no seed), the MLP on the pooled tokens and
    the encoder for each target of ``TARGETS`` (settings from :func:`encoder_settings` on
    the first split), each for every one of the profile's ``fit_seeds``, predicting the test
    configurations. Returns ``runs`` (per split: ``split_seed``, ``y`` and ``arch`` of the
    pooled test records, ``preds`` {method: [one array per fitting seed]}, ``val_mae``
    {cheap method: validation MAE, to choose the strongest on validation}, ``mlp`` (its
    chosen size and decay)), ``settings`` (:func:`encoder_settings`) and ``seconds``. Cached."""
    ps = S.profile.predictor
    if ps.split_seeds[0] != ps.seed or ps.seed not in ps.fit_seeds:
        raise ValueError("the profile's seed must be its first split seed and one of its fitting seeds: "
                         "the trained predictor is the protocol's first split at that seed")
    base = populations(S, progress=progress, split_seed=ps.split_seeds[0])
    settings = encoder_settings(base, progress=progress)
    spec = {"version": population.VERSION, "data": _data_key(base), "settings": _settings_spec(ps),
            "chosen": settings["chosen"], "split": [list(ps.split), ps.group, list(ps.split_seeds)],
            "fit_seeds": list(ps.fit_seeds), "mlp": [list(baselines.POOLED_MLP_GRID), baselines.MLP_EPOCHS], "cheap": list(CHEAP)}
    path = cache.path_for("evaluation", spec)
    hit = cache.load(path)
    if hit is not None:
        return hit
    start = time.perf_counter()
    runs, jobs = [], []
    for k in ps.split_seeds:
        P = base.resplit(k)
        cheap = {a: cheap_predictions(P, a) for a in P.archs}
        cheap_val = {a: cheap_predictions(P, a, "val") for a in P.archs}
        y_val = P.labels("val")
        preds = {m: [np.concatenate([cheap[a][m] for a in P.archs])] for m in CHEAP}
        val_mae = {m: float(np.abs(np.concatenate([cheap_val[a][m] for a in P.archs]) - y_val).mean()) for m in CHEAP}
        parts = [{a: P.records(a, part) for a in P.archs} for part in PARTS]
        preds["MLP on tokens (pooled)"], mlp_info = [], None
        for seed in tqdm(ps.fit_seeds, desc=f"MLP, split {k}", leave=False, disable=not progress):
            p, info = baselines.mlp_pooled(*parts, seed=seed, grid=None if mlp_info is None else
                                           ((mlp_info["hidden"], mlp_info["alpha"]),))
            mlp_info = mlp_info or info
            preds["MLP on tokens (pooled)"].append(p)
        runs.append({"split_seed": k, "y": P.labels("test"), "arch": P.arch_of("test").tolist(), "preds": preds,
                     "val_mae": val_mae, "mlp": mlp_info})
        for target, residual in TARGETS.items():
            preds[f"encoder ({target})"] = [None] * len(ps.fit_seeds)
            for j, seed in enumerate(ps.fit_seeds):
                if k == ps.split_seeds[0] and seed == ps.seed:  # the selection's own fit
                    m = _predictor_from_state(ps, settings["state"][target], target)
                    preds[f"encoder ({target})"][j] = predict_part(m, P)
                else:
                    jobs.append((len(runs) - 1, target, j, functools.partial(
                        _fit_and_predict, P, residual, seed=seed, **settings["chosen"][target])))
    # the encoder fits, independent of one another: side by side, one per core
    done = parallel.map_forked([job[-1] for job in jobs], desc="encoder fits", progress=progress)
    for (r, target, j, _), pred in zip(jobs, done):
        runs[r]["preds"][f"encoder ({target})"][j] = pred
    out = {"runs": runs, "settings": settings, "seconds": time.perf_counter() - start}
    cache.save(out, path)
    return out


def _fit_for_settings(pops: Populations, residual: bool, **fit) -> tuple[dict, dict]:
    """:func:`fit_pooled`'s history and the model's state as NumPy arrays (they come back
    from a worker pickled by value)."""
    model, hist = fit_pooled(pops, residual=residual, progress=False, **fit)
    return hist, {k: v.numpy() for k, v in model.state_dict().items()}


def _fit_and_predict(pops: Populations, residual: bool, **fit) -> np.ndarray:
    """:func:`fit_pooled` (no progress bar: it may run in a worker) and the fit's test predictions."""
    model, _ = fit_pooled(pops, residual=residual, progress=False, **fit)
    return predict_part(model, pops)


def _runs_of(ev: dict, method: str):
    """(split seed, fitting seed index, y, arch, prediction) for every run of ``method``."""
    for run in ev["runs"]:
        for j, p in enumerate(run["preds"][method]):
            yield run["split_seed"], j, run["y"], np.asarray(run["arch"]), p


def run_scores(ev: dict, float_acc: dict[str, float]) -> "pd.DataFrame":  # noqa: F821
    """One row per method and run (split × fitting seed) of :func:`evaluate`: MAE, RMSE,
    bias, largest error and Spearman on the pooled test configurations, and MAE within
    :data:`qlib.report.BAND_POINTS` of float, overall and per architecture."""
    import pandas as pd
    from scipy import stats

    from qlib import report

    import warnings

    rows = []
    with warnings.catch_warnings():  # a constant prediction has no rank: its Spearman is NaN
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        for m in ev["runs"][0]["preds"]:
            for k, j, y, arch, p in _runs_of(ev, m):
                near = report.near_float([float_acc[a] for a in arch], y)
                err = p - y
                row = {"method": m, "split": k, "seed": j, "MAE": np.abs(err).mean(),
                       "RMSE": np.sqrt((err ** 2).mean()), "bias": err.mean(), "max": np.abs(err).max(),
                       "Spearman": stats.spearmanr(y, p).statistic, "MAE within band": np.abs(err[near]).mean()}
                for a in dict.fromkeys(arch):
                    sel = near & (arch == a)
                    row[f"{a} MAE within band"] = np.abs(err[sel]).mean()
                    row[f"{a} Spearman within band"] = stats.spearmanr(y[sel], p[sel]).statistic
                rows.append(row)
    return pd.DataFrame(rows)


def versus_runs(ev: dict, a: str, b: str, float_acc: dict[str, float] | None = None) -> dict:
    """Method ``a`` against ``b`` on every run of :func:`evaluate` (fitting seed j of ``a``
    against seed j of ``b``, or against ``b``'s one prediction when it has no seed): each
    run's :func:`qlib.report.mae_verdict`, and one verdict that every run agrees with
    (:func:`qlib.report.seed_proof`). ``float_acc``: compare only the configurations within
    the band of float. Returns ``diff`` (mean over runs of MAE(a) − MAE(b)), ``std``,
    ``low``/``high`` (the widest bootstrap bounds over runs: an interval that includes the
    spread over seeds and splits), ``verdict`` and ``runs``."""
    from qlib import report

    bs = {(k, j): p for k, j, *_, p in _runs_of(ev, b)}
    out = []
    for k, j, y, arch, p in _runs_of(ev, a):
        q = bs.get((k, j), bs.get((k, 0)))
        keep = (report.near_float([float_acc[x] for x in arch], y) if float_acc else np.ones(len(y), bool))
        out.append(report.mae_verdict(y[keep], p[keep], q[keep], n_boot=1000))
    d = np.array([v["diff"] for v in out])
    return {"diff": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "low": min(v["low"] for v in out), "high": max(v["high"] for v in out),
            "verdict": report.seed_proof(out), "runs": len(out)}


def _predictor_from_state(ps, state: dict, target: str) -> predictor.AccuracyPredictor:
    size = ps.size(target)
    m = predictor.AccuracyPredictor(2 * ps.bins, size["d_model"], size["heads"], size["layers"])
    m.load_state_dict(state)
    return m.eval()


def probe_counts(S: Setup, arch: str, bins: int, keep: tuple[int, ...], indices=None) -> dict:
    """Chapter 7: configurations of ``arch``'s population (records ``indices``, default all)
    histogrammed on the probe images at ``bins`` bins, keeping the raw counts after the
    first n probe images for each n in ``keep``, so :func:`qlib.tokens.tokens_from_counts`
    gives the tokens at any probe size in ``keep`` and any bin count dividing ``bins``, from
    one pass per model (models rebuilt, result cached). Returns ``counts`` ({record index:
    {n: L × bins}}) and ``values_per_image``."""
    pop = population_of(S, arch, progress=False)
    indices = list(range(len(pop["records"]))) if indices is None else [int(i) for i in indices]
    spec = {"version": population.VERSION, "arch": arch, "bins": bins, "keep": list(keep),
            "probe": pop["probe_idx"].tolist(),
            "configs": cache.key({"c": [population.config_key(pop["records"][i]["config"]) for i in indices]}),
            "calib": S.digest("calib"), "float": S.digest(f"model:{arch}")}
    path = cache.path_for("probe_counts", spec)
    hit = cache.load(path)
    if hit is not None:
        return hit
    probe = S.test_set.tensors[0][pop["probe_idx"]]
    ranges = {k: tuple(v) for k, v in pop["ranges"].items()}

    def count(chunk: list[int]) -> list[tuple[int, dict, dict]]:
        out = []
        for i in chunk:
            q = quantized(S, arch, pop["records"][i])
            quant.freeze(q)
            h = tokens.histogram_pass(q, probe, bins, ranges, keep_counts=tuple(keep))
            out.append((i, {n: c.numpy() for n, c in h["counts"].items()}, h["values_per_image"]))
        return out

    # independent models: side by side, one per core, in chunks of 10 (fewer round trips)
    chunks = [indices[j:j + 10] for j in range(0, len(indices), 10)]
    done = parallel.map_forked([lambda c=c: count(c) for c in chunks], desc=f"probe histograms {arch}")
    counts = {i: {n: torch.from_numpy(c) for n, c in cs.items()} for part in done for i, cs, _ in part}
    vpi = done[-1][-1][2] if done else None
    res = {"counts": counts, "values_per_image": vpi}
    cache.save(res, path)
    return res


def trained_predictor(arch: str, profile: str = "quick", *, residual: bool | None = None,
                      progress: bool = True) -> dict:
    """Chapter 5's predictor for ``arch`` with everything :func:`qlib.predictor.predict` needs:
    ``model`` (one AccuracyPredictor on probe-image tokens, trained on all three
    architectures' training configurations of the profile's split, with the settings
    :func:`encoder_settings` chose), ``history`` (its validation MAE), ``probe`` (the probe
    images) and their labels, the float model's test and probe top-1 and probe predictions,
    ``val_abs_err`` (its absolute errors on ``arch``'s validation configurations), ``ranges``, ``bins``.
    ``residual``: a correction to the paired probe estimate, or the preprint's direct
    regression (default: the profile's choice). Built (populations read or labelled,
    predictor trained) if not cached."""
    S = experiments.setup(profile)
    if arch not in S.float_models:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {list(S.float_models)}")
    ps = S.profile.predictor
    residual = ps.residual if residual is None else residual
    target = _target(residual)
    pops = populations(S, progress=progress)
    settings = encoder_settings(pops, progress=progress)
    row = next(r for r in settings["table"] if r["target"] == target and r["chosen"])
    pop = pops.pops[arch]
    images, labels = S.test_set.tensors
    model = _predictor_from_state(ps, settings["state"][target], target)
    # its error on this architecture's validation configurations: the interval a user of
    # predict() can put around one prediction (the bit-list picker does)
    val_err = np.abs(predict_part(model, pops, "val", archs=[arch]) - pops.labels("val", archs=[arch]))
    return {"model": model, "target": target, "val_abs_err": val_err,
            "settings": settings["chosen"][target], "history": {"best_val_mae": row["val_mae"], "val_mae": row["curve"],
                                                                 "best_epoch": row["best_epoch"],
                                                                 "epochs_run": row["epochs"], "seconds": row["seconds"]},
            "probe": images[pop["probe_idx"]], "probe_labels": labels[pop["probe_idx"]],
            "float_acc": pop["float"]["acc"], "float_probe_acc": pop["float"]["probe_acc"],
            "float_probe_preds": pop["float"]["probe_preds"],
            "ranges": {k: tuple(v) for k, v in pop["ranges"].items()}, "bins": pop["bins"], "arch": arch}


def build_record(profile: str = "quick", archs=models.ARCHS, *, configs_per_arch: int | None = None,
                 progress: bool = True) -> dict:
    """Label ``profile``'s populations live (resuming from every configuration already
    cached) and write them, with the float checkpoints they were labelled on, into the
    profile's shipped record (:mod:`qlib.record`). ``configs_per_arch`` other than the
    profile's own count writes ``populations/<profile>-<N>configs/`` instead, a record no
    profile reads (a trial build never overwrites the one the chapters use). Returns the
    manifest."""
    import dataclasses
    import platform
    import subprocess
    from datetime import datetime, timezone

    S = experiments.setup(profile)
    target = profile
    if configs_per_arch is not None and configs_per_arch != S.profile.predictor.configs:
        p = S.profile
        S = dataclasses.replace(S, profile=dataclasses.replace(
            p, predictor=dataclasses.replace(p.predictor, configs=configs_per_arch)))
        target = f"{profile}-{configs_per_arch}configs"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=record.ROOT.parent, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    man = {}
    for arch in archs:
        start = time.perf_counter()
        pop = population_of(S, arch, progress=progress, shipped=False)
        man = record.write(target, {f"float_{arch}.pt": models.checkpoint(arch, profile),
                                    f"{arch}.pt": record.pack(pop, record_spec(S, arch))}, {
            "qlib_population_version": population.VERSION,
            "archs": {arch: {"configs": len(pop["records"]), "float_acc": pop["float"]["acc"],
                             "label_seconds": round(pop["seconds"], 1),
                             "wall_seconds": round(time.perf_counter() - start, 1),
                             "torch": torch.__version__, "device": models.describe_device(S.device),
                             "machine": platform.machine(), "commit": commit,
                             "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}}})
    return man


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(prog="python -m qlib.study", description="chapters 5–7's shipped population")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="label the populations and write populations/<profile>/")
    b.add_argument("--profile", default="quick")
    b.add_argument("--arch", action="append", choices=models.ARCHS, help="default: every architecture")
    b.add_argument("--configs", type=int, default=None, help="sampled configurations per architecture")
    a = p.parse_args(argv)
    man = build_record(a.profile, a.arch or models.ARCHS, configs_per_arch=a.configs)
    print(json.dumps({k: v for k, v in man.items() if k != "files"}, indent=1))


if __name__ == "__main__":
    main()
