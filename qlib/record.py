"""Shipped records: a profile's labelled populations and the float checkpoints they were
labelled on, committed to the repository under ``populations/<profile>/`` so chapters 5–7
read 1,000 configurations per architecture without labelling them (hours on two cores)::

    populations/quick/manifest.json     what was built, where, when, from which commit; sha256 per file
    populations/quick/float_resnet.pt   the float checkpoint (the quick profile's float model)
    populations/quick/resnet.pt         the population: configurations, labels, per-image
                                        correctness, tokens (float16), probe measurements

The population files are built by ``python -m qlib.study build --profile quick`` (resumable:
every labelled configuration is cached the moment it is measured). Each is keyed by the same
spec as the live cache (:func:`qlib.study.population_of`): a record built for other float
weights, another probe set or another qlib population VERSION is refused with a message
that names the command rebuilding it. Files are checked against the manifest's sha256 and
loaded with ``weights_only=True``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from qlib import cache

ROOT = Path(__file__).resolve().parent.parent / "populations"
FORMAT = "qlib-population-1"
REBUILD = "python -m qlib.study build --profile {profile}"


class RecordError(ValueError):
    """A shipped record that cannot be used: missing, corrupt or built for something else."""


def directory(profile: str) -> Path:
    """Where ``profile``'s record lives (it may not exist)."""
    return ROOT / profile


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def manifest(profile: str) -> dict | None:
    """``profile``'s manifest, or None if it ships no record."""
    path = directory(profile) / "manifest.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _load(profile: str, name: str):
    """A record file, checked against the manifest's checksum, loaded with weights_only."""
    man = manifest(profile)
    path = directory(profile) / name
    if man is None or name not in man.get("files", {}):
        raise RecordError(f"{path} is not in {directory(profile)}/manifest.json; rebuild the record: "
                          + REBUILD.format(profile=profile))
    if not path.is_file():
        raise RecordError(f"{path} is missing (the manifest lists it): restore it with "
                          f"`git checkout -- {directory(profile)}`, or rebuild: " + REBUILD.format(profile=profile))
    if sha256(path) != man["files"][name]["sha256"]:
        raise RecordError(f"{path} does not match its checksum in manifest.json (corrupt or edited): "
                          f"restore it with `git checkout -- {directory(profile)}`, or rebuild: "
                          + REBUILD.format(profile=profile))
    return torch.load(path, map_location="cpu", weights_only=True)


def float_checkpoint(arch: str, profile: str, spec_key: str) -> dict | None:
    """The shipped float checkpoint of ``arch`` ({"state_dict", "info", "spec"}, as the model
    cache holds it), or None if ``profile`` ships none or it was trained under other settings
    (``spec_key``: :func:`qlib.cache.key` of the training spec)."""
    man = manifest(profile)
    name = f"float_{arch}.pt"
    if man is None or name not in man.get("files", {}):
        return None
    ckpt = _load(profile, name)
    return ckpt if ckpt.get("spec") == spec_key else None


def has_population(profile: str, arch: str) -> bool:
    """Whether ``profile``'s manifest lists a population for ``arch``."""
    man = manifest(profile)
    return man is not None and f"{arch}.pt" in man.get("files", {})


def population(profile: str, arch: str, spec: dict) -> dict | None:
    """``arch``'s shipped population for ``profile`` in :func:`qlib.study.population_of`'s
    format, or None if the profile ships none. A record built for another ``spec`` (other
    float weights, probe set, sampler settings or population VERSION:
    :func:`qlib.study.record_spec`) is a RecordError naming the rebuild command."""
    if not has_population(profile, arch):
        return None
    packed = _load(profile, f"{arch}.pt")
    if packed.get("format") != FORMAT or packed.get("spec") != cache.key(spec):
        raise RecordError(f"{directory(profile) / (arch + '.pt')} was built for another qlib or other float "
                          "weights, probe set or sampler settings (its spec does not match qlib.study.record_spec); "
                          "rebuild it: " + REBUILD.format(profile=profile))
    return unpack(packed)


