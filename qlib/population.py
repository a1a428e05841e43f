"""A population of quantized models: what chapter 5's accuracy predictor learns from.

A configuration is a small JSON record, never a pickled model; :func:`build` turns it back
into the same quantized model every time::

    {"arch": "resnet", "kind": "alg1", "w_bits": {"conv1": 8, "layer1.0.conv1": 4, …},
     "a_bits": 6, "rounding": "nearest", "seed": 0, "quant": {}}

``kind`` says how the bits were drawn: ``uniform`` (one width for every middle layer),
``random`` (each layer its own width between a random floor and 8), ``alg1`` (Algorithm 1 on
a random bit list, chapter 4) and ``single`` (one layer at 2 bits, every other at 8: the
layer-sensitivity probes). Learned roundings record their calibration settings in
``quant`` (iterations, batch, the learning rate selected on validation, …).

Labelling a configuration is one pass over the full test set (its label, top-1 %, and the
full-test histograms, read at a stride) plus one over the probe images (the tokens a user
pays for, the probe top-1 and the agreement with the float model's predictions); each
labelled record is cached the moment it is measured. Nothing here needs a profile:
:mod:`qlib.study` builds a profile's populations from these pieces.
"""
from __future__ import annotations

import json
import math
import random
import time
import warnings

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qlib import cache, mixed, quant, tokens
from qlib.graph import fold_bn, quantizable_layers

VERSION = 3             # bump when a change to qlib alters what a cached population means
A_BITS = (None, 8, 6, 5, 4)
#: the roundings the sampler draws: the two fixed rules a user would try, and the learned ones
ROUNDINGS = ("nearest", "stochastic") + quant.LEARNED
PROBE_SEED = 0


def layer_names(model: nn.Module) -> list[str]:
    """The quantized layers of ``model`` (BN folded), first and last included."""
    return quantizable_layers(fold_bn(model))


def config_key(cfg: dict) -> str:
    """What makes two configurations the same model (for de-duplication and splits)."""
    return json.dumps({k: cfg[k] for k in ("arch", "w_bits", "a_bits", "rounding", "seed", "quant")},
                      sort_keys=True)


def _config(arch, names, middle_bits: dict, a_bits, rounding, seed, kind, quant_kw) -> dict:
    w = {n: 8 for n in names}
    w.update(middle_bits)
    return {"arch": arch, "kind": kind, "w_bits": w, "a_bits": a_bits, "rounding": rounding,
            "seed": seed if rounding != "nearest" else 0,
            "quant": quant_kw if rounding in quant.LEARNED else {}}


def sensitivity_configs(arch: str, model: nn.Module) -> list[dict]:
    """One configuration per middle layer: that layer at 2 bits, every other at 8, nearest
    rounding, float activations (the measured sensitivity of chapter 5's attention study)."""
    names = layer_names(model)
    return [_config(arch, names, {n: 2}, None, "nearest", 0, "single", {}) for n in names[1:-1]]


def sample_configs(arch: str, model: nn.Module, n: int, *, seed: int = 0, learned_share: float = 0.15,
                   learned_kwargs: dict[str, dict] | None = None) -> list[dict]:
    """``n`` distinct configurations a user of chapters 3–4 would try.

    The draw is shaped so that labels fall densely within ~10 points of float and sparsely
    in the collapse below: with a fixed rounding a layer gets 2 bits only in one draw in
    five (2-bit layers under a fixed rule are what collapses a model, chapter 3), and
    otherwise at least 3 bits (nearest) or 4 (stochastic); learned roundings (``learned_share`` of the draws, with the settings in
    ``learned_kwargs[rounding]``) may use 2 bits anywhere. Activations: float, 8, 6, 5 or 4
    bits, equally likely. Bits: uniform 25%, random per layer 40%, Algorithm 1 35%."""
    if n < 0:
        raise ValueError(f"n must be ≥ 0, got {n}")
    rng = random.Random(f"{seed}-{arch}")  # str seeds are stable across runs
    names = layer_names(model)
    middle = names[1:-1]
    learned_kwargs = learned_kwargs or {}
    learned = [r for r in quant.LEARNED if r in learned_kwargs]
    out, seen, tries = [], set(), 0
    while len(out) < n:
        tries += 1
        if tries > 100 * (n + 10):
            raise RuntimeError(f"could not draw {n} distinct configurations for {arch}")
        if learned and rng.random() < learned_share:
            rounding = rng.choice(learned)
        else:
            rounding = "nearest" if rng.random() < 0.55 else "stochastic"
        # the lowest width allowed: 2 for learned roundings and in one fixed-rule draw in five
        # (the collapse tail); else 3 for nearest and 4 for stochastic, whose unbiased but
        # noisy choice costs about a bit (chapter 1)
        if rounding in quant.LEARNED or rng.random() < 0.2:
            low = 2
        else:
            low = 3 if rounding == "nearest" else 4
        allowed = list(range(low, 9))
        a_bits = rng.choice(A_BITS)
        kind, bits = _draw_bits(rng, model, middle, allowed)
        cfg = _config(arch, names, bits, a_bits, rounding, rng.randrange(1000), kind,
                      learned_kwargs.get(rounding, {}))
        if config_key(cfg) not in seen:
            seen.add(config_key(cfg))
            out.append(cfg)
    return out


