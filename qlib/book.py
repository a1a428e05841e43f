"""Execute the chapters with papermill and build the HTML book from the executed copies.

    python -m qlib.book execute --profile quick   # notebooks/*.ipynb → _build/executed/
    python -m qlib.book build                     # _build/executed + book/ → _build/html
    python -m qlib.book all --profile quick       # both

The sources in notebooks/ stay output-free; Jupyter Book never re-executes (the staged
copy's config says ``execute_notebooks: "off"``), and Sphinx warnings are errors.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "_build"
EXECUTED = BUILD / "executed"


def notebooks() -> list[Path]:
    return sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def execute_one(nb: Path, profile: str = "quick", out_dir: Path = EXECUTED) -> Path:
    """Run one chapter top to bottom with ``profile`` injected into its parameters cell."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / nb.name
    start = time.perf_counter()
    papermill.execute_notebook(
        str(nb), str(out), parameters={"profile": profile}, cwd=str(nb.parent),
        kernel_name="python3", progress_bar=False, log_output=False,
    )
    print(f"executed {nb.name} ({profile}) in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def execute(profile: str = "quick", out_dir: Path = EXECUTED) -> list[Path]:
    return [execute_one(nb, profile, out_dir) for nb in notebooks()]


def _mathjax_dir() -> Path:
    import jupyter_server_mathjax

    return Path(jupyter_server_mathjax.__file__).parent / "static"


def _stage_notebook(executed: Path, staged: Path) -> None:
    """Copy an executed chapter for the book, hiding the parameters cell and the one
    papermill injected (the prose states the profile through glue)."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            cell.metadata["tags"] = tags + ["remove-cell"]
    nbformat.write(nb, staged)


def build(executed_dir: Path = EXECUTED, out_dir: Path = BUILD) -> Path:
    """Stage the book sources with the executed notebooks and run ``jupyter-book build``.

    MathJax is copied from the ``jupyter-server-mathjax`` package into the book's static
    files so the pages typeset math offline. Returns the HTML folder."""
    missing = [nb.name for nb in notebooks() if not (executed_dir / nb.name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"not executed yet: {', '.join(missing)} (looked in {executed_dir}); "
            "run `python -m qlib.book execute` first"
        )
    src = out_dir / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "book", src / "book")
    (src / "notebooks").mkdir()
    for nb in notebooks():
        _stage_notebook(executed_dir / nb.name, src / "notebooks" / nb.name)
    # html_extra_path copies this tree verbatim into the output (→ _static/mathjax/); under
    # the book's own _static, Jupyter Book would add every MathJax file as a <script>.
    shutil.copytree(_mathjax_dir(), src / "_mathjax" / "_static" / "mathjax")
    site = out_dir / "site"
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(src), "--all",
           "--path-output", str(site), "--warningiserror", "--nitpick", "--keep-going"]
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    subprocess.run(cmd, check=True, env=env)
    html = site / "_build" / "html"
    print(f"book built: {html / 'index.html'}")
    return html


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["execute", "build", "all"])
    p.add_argument("--profile", default=os.environ.get("PROFILE", "quick"), choices=["quick", "paper"])
    args = p.parse_args(argv)
    if args.step in ("execute", "all"):
        execute(args.profile)
    if args.step in ("build", "all"):
        build()


if __name__ == "__main__":
    main()
