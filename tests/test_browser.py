"""The book as a reader meets it: the built HTML and the live widgets in a real browser.

Debian's chromium, driven by Playwright (`make` installs chromium when it runs as root
with apt). Without it these tests skip and say why. They run after tests/test_book.py,
whose last test builds the HTML they open, and after chapter 0 has cached the float
ResNet that the bit-list picker loads.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from qlib import book, models

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (as root: `apt-get install -y chromium`, "
                "which `make` does when it can): the browser tests need a real browser",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras: "
                               "pip install -e '.[book,test]'")

HTML = book.BUILD / "site" / "_build" / "html"
SCREENSHOTS = book.BUILD / "screenshots"
# The flags that keep chromium from calling home on a machine with no network (without
# them it retries Google's hosts at every start), in a fresh profile each time.
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-default-apps"]
PRIMER = "notebooks/00_quantization_primer"   # first in Foundations, before the notation page
PAGES = ["book/intro", PRIMER, "book/notation",
         *[p for p in (f"notebooks/{nb.stem}" for nb in book.notebooks()) if p != PRIMER],
         "book/usage", "book/api", "book/references"]


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site() -> Path:
    index = HTML / "index.html"
    assert index.is_file(), f"no built book at {index}: run `make book` (or tests/test_book.py) first"
    return HTML


@pytest.fixture(scope="module")
def offline(browser):
    """A browser context with the network off, recording every request a page makes."""
    ctx = browser.new_context(offline=True, viewport={"width": 1300, "height": 900})
    ctx.requests = []
    ctx.on("request", lambda r: ctx.requests.append(r.url))
    yield ctx
    ctx.close()


def wait_for_math(page) -> None:
    """Until MathJax has typeset the page and its fonts are in (Sphinx loads MathJax only on
    pages that have math)."""
    if page.evaluate("!document.querySelector('script[src*=\"mathjax\"]')"):
        return
    page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30_000)
    page.evaluate("MathJax.startup.promise")
    page.evaluate("document.fonts.ready.then(() => true)")


@pytest.mark.parametrize("name", PAGES)
def test_page_reads_offline(offline, site, name):
    """Math typeset in MathJax's TeX fonts, every image loaded, nothing fetched from
    outside the book's folder; the first screen saved for a person to look at."""
    page = offline.new_page()
    offline.requests.clear()
    page.goto((site / f"{name}.html").as_uri())
    wait_for_math(page)
    state = page.evaluate("""() => ({
        math: document.querySelectorAll('article .math').length,
        typeset: [...document.querySelectorAll('article .math')].filter(e => e.querySelector('mjx-container')).length,
        errors: [...document.querySelectorAll('mjx-merror')].map(e => e.getAttribute('data-mjx-error')),
        fonts: [...document.fonts].filter(f => f.family.startsWith('MJX')).map(f => [f.family, f.status]),
        search_fields: [...document.querySelectorAll('.search-button-field')].filter(e => e.offsetParent !== null).length,
        images: [...document.querySelectorAll('article img')].map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0]),
    })""")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name.split('/')[-1]}.png"))
    page.close()

    assert state["typeset"] == state["math"], f"{state['math'] - state['typeset']} math elements left as raw TeX"
    assert not state["errors"], f"TeX errors: {state['errors']}"
    assert not [f for f in state["fonts"] if f[1] == "error"], f"MathJax fonts failed to load: {state['fonts']}"
    if state["math"]:
        # the italic math font is what a reader sees in every variable: it must be MathJax's own
        assert ["MJXTEX-I", "loaded"] in state["fonts"], f"TeX italic font not loaded: {state['fonts']}"
    assert all(ok for _, ok in state["images"]), f"broken images: {[s for s, ok in state['images'] if not ok]}"
    assert state["search_fields"] == 1, "one search field on a wide screen (book.css hides the theme's header)"
    outside = [u for u in offline.requests if not u.startswith(("file:", "data:", "blob:"))]
    assert not outside, f"requests leaving the machine: {outside}"


def test_chapters_have_math_and_figures(offline, site):
    """The check above must bite: the derivation chapters carry math, the chapters figures."""
    page = offline.new_page()
    counts = {}
    for name in ("notebooks/02_gaussian_attention", "notebooks/04_mixed_precision"):
        page.goto((site / f"{name}.html").as_uri())
        wait_for_math(page)
        counts[name] = page.evaluate("[document.querySelectorAll('article mjx-container').length,"
                                     " document.querySelectorAll('article img').length]")
    page.close()
    assert all(m >= 10 and i >= 2 for m, i in counts.values()), counts


def test_navigation_walks_the_whole_book(offline, site):
    """The index opens the first page, every link of the sidebar opens a page that exists,
    and "next" walks the book in table-of-contents order from the first page to the last."""
    page = offline.new_page()
    page.goto((site / "index.html").as_uri())   # Jupyter Book's index redirects to the first page
    page.wait_for_url("**/book/intro.html")
    hrefs = page.eval_on_selector_all("nav.bd-docs-nav a.reference.internal", "as => as.map(a => a.href)")
    files = [Path(unquote(urlparse(h).path)) for h in hrefs]
    assert len(files) >= len(PAGES) - 1, hrefs
    assert all(f.is_file() for f in files), [str(f) for f in files if not f.is_file()]

    visited = [page.url]
    while page.locator("a.right-next").count():
        with page.expect_navigation():
            page.locator("a.right-next").first.click()
        visited.append(page.url)
        assert len(visited) <= 3 * len(PAGES), "the next links loop"
    page.close()
    walked = [unquote(urlparse(u).path).removeprefix(str(site) + "/").removesuffix(".html") for u in visited]
    assert walked == PAGES, walked