def stress_configs(arch: str, model: nn.Module, n: int, *, seed: int = 0) -> list[dict]:
    """``n`` configurations the sampler (almost) never draws, for testing a predictor where
    its training population is thin: nearest rounding, middle layers at 3–6 bits with one to
    three random layers at 2, activations at 8, 5 or 4 bits (``kind`` "stress")."""
    rng = random.Random(f"stress-{seed}-{arch}")
    names = layer_names(model)
    middle = names[1:-1]
    out, seen = [], set()
    while len(out) < n:
        bits = {m: rng.randint(3, 6) for m in middle}
        for m in rng.sample(middle, rng.randint(1, min(3, len(middle)))):
            bits[m] = 2
        cfg = _config(arch, names, bits, rng.choice((8, 5, 4)), "nearest", 0, "stress", {})
        if config_key(cfg) not in seen:
            seen.add(config_key(cfg))
            out.append(cfg)
    return out


def _draw_bits(rng: random.Random, model: nn.Module, middle: list[str], allowed: list[int]) -> tuple[str, dict]:
    """One draw of the middle layers' widths: uniform 25%, random per layer 40%, Algorithm 1 35%."""
    u = rng.random()
    if u < 0.25:
        b = rng.choice(allowed)
        return "uniform", {m: b for m in middle}
    if u < 0.65:
        floor = rng.choice(allowed[:-1])
        return "random", {m: rng.randint(floor, 8) for m in middle}
    bitlist = sorted(rng.sample(allowed, rng.randint(2, min(4, len(allowed)))))
    return "alg1", mixed.allocate_bits(model, bitlist, mixed.EPS2)


def build(cfg: dict, float_model: nn.Module, calib: torch.Tensor) -> nn.Module:
    """The quantized model a configuration describes (deterministic: the same record, float
    model and calibration images give the same integer weights)."""
    for k in ("w_bits", "a_bits", "rounding", "seed"):
        if k not in cfg:
            raise ValueError(f"configuration lacks {k!r}: {cfg}")
    return quant.quantize(float_model, calib, w_bits=dict(cfg["w_bits"]), a_bits=cfg["a_bits"],
                          rounding=cfg["rounding"], seed=cfg["seed"], progress=False, **cfg.get("quant", {}))


def model_spec(cfg: dict, float_digest: str, calib_digest: str) -> dict:
    """What determines a configuration's quantized model: the record, the float weights and
    the calibration images (by their :func:`qlib.cache.digest`), for its cache key."""
    return {"version": VERSION, "config": config_key(cfg), "calib": calib_digest, "float": float_digest}


def quantized(cfg: dict, float_model: nn.Module, calib: torch.Tensor,
              digests: tuple[str, str] | None = None) -> nn.Module:
    """:func:`build`, through the cache (qlib.quant.save, state only): a learned rounding's
    model is saved when its population is labelled, so chapter 6 loads it instead of
    calibrating again; a fixed rule's is built here and saved on first use. ``digests``: the float model's and the
    calibration images' digests, if the caller has them (hashing is the slow part of a hit)."""
    fd, cd = digests or (cache.digest(*float_model.state_dict().values()), cache.digest(calib))
    path = cache.path_for("qmodel", model_spec(cfg, fd, cd))
    if path.is_file():
        try:
            return quant.load(path, float_model)
        except ValueError as e:
            warnings.warn(f"rebuilding {path}: {e}")
    q = build(cfg, float_model, calib)
    quant.save(q, path)
    return q


@torch.no_grad()
def weight_sqnr(qmodel: nn.Module, folded_float: nn.Module) -> list[float]:
    """Per quantized layer, 10·log10(‖W‖² / ‖W − Ŵ‖²) in dB: no forward pass needed."""
    out = []
    for n, m in quant.quant_layers(qmodel).items():
        w = folded_float.get_submodule(n).weight
        err = float((w - m.weight()).pow(2).sum())
        out.append(10 * math.log10(float(w.pow(2).sum()) / err) if err > 0 else 100.0)
    return out


def probe_indices(n_test: int, n_probe: int, seed: int = PROBE_SEED) -> torch.Tensor:
    """The fixed probe set: ``n_probe`` test images drawn once (seed 0)."""
    if not 1 <= n_probe <= n_test:
        raise ValueError(f"probe size must be in 1..{n_test}, got {n_probe}")
    return torch.randperm(n_test, generator=torch.Generator().manual_seed(seed))[:n_probe]


