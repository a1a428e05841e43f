"""Chapter 7's harness: what each choice in the Attention Round recipe and in the accuracy
predictor is worth, one change at a time against the recipe::

    S = experiments.setup("quick")
    runs, refs = ablations.run_switches(S, hp)          # every switch at the profile's settings
    effects = ablations.compare(runs)                   # Δ against the recipe, 95% half-width, verdict
    ablations.question_effects(effects)["layer by layer"]

A **switch** changes one thing in quantize()'s call and keeps the rest (the images, the
steps, the learning rate the recipe was tuned to, τ, the seeds): the question is what
removing a part costs with everything else fixed, not how well a differently tuned method
could do. A profile's :class:`~qlib.profiles.AblationSetting` names the switches it runs
by key; a key that is not in :data:`SWITCHES` is refused before anything runs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from qlib import data, experiments, models, quant, report, study, tokens
from qlib.experiments import Setup
from qlib.graph import DEFAULT_BLOCKS
from qlib.profiles import AblationSetting


@dataclass(frozen=True)
class Switch:
    """One change to the recipe: its key (what a profile names), its row label, the question
    the summary table asks, and quantize()'s arguments as a function of the weight bits."""
    key: str
    name: str
    question: str
    kwargs: Callable[[int], dict]


#: The recipe's switches by key, in the order the chapter's tables and figures list them.
SWITCHES: dict[str, Switch] = {s.key: s for s in (
    Switch("block", "layer by layer", "Reconstruct a residual block as one unit, or layer by layer?",
           lambda w: {"blocks": ()}),
    Switch("per_tensor", "per-tensor weight steps", "One weight step per output channel, or per tensor?",
           lambda w: {"variant": {"per_channel": False}}),
    Switch("maxabs", "max-abs weight steps", "Search the weight step (‖W − Ŵ‖²), or take max |w|?",
           lambda w: {"variant": {"weight_steps": "maxabs"}}),
    Switch("first_last", "first & last at the rest's bits", "Keep the first and last layers at 8 bits?",
           lambda w: {"first_last_bits": w}),
    Switch("alpha_zero", "α from zeros", "Does α's N(0, τ²) start matter?",
           lambda w: {"variant": {"alpha_init": "zeros"}}),
    Switch("ste", "straight-through backward", "Does eq. 6's backward matter?",
           lambda w: {"variant": {"backward": "ste"}}),
    Switch("zero_ste", "α from zeros + straight-through", "Both parts of Attention Round taken out?",
           lambda w: {"variant": {"alpha_init": "zeros", "backward": "ste"}}),
    Switch("act_fixed", "activation steps fixed", "Learn the activation steps, or keep their MSE init?",
           lambda w: {"variant": {"learn_act_steps": False}}),
)}
#: The same switches by their row label.
BY_NAME = {s.name: s for s in SWITCHES.values()}


def check_settings(settings: tuple[AblationSetting, ...]) -> None:
    """A ValueError for a setting that names a switch :data:`SWITCHES` does not have."""
    for st in settings:
        unknown = sorted(set(st.switches or ()) - set(SWITCHES))
        if unknown:
            raise ValueError(f"ablation setting {quant.setting_name(st.w_bits, st.a_bits)} names unknown "
                             f"switches {unknown}; the switches are {sorted(SWITCHES)}")


def has_blocks(model) -> bool:
    """Whether ``model`` has multi-layer reconstruction units (residual or inverted-residual blocks)."""
    return any(isinstance(m, DEFAULT_BLOCKS) for m in model.modules())


def applies(switch: Switch, setting: AblationSetting, blocks: bool) -> bool:
    """Whether ``switch`` runs at ``setting`` on a model with (``blocks``) or without units of
    several layers: the setting asks for it, "layer by layer" needs blocks to take apart,
    fixed activation steps need quantized activations."""
    return ((setting.switches is None or switch.key in setting.switches)
            and not (switch.key == "block" and not blocks)
            and not (switch.key == "act_fixed" and setting.a_bits is None))


def switch_jobs(S: Setup) -> list[tuple[str, str, AblationSetting, int]]:
    """(change name, arch, setting, seed) for the recipe and every switch that applies, at
    the profile's settings; "recipe" first."""
    settings = S.profile.ablation.settings
    check_settings(settings)
    jobs = [("recipe", a, st, s) for st in settings for a in S.float_models for s in st.seeds]
    blocks = {a: has_blocks(m) for a, m in S.float_models.items()}
    return jobs + [(sw.name, a, st, s) for sw in SWITCHES.values() for st in settings for a in S.float_models
                   for s in st.seeds if applies(sw, st, blocks[a])]


