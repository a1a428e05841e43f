"""Execute the chapters with papermill and build the HTML book from the executed copies::

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

from qlib import profiles

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "_build"
EXECUTED = BUILD / "executed"


def notebooks() -> list[Path]:
    """The chapters, ``notebooks/NN_*.ipynb``, in order."""
    return sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def execute_one(nb: Path, profile: str = "quick", out_dir: Path = EXECUTED, *,
                cell_timeout: float | None = None, attempts: int = 2) -> Path:
    """Run one chapter top to bottom with ``profile`` injected into its parameters cell.

    A cell that runs past ``cell_timeout`` seconds (default: the profile's) or a kernel
    that dies counts as a hung run, and the chapter is run again from the top, up to
    ``attempts`` runs in all (its costly steps are cached, so a rerun mostly reads them):
    a kernel and papermill that both wait for a message the other will never send have
    been seen here in widget cells (about one run in ten of chapter 2's τ explorer, which
    then finishes when its timeout fires), so a cell tagged ``widget`` gets at most
    :data:`WIDGET_CELL_TIMEOUT` seconds instead of the profile's limit."""
    from nbclient.exceptions import CellTimeoutError, DeadKernelError

    timeout = profiles.get(profile).cell_timeout if cell_timeout is None else cell_timeout
    for attempt in range(1, attempts + 1):
        try:
            return _execute_once(nb, profile, out_dir, timeout)
        except (CellTimeoutError, DeadKernelError) as e:
            if attempt == attempts:
                raise
            print(f"{nb.name}: {type(e).__name__} ({e}); running it again ({attempt + 1} of {attempts})",
                  flush=True)
    raise AssertionError("unreachable")


#: seconds a cell tagged ``widget`` may run (it builds a widget and draws it once: 0.3–0.7 s,
#: the bit-list picker a few seconds: five nearest-rounding quantizations for its estimates;
#: when papermill and the kernel stall on its messages, the cell completes at this timeout
#: with its output intact, seen in chapter 2 in a fresh-clone run)
WIDGET_CELL_TIMEOUT = 20


def cell_timeout_for(cell, timeout: float | None) -> float | None:
    """The limit for one cell: ``timeout``, or at most WIDGET_CELL_TIMEOUT for a widget cell."""
    if "widget" in cell.get("metadata", {}).get("tags", []):
        return WIDGET_CELL_TIMEOUT if timeout is None else min(timeout, WIDGET_CELL_TIMEOUT)
    return timeout


def _execute_once(nb: Path, profile: str, out_dir: Path, timeout: float | None) -> Path:
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / nb.name
    # papermill saves its output after every cell: run into a side file and move it into
    # place only when the last cell has run, so a killed run leaves no executed copy that a
    # build would take as complete (and no stale copy of an earlier run either)
    partial = out_dir / f".{nb.stem}.partial.ipynb"
    out.unlink(missing_ok=True)
    start = time.perf_counter()
    # Progress bars are ipywidgets in a kernel: nobody watches them in a papermill run (the
    # book drops widget views), and a kernel and papermill have been seen stalling on widget
    # messages (chapter 1 once took 1,648 s for 430 s of cells, its 1,200 s cell limit
    # spent), so the kernel starts with tqdm's bars off. In JupyterLab they show as usual.
    tqdm_before = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        papermill.execute_notebook(
            str(nb), str(partial), parameters={"profile": profile}, cwd=str(nb.parent),
            kernel_name="python3", progress_bar=False, log_output=False, execution_timeout=timeout,
            timeout_func=lambda cell: cell_timeout_for(cell, timeout),
        )
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    finally:
        if tqdm_before is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = tqdm_before
    os.replace(partial, out)
    print(f"executed {nb.name} ({profile}) in {time.perf_counter() - start:.0f} s", flush=True)
    return out


def is_complete(executed: Path) -> bool:
    """Whether ``executed`` is a finished papermill run: readable, every cell run, no error."""
    import nbformat

    try:
        nb = nbformat.read(executed, as_version=4)
    except Exception:
        return False
    pm = nb.metadata.get("papermill", {})
    return bool(pm.get("end_time")) and not pm.get("exception")


def execute(profile: str = "quick", out_dir: Path = EXECUTED) -> list[Path]:
    """Run every chapter in order (:func:`execute_one`); returns the executed copies."""
    return [execute_one(nb, profile, out_dir) for nb in notebooks()]


def _mathjax_dir() -> Path:
    """MathJax 3 with its TeX web fonts, as the ``django-static-mathjax`` wheel ships it."""
    import mathjax

    return Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"


# What the pages load: the combined TeX→CHTML component, the woff fonts it points at
# ([mathjax]/output/chtml/fonts/woff-v2), and the menu and accessibility parts it loads on
# demand. The speech-rule engine (sre/, 4 MB) is only loaded if a reader switches it on.
MATHJAX_PARTS = ("tex-chtml-full.js", "output/chtml", "input", "ui", "a11y")


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


def widget_pictures(state: dict, model_id: str) -> list[dict]:
    """What a widget showed when it was executed, as plain notebook outputs: the outputs of
    every Output widget (its plots) and the text of every HTML widget (its readouts) in the
    tree under ``model_id``, in order; controls (buttons, sliders) are left out. ``state``
    is the notebook's saved widget state (``metadata.widgets``)."""
    model = state.get(model_id)
    if model is None:
        return []
    name, st = model.get("model_name"), model.get("state", {})
    if name == "OutputModel":
        return [o for o in st.get("outputs", []) if o.get("output_type") in ("display_data", "stream")]
    if name == "HTMLModel":
        return [{"output_type": "display_data", "metadata": {}, "data": {"text/html": st.get("value", "")}}]
    out = []
    for child in st.get("children", []):
        out += widget_pictures(state, child.removeprefix("IPY_MODEL_"))
    return out


def _stage_notebook(executed: Path, staged: Path) -> None:
    """Copy an executed chapter for the book, hiding the parameters cell and the one
    papermill injected (the prose states the profile through glue), with each widget
    replaced by the pictures and readouts it drew at execution (:func:`widget_pictures`)."""
    import nbformat

    nb = nbformat.read(executed, as_version=4)
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        if "parameters" in tags or "injected-parameters" in tags:
            cell.metadata["tags"] = tags + ["remove-cell"]
        # A widget in a static page has no kernel behind it: its sliders would move and
        # change nothing, and drawing it would pull the widget manager from a CDN. The
        # picture it drew at execution stays; `make widgets` serves the live version.
        if cell.cell_type == "code":
            outputs = []
            for o in cell.outputs:
                view = o.get("data", {}).get(WIDGET_VIEW)
                outputs += [nbformat.from_dict(p) for p in widget_pictures(state, view["model_id"])] if view else [o]
            cell.outputs = outputs
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, staged)


