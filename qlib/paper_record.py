"""The paper profile's record: every chapter run once in a profile (``paper`` on a GPU), its
glued values and the environment it ran in, written to ``results/<profile>/``::

    python -m qlib.paper_record                  # make paper-record: PROFILE=paper, CUDA if present
    results/paper/env.json                       # device, torch, CUDA, date, commit, wall per chapter
    results/paper/03_attention_round_ptq.json    # that chapter's glued values, by name

The book's page "The paper profile" (notebooks/09_paper_profile.ipynb) renders its tables
from this record, labelled with where it came from, and says so when there is none. A record
whose environment lacks its device or commit is refused (:func:`load`): a number without
the machine and the code that made it cannot be checked. Files are written atomically.
"""
from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from qlib import book, models

REPO = Path(__file__).resolve().parent.parent
SELF = "09_paper_profile"   # the page that renders the record is not part of it
REQUIRED = ("device", "commit", "date", "torch", "profile", "chapters")


class RecordError(ValueError):
    """A record that cannot be shown: unreadable, or missing what says where it came from."""


def default_dir(profile: str = "paper") -> Path:
    """``$QLIB_PAPER_RECORD`` if set (the page reads it too), else ``results/<profile>/``."""
    return Path(os.environ.get("QLIB_PAPER_RECORD") or REPO / "results" / profile)


def chapters() -> list[Path]:
    """The chapters a record holds: every one but the page that shows the record."""
    return [nb for nb in book.notebooks() if nb.stem != SELF]


def glued_values(executed: Path) -> dict:
    """One executed chapter's glued values by name, as Python values where their text is a
    literal (numbers, strings, lists), else the text myst-nb shows."""
    import nbformat

    values = {}
    for cell in nbformat.read(executed, as_version=4).cells:
        for out in cell.get("outputs", []):
            meta = out.get("metadata", {}).get("scrapbook")
            if meta:
                text = out.get("data", {}).get(meta.get("mime_prefix", "") + "text/plain", "")
                try:
                    values[meta["name"]] = ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    values[meta["name"]] = text
    return values


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def environment(profile: str) -> dict:
    """Where a record is made: the device by name, torch and CUDA versions, the date (UTC),
    the commit (and whether the work tree had uncommitted changes), Python, the host."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"profile": profile, "device": models.describe_device(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "python": platform.python_version(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"), "commit": _git("rev-parse", "HEAD"), "dirty": bool(status) if status is not None else None}


def _write_json(obj, path: Path) -> None:
    """``obj`` as JSON at ``path``, atomically (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write(executed: dict[str, Path], walls: dict[str, float], out_dir: Path, env: dict) -> Path:
    """A record in ``out_dir``: ``<chapter>.json`` with each executed chapter's glued values
    and ``env.json`` (``env`` plus the chapters and their wall seconds), written last so a
    record without it is an unfinished one."""
    if not env.get("device") or not env.get("commit"):
        raise RecordError("a record needs the device it ran on and the commit it ran from; "
                          f"got device={env.get('device')!r}, commit={env.get('commit')!r}")
    out_dir = Path(out_dir)
    for stem, path in executed.items():
        _write_json(glued_values(path), out_dir / f"{stem}.json")
    env = {**env, "chapters": {s: round(float(walls[s]), 1) for s in executed}}
    _write_json(env, out_dir / "env.json")
    return out_dir


def load(record_dir: Path) -> dict | None:
    """``{"env": …, "chapters": {stem: {name: value}}}``, or None where ``record_dir`` holds
    no record (no ``env.json``). A record missing its device, commit, date, torch version,
    profile or a chapter file its environment lists is refused with a RecordError."""
    record_dir = Path(record_dir)
    env_path = record_dir / "env.json"
    if not env_path.is_file():
        return None
    try:
        env = json.loads(env_path.read_text())
    except json.JSONDecodeError as e:
        raise RecordError(f"{env_path} is not valid JSON ({e}); record it again: make paper-record") from e
    missing = [k for k in REQUIRED if env.get(k) in (None, "")]
    if missing:
        raise RecordError(f"{env_path} lacks {', '.join(missing)}: a record must say what it ran on and "
                          "from which commit; record it again with `make paper-record`")
    if not isinstance(env["chapters"], dict):
        raise RecordError(f"{env_path}: 'chapters' must map each chapter to its wall seconds; record it again "
                          "with `make paper-record`")
    out = {}
    for stem in env["chapters"]:
        path = record_dir / f"{stem}.json"
        if not path.is_file():
            raise RecordError(f"{path} is missing ({env_path} lists it); record it again with `make paper-record`")
        out[stem] = json.loads(path.read_text())
    return {"env": env, "chapters": out}


def record(profile: str = "paper", out_dir: Path | None = None) -> Path:
    """Run every chapter (but the page that shows records) in ``profile`` on this machine
    (CUDA when present), each into ``_build/executed-<profile>/``, timed, then write the
    record. A chapter that fails stops the run and nothing is written."""
    out_dir = Path(out_dir) if out_dir is not None else default_dir(profile)
    exec_dir = book.BUILD / f"executed-{profile}"
    executed, walls = {}, {}
    for nb in chapters():
        start = time.perf_counter()
        executed[nb.stem] = book.execute_one(nb, profile, exec_dir)
        walls[nb.stem] = time.perf_counter() - start
    path = write(executed, walls, out_dir, environment(profile))
    print(f"record written: {path} ({sum(walls.values()) / 60:.1f} minutes of chapters)")
    return path


def main(argv=None) -> None:
    """``python -m qlib.paper_record [--profile paper] [--out results/paper]``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default=os.environ.get("PROFILE", "paper"), choices=sorted(book.profiles.PROFILES))
    p.add_argument("--out", type=Path, default=None, help="default: results/<profile>/")
    args = p.parse_args(argv)
    record(args.profile, args.out)


if __name__ == "__main__":
    main()
