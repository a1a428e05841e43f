"""An on-disk cache for trained models and other costly artefacts.

Keys are a hash of everything that determines the artefact, so a changed setting never
loads a stale file. Writes go to a temporary file in the same folder and are moved into
place with ``os.replace`` (atomic on POSIX), so an interrupted run leaves either the old
file or none; loads use ``torch.load(weights_only=True)``, which refuses pickled code.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch


def cache_dir() -> Path:
    """$QLIB_CACHE, else ``.cache/qlib`` in the repository this package lives in (an
    editable install), else ``~/.cache/qlib``."""
    if os.environ.get("QLIB_CACHE"):
        return Path(os.environ["QLIB_CACHE"])
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file():
        return repo / ".cache" / "qlib"
    return Path.home() / ".cache" / "qlib"


def key(spec: dict) -> str:
    """A short stable hash of a JSON-serialisable description of an artefact."""
    blob = json.dumps(spec, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def digest(*tensors: torch.Tensor) -> str:
    """A short content hash of tensors (their bytes, in order) for cache keys: the same
    weights or images always give the same digest."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def path_for(kind: str, spec: dict) -> Path:
    """Where the artefact of ``kind`` ("models", "run", …) for ``spec`` is cached."""
    return cache_dir() / kind / f"{key(spec)}.pt"


def save(obj, path: Path) -> None:
    """Write ``obj`` with torch.save atomically: temp file, fsync, os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: Path):
    """The cached object, or ``None`` if the file is missing or unreadable. A corrupt file is
    reported, removed and treated as a miss, so the caller rebuilds it."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle, foreign object: never trust it
        warnings.warn(f"removed unreadable cache file {path} ({type(e).__name__}: {e}); it will be rebuilt")
        path.unlink(missing_ok=True)
        return None