def test_search_finds_a_chapter(offline, site):
    """Sphinx's search runs offline from the file:// copy and finds chapter 4 for its topic."""
    page = offline.new_page()
    page.goto((site / "search.html").as_uri() + "?q=coding+length")
    page.wait_for_selector("#search-results ul.search li", timeout=30_000)
    links = page.eval_on_selector_all("#search-results ul.search li a", "as => as.map(a => a.href)")
    page.close()
    assert any("04_mixed_precision" in h for h in links), links


# --- the widgets, live ----------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def voila_page(browser):
    """notebooks/explorers.ipynb served by Voilà on a free port of 127.0.0.1, opened in the
    browser once both widgets have drawn; the server is shut down afterwards."""
    if not models.available("resnet", "quick"):
        pytest.skip("the bit-list picker loads the float ResNet, which is neither shipped nor cached: "
                    "run tests/test_book.py (or `make book`) first")
    port = _free_port()
    voila = Path(sys.executable).parent / "voila"
    # the server's log goes to a file: an unread pipe fills up and then blocks the server
    log = tempfile.TemporaryFile(mode="w+")
    server = subprocess.Popen([str(voila), str(book.REPO / "notebooks" / "explorers.ipynb"), "--no-browser",
                               f"--port={port}", "--Voila.ip=127.0.0.1"],
                              stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    page = browser.new_page(viewport={"width": 1300, "height": 1400})
    try:
        deadline = time.monotonic() + 120
        while True:
            try:  # Voilà answers once it has run the notebook: wait for the first byte, then the widgets
                page.goto(f"http://127.0.0.1:{port}/", timeout=180_000, wait_until="commit")
                break
            except sync_api.Error:
                if time.monotonic() > deadline or server.poll() is not None:
                    log.seek(0)
                    raise AssertionError(f"Voilà did not serve the explorers; its log ends:\n{log.read()[-3000:]}")
                time.sleep(0.5)
        page.wait_for_function("document.querySelectorAll('.widget-output img').length >= 2", timeout=240_000)
        yield page
    finally:
        page.close()
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _plots(page) -> list[str]:
    return page.eval_on_selector_all(".widget-output img", "els => els.map(e => e.src)")


def _wait_for_change(page, before: list[str], index: int) -> list[str]:
    page.wait_for_function(
        "([i, src]) => { const imgs = document.querySelectorAll('.widget-output img');"
        " return imgs.length > i && imgs[i].src !== src; }", arg=[index, before[index]], timeout=60_000)
    return _plots(page)


def test_tau_slider_redraws_the_explorer(voila_page):
    page = voila_page
    before = _plots(page)
    readouts = page.locator(".widget-readout")
    tau_readout = readouts.nth(1).text_content()
    handle = page.locator(".widget-slider .noUi-handle").nth(1)   # w/s, τ, bits: the second is τ
    handle.focus()
    for _ in range(4):
        handle.press("ArrowRight")
    after = _wait_for_change(page, before, 0)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "widget_tau_explorer.png"))
    assert readouts.nth(1).text_content() != tau_readout
    assert after[0] != before[0]
    assert after[1] == before[1], "moving τ must not redraw the bit picker"


def test_bit_toggle_changes_the_allocation_and_its_estimate(voila_page):
    page = voila_page
    before = _plots(page)
    readout = page.locator(".widget-html-content").last
    page.wait_for_function("() => [...document.querySelectorAll('.widget-html-content')].some("
                           "e => e.textContent.includes('estimated top-1'))", timeout=60_000)
    line = readout.text_content()
    page.locator("button.widget-toggle-button", has_text="2").first.click()   # add 2 bits to (3, 4, 5, 6)
    after = _wait_for_change(page, before, 1)
    page.wait_for_function("([t]) => { const o = [...document.querySelectorAll('.widget-html-content')];"
                           " return o.length && o[o.length - 1].textContent !== t; }", arg=[line], timeout=60_000)
    new_line = readout.text_content()
    assert after[1] != before[1], "toggling a width must redraw the allocation and the frontier"
    assert "2 bits" in new_line and "2 bits" not in line

    def estimate(text):
        return text.split("estimated top-1", 1)[1].split("%", 1)[0].strip()
    assert estimate(new_line) != estimate(line), "a new allocation must come with a new estimate"
    page.locator("button", has_text="measure").first.click()
    page.wait_for_function("() => [...document.querySelectorAll('.widget-html-content')].some("
                           "e => e.textContent.includes('measured'))", timeout=60_000)
    page.screenshot(path=str(SCREENSHOTS / "widget_bit_picker.png"))
    assert "measured" in readout.text_content() and estimate(readout.text_content()) == estimate(new_line)
