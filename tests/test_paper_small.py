"""The paper profile's code path, proven on CPU: every chapter once in ``paper-small`` (the
paper profile with only its counts shrunk, qlib.profiles.scaled), its glued names checked
against the quick run's, a paper record written from that run as a fixture, the record page
executed with it and without one, and the book built from the paper-small run.

Runs after tests/test_book.py (file order), whose quick run it compares with."""
import json
import time

import nbformat
import pytest

from qlib import book, paper_record

PROFILE = "paper-small"
EXECUTED = book.BUILD / f"executed-{PROFILE}"
FIXTURE = book.BUILD / "paper-record-fixture"
WALLS: dict[str, float] = {}

# Glued names only the paper profile's branches produce, per chapter (every chapter builds
# its sentences over the profile's rows, seeds and grids, so few): a new one means a branch
# the quick run never takes, which this list must then name.
PAPER_ONLY: dict[str, set[str]] = {
    # the quick profile ships its float checkpoints, so chapter 0 retrains only the quickest
    # model to show the recipe; the paper profile ships none and trains all three here
    "00_data_and_models": {"resnet_own_acc", "mobilenetv2_own_acc"},
}


def glued_names(path) -> set[str]:
    return set(paper_record.glued_values(path))


@pytest.mark.parametrize("nb", paper_record.chapters(), ids=lambda p: p.stem)
def test_chapter_runs_in_paper_small(nb):
    start = time.perf_counter()
    out = book.execute_one(nb, PROFILE, EXECUTED, attempts=1)
    WALLS[nb.stem] = time.perf_counter() - start
    names = glued_names(out)
    assert paper_record.glued_values(out)["profile"] == PROFILE
    quick = book.EXECUTED / nb.name
    if not book.is_complete(quick):
        pytest.skip(f"no finished quick run of {nb.name} to compare glued names with (tests/test_book.py)")
    expected = glued_names(quick) | PAPER_ONLY.get(nb.stem, set())
    assert names == expected, (f"{nb.stem}: glued only in {PROFILE}: {sorted(names - expected)}; "
                               f"only in quick: {sorted(expected - names)}")


def _run_page(record_dir, monkeypatch, out_dir):
    monkeypatch.setenv("QLIB_PAPER_RECORD", str(record_dir))
    nb = book.REPO / "notebooks" / f"{paper_record.SELF}.ipynb"
    return paper_record.glued_values(book.execute_one(nb, PROFILE, out_dir, attempts=1))


def test_record_page_with_the_paper_small_record_and_without(monkeypatch, tmp_path):
    chapters = {nb.stem: EXECUTED / nb.name for nb in paper_record.chapters()}
    if not all(book.is_complete(p) for p in chapters.values()):
        pytest.skip("the paper-small chapters did not all run")
    env = paper_record.environment(PROFILE)
    paper_record.write(chapters, {s: WALLS.get(s, 0.0) for s in chapters}, FIXTURE, env)
    rec = paper_record.load(FIXTURE)
    assert rec["env"]["commit"] == env["commit"] and set(rec["chapters"]) == set(chapters)
    assert rec["chapters"]["03_attention_round_ptq"]["profile"] == PROFILE

    none = _run_page(tmp_path / "absent", monkeypatch, tmp_path / "executed")
    assert "No record of the paper profile exists yet" in none["record_status"]
    with_record = _run_page(FIXTURE, monkeypatch, EXECUTED)   # the copy the book below is built from
    assert env["commit"][:10] in with_record["record_status"] and env["device"] in with_record["record_status"]
    assert set(none) == set(with_record)


def test_a_record_without_device_or_commit_is_refused(tmp_path):
    good = {"profile": "paper", "device": "NVIDIA H100", "commit": "abc", "date": "2026-12-08",
            "torch": "2.14.1", "chapters": {}}
    (tmp_path / "env.json").write_text(json.dumps(good))
    assert paper_record.load(tmp_path)["env"]["device"] == "NVIDIA H100"
    for key in ("device", "commit"):
        (tmp_path / "env.json").write_text(json.dumps({k: v for k, v in good.items() if k != key}))
        with pytest.raises(paper_record.RecordError, match=key):
            paper_record.load(tmp_path)
    (tmp_path / "env.json").write_text(json.dumps({**good, "chapters": {"03_attention_round_ptq": 1.0}}))
    with pytest.raises(paper_record.RecordError, match="missing"):
        paper_record.load(tmp_path)
    (tmp_path / "env.json").write_text(json.dumps({**good, "chapters": ["03_attention_round_ptq"]}))
    with pytest.raises(paper_record.RecordError, match="wall seconds"):
        paper_record.load(tmp_path)
    with pytest.raises(paper_record.RecordError, match="device"):
        paper_record.write({}, {}, tmp_path / "w", {**good, "device": None})
    assert paper_record.load(tmp_path / "nothing") is None


def test_book_builds_from_the_paper_small_run():
    if not all(book.is_complete(EXECUTED / nb.name) for nb in book.notebooks()):
        pytest.skip("the paper-small chapters did not all run")
    html = book.build(EXECUTED, book.BUILD / PROFILE)
    page = (html / "notebooks" / f"{paper_record.SELF}.html").read_text()
    env = paper_record.load(FIXTURE)["env"]   # the page shows the fixture's provenance
    assert "The record below" in page and env["commit"] in page and env["date"] in page