def run_switches(S: Setup, hp: dict[str, dict], hp_ada: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """Attention Round at every job of :func:`switch_jobs` (``hp[arch]``: the recipe's tuned
    arguments), and the references at the same settings: nearest rounding and AdaRound at
    its own tuned arguments (``hp_ada``), all through experiments.run's cache."""
    runs = []
    for c, a, st, s in tqdm(switch_jobs(S), desc="switches"):
        kw = {} if c == "recipe" else BY_NAME[c].kwargs(st.w_bits)
        runs.append(experiments.run(S, a, "attention", st.w_bits, st.a_bits, seed=s, tags={"change": c},
                                    **hp[a], **kw))
    settings = S.profile.ablation.settings
    refs = [experiments.run(S, a, "nearest", st.w_bits, st.a_bits, tags={"change": "nearest"})
            for st in settings for a in S.float_models]
    refs += [experiments.run(S, a, "adaround", st.w_bits, st.a_bits, seed=s, tags={"change": "AdaRound"},
                             **hp_ada[a]) for st in settings for a in S.float_models for s in st.seeds]
    return runs, refs


def compare(runs: list[dict]):
    """Each change against the recipe, per model and setting: means, Δ, its 95% half-width
    and the verdict by :func:`qlib.report.verdict` ("no real difference", "change better",
    "recipe better"), the seed spread pooled over every change and setting of the model."""
    import pandas as pd

    s = pd.DataFrame(runs).groupby(["change", "arch", "w_bits", "a_bits"], sort=False)["acc"].agg(
        ["mean", "std", "count"])
    spread = {a: report.pooled_sd(g["std"], g["count"]) for a, g in s.groupby(level="arch", sort=False)}
    out = []
    for (c, a, w, x), r in s.iterrows():
        if c == "recipe":
            continue
        base = s.loc[("recipe", a, w, x)]
        half, word = report.verdict(r["mean"], base["mean"], int(r["count"]), int(base["count"]), *spread[a],
                                    names=("change", "recipe"))
        out.append({"change": c, "key": BY_NAME[c].key, "model": models.display_name(a),
                    "setting": quant.setting_name(w, x), "seeds": int(r["count"]), "recipe": base["mean"],
                    "changed": r["mean"], "Δ": r["mean"] - base["mean"], "± 95%": half,
                    "verdict": "no real difference" if word == "tie" else word})
    return pd.DataFrame(out)


def question_effects(effects) -> dict[str, dict]:
    """Per change: mean, min and max Δ over model × setting cells, how many cells, how many
    real, and of those how many the recipe (``worse``) or the change (``better``) won."""
    out = {}
    for c in BY_NAME:
        e = effects[effects.change == c]
        out[c] = {"mean": float(e["Δ"].mean()), "min": float(e["Δ"].min()), "max": float(e["Δ"].max()),
                  "cells": len(e), "real": int((e.verdict != "no real difference").sum()),
                  "worse": int((e.verdict == "recipe better").sum()),
                  "better": int((e.verdict == "change better").sum())}
    return out


def ptq_answer(q: dict) -> str:
    """The summary table's answer for one change from its :func:`question_effects` entry."""
    if q["worse"] > 0 and q["better"] == 0:
        return "keep the recipe's choice"
    if q["better"] > 0 and q["worse"] == 0:
        return "the change does better"
    return "depends on the model" if q["worse"] and q["better"] else "no measurable effect"


# --- the calibration budget ----------------------------------------------------------------

def budget_runs(S: Setup, hp: dict[str, dict]) -> list[dict]:
    """Attention Round at W{budget_w_bits}A32, seed 0, for every calibration-set size ×
    steps per unit of the profile's grid (0 steps once per model: nothing reads the images).
    The sets are nested: each smaller one is the start of the larger, the recipe's included."""
    A = S.profile.ablation
    calib_all = data.calibration_set(S.train_set, n=max(A.calib_grid), seed=0)
    if not bool((calib_all[: S.quant.calib_images] == S.calib).all()):
        raise RuntimeError("the recipe's calibration images must be a prefix of the budget grid's")
    jobs = [(a, n, it) for a in S.float_models for n in A.calib_grid for it in A.iters_grid
            if it > 0 or n == S.quant.calib_images]
    out = []
    for a, n, it in tqdm(jobs, desc="calibration budget"):
        Sn = S if n == S.quant.calib_images else dataclasses.replace(S, calib=calib_all[:n])
        # a grid point with fewer images than the profile's batch draws all of them per step
        out.append(experiments.run(Sn, a, "attention", A.budget_w_bits, seed=0, iters=it,
                                   batch_size=min(S.quant.batch_size, n), tags={"n_calib": n}, **hp[a]))
    return out


def budget_table(S: Setup, budget, nearest: dict[str, float], tol: float):
    """Per model: float, nearest, 0 steps, the recipe, the cheapest grid point within ``tol``
    points of the recipe, and the largest calibration set at the recipe's steps."""
    import pandas as pd

    A, q = S.profile.ablation, S.quant
    rows = {}
    for a in S.float_models:
        d = budget[budget.arch == a]
        recipe = d[(d.n_calib == q.calib_images) & (d.iters == q.iters)].iloc[0]
        cheap = d[d.acc >= recipe.acc - tol].sort_values("seconds").iloc[0]
        big = d[(d.n_calib == max(A.calib_grid)) & (d.iters == q.iters)].iloc[0]
        rows[models.display_name(a)] = {
            "float": S.float_acc[a], "nearest": nearest[a], "0 steps (noise only)": d[d.iters == 0].acc.iloc[0],
            "recipe": recipe.acc, "recipe s": recipe.seconds, f"cheapest within {tol}": f"{cheap.n_calib} img × {cheap.iters} steps",
            "its acc": cheap.acc, "its s": cheap.seconds, f"{max(A.calib_grid)} images": big.acc,
            f"{max(A.calib_grid)} s": big.seconds}
    return pd.DataFrame(rows).T


# --- the predictor's choices ---------------------------------------------------------------

def rebinned_tokens(counts: dict[str, dict], pops: study.Populations, max_bins: int):
    """``tokens(arch, i, bins, n, branch)``: record i's probe tokens at ``bins`` bins (merged
    from ``max_bins``) over the first ``n`` probe images, both branches or one, from
    :func:`qlib.study.probe_counts`."""
    ps = pops.S.profile.predictor

    def make(a: str, i: int, bins: int = ps.bins, n: int = ps.probe_images, branch: str = "both"):
        c = counts[a]
        t = tokens.tokens_from_counts(c["counts"][i][n], n, c["values_per_image"], merge=max_bins // bins)
        return t[:, :bins] if branch == "count" else t[:, bins:] if branch == "rate" else t
    return make


def judge_against(y, pred, reference, seed_spread: float) -> dict:
    """A predictor change against the reference encoder on the same held-out configurations:
    its MAE with a bootstrap interval, Spearman, and :func:`qlib.report.mae_verdict` with the
    encoder's own seed-to-seed spread as the margin."""
    v = report.mae_verdict(y, pred, reference, margin=seed_spread)
    m = report.regression_metrics(y, pred, n_boot=500)
    return {"MAE": m["MAE"][0], "MAE low": m["MAE"][1], "MAE high": m["MAE"][2], "Spearman": m["Spearman"][0],
            "Δ MAE": v["diff"], "Δ low": v["low"], "Δ high": v["high"], "verdict": v["verdict"]}


def pred_answer(verdict: str) -> str:
    """The summary table's answer for a predictor change."""
    return {"worse": "keep the encoder's choice", "better": "the change does better",
            "not distinguishable": "no measurable effect"}[verdict]


def refit(pops: study.Populations, make_tokens, name: str, *, share: float = 1.0, tok_kw: dict | None = None,
          **fit_overrides) -> dict:
    """Chapter 5's encoder trained afresh with one change — tokens from
    ``make_tokens(arch, i, **tok_kw)`` (see :func:`rebinned_tokens`), the first ``share`` of
    each architecture's training configurations, or a fit setting in ``fit_overrides`` —
    and its held-out predictions, pooled over the architectures."""
    def tok(a, i):
        return make_tokens(a, i, **(tok_kw or {}))

    train_index = {a: study.train_subset(pops, a, share) for a in pops.archs}
    model, hist = study.fit_pooled(pops, source=tok, train_index=train_index, desc=name, **fit_overrides)
    return {"name": name, "pred": study.predict_part(model, pops, source=tok),
            "n_train": sum(len(v) for v in train_index.values()), "seconds": hist["seconds"]}


def mean_abs_error(pred, y) -> float:
    """MAE in points."""
    return float(np.abs(np.asarray(pred) - np.asarray(y)).mean())