def _git_origin() -> str | None:
    """The GitHub address of this checkout's ``origin`` remote, if it has one."""
    try:
        url = subprocess.run(["git", "-C", str(REPO), "remote", "get-url", "origin"],
                             capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    url = url.removesuffix(".git").replace("git@github.com:", "https://github.com/")
    return url if url.startswith("https://github.com/") else None


def _configure_launch(config: Path, repository: str | None, jupyterhub: str | None) -> None:
    """Point the launch buttons (Binder, Colab, JupyterHub) at the repository the book is
    published from. Binder builds its image from the repository's ``environment.yml``.
    Without a repository address the theme shows no launch buttons, and we say so."""
    import yaml

    repository = repository or os.environ.get("QLIB_BOOK_REPOSITORY") or _git_origin()
    jupyterhub = jupyterhub or os.environ.get("QLIB_BOOK_JUPYTERHUB")
    cfg = yaml.safe_load(config.read_text())
    if repository:
        cfg["repository"] = {"url": repository, "branch": "main"}
    else:
        # Jupyter Book's default address is its own repository: buttons would open that
        cfg["launch_buttons"] = {k: "" if k.endswith("_url") else v for k, v in cfg["launch_buttons"].items()}
        print("no repository address (git origin on GitHub, or QLIB_BOOK_REPOSITORY): "
              "the pages get no Binder/Colab/JupyterHub launch buttons")
    if jupyterhub:
        cfg["launch_buttons"]["jupyterhub_url"] = jupyterhub
    config.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))


def build(executed_dir: Path = EXECUTED, out_dir: Path = BUILD, *, repository: str | None = None,
          jupyterhub: str | None = None) -> Path:
    """Stage the book sources with the executed notebooks and run ``jupyter-book build``.

    ``repository`` (default ``$QLIB_BOOK_REPOSITORY``, else the GitHub ``origin`` remote) and
    ``jupyterhub`` (default ``$QLIB_BOOK_JUPYTERHUB``) are where the launch buttons point.

    MathJax 3 and its fonts are copied from the ``django-static-mathjax`` package into the
    book's static files, so the pages typeset math offline. Returns the HTML folder."""
    missing = [nb.name for nb in notebooks() if not (executed_dir / nb.name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"not executed yet: {', '.join(missing)} (looked in {executed_dir}); "
            "run `python -m qlib.book execute` first"
        )
    unfinished = [nb.name for nb in notebooks() if not is_complete(executed_dir / nb.name)]
    if unfinished:
        raise ValueError(f"these executed chapters did not finish (an interrupted or failed run): "
                         f"{', '.join(unfinished)}; run `python -m qlib.book execute` again")
    src = out_dir / "src"
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(REPO / name, src / name)
    _configure_launch(src / "_config.yml", repository, jupyterhub)
    shutil.copytree(REPO / "book", src / "book")
    shutil.copytree(REPO / "_static", src / "_static")   # book.css: Jupyter Book loads *.css found here
    (src / "notebooks").mkdir()
    for nb in notebooks():
        _stage_notebook(executed_dir / nb.name, src / "notebooks" / nb.name)
    # html_extra_path copies this tree verbatim into the output (→ _static/mathjax/); under
    # the book's own _static, Jupyter Book would add every MathJax file as a <script>.
    mj = src / "_mathjax" / "_static" / "mathjax"
    mj.mkdir(parents=True)
    mathjax = _mathjax_dir()
    for part in MATHJAX_PARTS:
        (shutil.copytree if (mathjax / part).is_dir() else shutil.copy2)(mathjax / part, mj / part)
    site = out_dir / "site"
    if site.exists():  # stale pages or MathJax files of an earlier build must not survive
        shutil.rmtree(site)
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(src), "--all",
           "--path-output", str(site), "--warningiserror", "--nitpick", "--keep-going"]
    env = dict(os.environ, PYDEVD_DISABLE_FILE_VALIDATION="1")
    subprocess.run(cmd, check=True, env=env)
    html = site / "_build" / "html"
    print(f"book built: {html / 'index.html'}")
    return html


def main(argv=None) -> None:
    """``python -m qlib.book {execute,build,all} [--profile quick|paper]``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["execute", "build", "all"])
    p.add_argument("--profile", default=os.environ.get("PROFILE", "quick"), choices=sorted(profiles.PROFILES))
    args = p.parse_args(argv)
    if args.step in ("execute", "all"):
        execute(args.profile)
    if args.step in ("build", "all"):
        build()


if __name__ == "__main__":
    main()