def label(cfg: dict, float_model: nn.Module, folded: nn.Module, calib: torch.Tensor, test_set,
          probe: torch.Tensor, float_probe_preds: torch.Tensor, probe_labels: torch.Tensor,
          ranges: dict, bins: int, stride: int, digests: tuple[str, str] | None = None) -> dict:
    """Build one configuration and measure it: label (top-1 % on the full test set, an exact
    count), tokens on the full test set (every ``stride``-th value) and on the probe images,
    probe top-1, agreement with the float model on the probe images, per-layer weight SQNR.

    The lean path (benchmarks/labelling.py): weights materialised once (quant.freeze), one
    pass over the test set whose hooks histogram every ``stride``-th value. Only a learned rounding's model is saved (where :func:`quantized`
    finds it, ``digests`` as there): it costs a calibration to rebuild, a fixed rule's a
    tenth of a second."""
    t0 = time.perf_counter()
    q = build(cfg, float_model, calib)
    t1 = time.perf_counter()
    if cfg["rounding"] in quant.LEARNED:
        fd, cd = digests or (cache.digest(*float_model.state_dict().values()), cache.digest(calib))
        quant.save(q, cache.path_for("qmodel", model_spec(cfg, fd, cd)))
    quant.freeze(q)
    images, labels = test_set.tensors
    full = tokens.histogram_pass(q, images, bins, ranges, stride=stride)
    pr = tokens.histogram_pass(q, probe, bins, ranges)
    correct = full["preds"] == labels  # per test image: top-1 on any subset, free
    return {"config": cfg, "acc": 100 * int(correct.sum()) / len(labels), "tokens_full": full["tokens"],
            "tokens_probe": pr["tokens"], "correct_full": correct,
            "probe_acc": 100 * int((pr["preds"] == probe_labels).sum()) / len(probe_labels),
            "probe_agree": 100 * int((pr["preds"] == float_probe_preds).sum()) / len(probe_labels),
            "sqnr": weight_sqnr(q, folded), "quant_seconds": t1 - t0,
            "seconds": time.perf_counter() - t0}


def label_all(configs: list[dict], float_model: nn.Module, folded: nn.Module, calib: torch.Tensor, test_set,
              probe: torch.Tensor, float_probe_preds: torch.Tensor, probe_labels: torch.Tensor, ranges: dict,
              bins: int, stride: int, *, progress: bool = True, desc: str = "labelling") -> tuple[list[dict], int]:
    """:func:`label` for every configuration, each record saved to the cache the moment it is
    measured: a build that is interrupted (a killed process, a closed laptop) resumes from the
    configurations it finished. Returns the records, in order, and how many came from the cache."""
    digests = (cache.digest(*float_model.state_dict().values()), cache.digest(calib))  # once, not per config
    common = {"test": cache.digest(*test_set.tensors), "probe": cache.digest(probe),
              "bins": bins, "stride": stride, "ranges": cache.key({k: list(v) for k, v in ranges.items()})}
    records, reused = [], 0
    for cfg in tqdm(configs, desc=desc, disable=not progress):
        path = cache.path_for("label", {**model_spec(cfg, *digests), **common})
        rec = cache.load(path)
        if rec is None:
            rec = label(cfg, float_model, folded, calib, test_set, probe, float_probe_preds, probe_labels,
                        ranges, bins, stride, digests)
            cache.save(rec, path)
        else:
            reused += 1
        records.append(rec)
    return records, reused


SPLIT_GROUPS = ("config", "bits")


def group_key(cfg: dict, group: str = "config") -> str:
    """What keeps records on one side of a split: the configuration (``"config"``) or its
    weight bit pattern (``"bits"``: every rounding, seed and activation width of one
    per-layer bit list together, so a held-out model never has a training twin that
    differs only in its rounding)."""
    if group == "config":
        return config_key(cfg)
    if group == "bits":
        return json.dumps([cfg["arch"], cfg["w_bits"]], sort_keys=True)
    raise ValueError(f"group must be one of {SPLIT_GROUPS}, got {group!r}")


def split(records: list[dict], fractions=(0.6, 0.2, 0.2), seed: int = 0,
          group: str = "config") -> dict[str, list[int]]:
    """Disjoint train / val / test indices into ``records``: a seeded shuffle of the groups
    (:func:`group_key`), cut where the running count of records reaches ``fractions``;
    records of one group always land in the same set."""
    if not records:
        raise ValueError("the population is empty: label some configurations first")
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise ValueError(f"fractions must be three positive shares summing to 1, got {fractions}")
    members: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        members.setdefault(group_key(r["config"], group), []).append(i)
    keys = sorted(members)
    rng = np.random.default_rng(seed)
    out, seen = {"train": [], "val": [], "test": []}, 0
    cut_tr, cut_va = fractions[0] * len(records), (fractions[0] + fractions[1]) * len(records)
    for k in (keys[i] for i in rng.permutation(len(keys))):
        # a group goes where the record count stands at its middle: shares stay close to
        # ``fractions`` even when a few groups are large (the uniform bit patterns)
        mid = seen + len(members[k]) / 2
        out["train" if mid < cut_tr else "val" if mid < cut_va else "test"].extend(members[k])
        seen += len(members[k])
    for part in out.values():
        part.sort()
    return out