# --- packing: a population dict <-> compact tensors ---------------------------------------

RECORD_FLOATS = ("acc", "probe_acc", "probe_agree", "quant_seconds", "seconds")


def pack(pop: dict, spec: dict) -> dict:
    """A labelled population (:func:`qlib.study.population_of`'s dict) as a few tensors:
    tokens in float16 (they lie in [0, 1]; 3 significant digits), per-image correctness as
    bits, configurations as JSON strings."""
    recs = pop["records"]
    if not recs:
        raise ValueError("the population is empty: nothing to pack")
    correct = np.stack([r["correct_full"].numpy() for r in recs])
    return {"format": FORMAT, "spec": cache.key(spec), "arch": pop["arch"],
            # no sort_keys: w_bits keeps the model's layer order, which chapters read
            "configs": [json.dumps(r["config"]) for r in recs],
            **{k: torch.tensor([float(r[k]) for r in recs], dtype=torch.float64) for k in RECORD_FLOATS},
            "n_test": int(correct.shape[1]),
            "correct_full": torch.from_numpy(np.packbits(correct, axis=1)),
            "tokens_probe": torch.stack([r["tokens_probe"] for r in recs]).half(),
            "tokens_full": torch.stack([r["tokens_full"] for r in recs]).half(),
            "sqnr": torch.tensor([r["sqnr"] for r in recs], dtype=torch.float64),
            "float": pop["float"], "probe_idx": pop["probe_idx"], "ranges": pop["ranges"],
            "bins": pop["bins"], "stride": pop["stride"], "pop_seconds": float(pop["seconds"])}


def unpack(packed: dict) -> dict:
    """The population dict :func:`pack` was given (tokens back in float32)."""
    n_test = packed["n_test"]
    correct = np.unpackbits(packed["correct_full"].numpy(), axis=1, count=n_test).astype(bool)
    recs = []
    for i, cfg in enumerate(packed["configs"]):
        rec = {"config": json.loads(cfg), **{k: float(packed[k][i]) for k in RECORD_FLOATS},
               "correct_full": torch.from_numpy(correct[i]),
               "tokens_probe": packed["tokens_probe"][i].float(), "tokens_full": packed["tokens_full"][i].float(),
               "sqnr": packed["sqnr"][i].tolist()}
        recs.append(rec)
    return {"arch": packed["arch"], "records": recs, "probe_idx": packed["probe_idx"], "ranges": packed["ranges"],
            "bins": packed["bins"], "stride": packed["stride"], "seconds": packed["pop_seconds"],
            "float": packed["float"]}


# --- writing --------------------------------------------------------------------------------

def write(profile: str, files: dict[str, object], info: dict) -> dict:
    """Save ``files`` ({name: object}) into ``profile``'s record atomically and update the
    manifest: each file's sha256 and size, and ``info`` (commit, versions, device, date,
    seconds) merged into the manifest's top level. Returns the manifest."""
    d = directory(profile)
    d.mkdir(parents=True, exist_ok=True)
    # one build process per architecture may finish at the same moment: the manifest's
    # read-modify-write holds an exclusive lock, so neither drops the other's entry
    with open(d / ".manifest.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _write_locked(profile, d, files, info)


def _write_locked(profile: str, d: Path, files: dict[str, object], info: dict) -> dict:
    man = manifest(profile) or {"profile": profile, "files": {}}
    for name, obj in files.items():
        cache.save(obj, d / name)
        man["files"][name] = {"sha256": sha256(d / name), "bytes": (d / name).stat().st_size}
    for k, v in info.items():
        if isinstance(v, dict) and isinstance(man.get(k), dict):
            man[k] = {**man[k], **v}
        else:
            man[k] = v
    man["total_mib"] = round(sum(f["bytes"] for f in man["files"].values()) / 2 ** 20, 2)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".manifest.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(man, f, indent=1, sort_keys=True, allow_nan=False, default=str)
        f.write("\n")
    os.replace(tmp, d / "manifest.json")
    return man
