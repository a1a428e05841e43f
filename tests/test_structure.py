"""The shape of qlib: data flows one way between its modules (no import cycle, counting the
imports inside functions too), functions stay readable in one screen, and the small shared
pieces behave (forward hooks, early stopping, the predictor verdicts, the ablation switches)."""
import ast
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from qlib import ablations, book, experiments, predictor, profiles, quant, report
from qlib.hooks import forward_hooks

QLIB = Path(__file__).resolve().parent.parent / "qlib"


def import_graph() -> dict[str, set[str]]:
    """qlib module → the qlib modules it imports anywhere in its file (top level or inside
    a function: a lazy import that hides a cycle is still a cycle)."""
    mods = {p.stem for p in QLIB.glob("*.py")} - {"__init__"}
    graph = {}
    for m in mods:
        deps = set()
        for node in ast.walk(ast.parse((QLIB / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("qlib"):
                if node.module == "qlib":
                    deps |= {a.name for a in node.names}
                else:
                    deps.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qlib.")}
        graph[m] = deps & mods - {m}
    return graph


def test_qlib_has_no_import_cycle():
    graph = import_graph()
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " → ".join(path + [m])
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])
    # the layering the package map promises, checked directly
    assert "study" not in graph["population"] | graph["predictor"] | graph["tokens"]
    assert not graph["population"] & {"experiments", "predictor", "study"}
    assert "study" in graph["ablations"] and "ablations" not in graph["study"]


def test_the_import_cycle_check_can_fail(monkeypatch):
    """The check above finds a cycle when there is one."""
    graph = {"a": {"b"}, "b": {"a"}}
    monkeypatch.setattr(sys.modules[__name__], "import_graph", lambda: graph)
    with pytest.raises(AssertionError, match="import cycle"):
        test_qlib_has_no_import_cycle()


def test_functions_fit_on_a_screen():
    long = [(p.name, n.name, n.end_lineno - n.lineno + 1) for p in QLIB.glob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, ast.FunctionDef)
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, f"functions over 60 lines: {long}"


def test_forward_hooks_fire_inside_and_are_removed_even_on_error():
    lin = nn.Linear(2, 2)
    seen = []
    with forward_hooks([(lin, lambda m, i, o: seen.append(o.shape))]):
        lin(torch.zeros(3, 2))
    lin(torch.zeros(1, 2))
    assert seen == [torch.Size([3, 2])] and not lin._forward_hooks
    with pytest.raises(RuntimeError):
        with forward_hooks([(lin, lambda m, i: seen.append("pre"))], pre=True):
            lin(torch.zeros(1, 2))
            raise RuntimeError("boom")
    assert seen[-1] == "pre" and not lin._forward_pre_hooks


def test_early_stopping_keeps_the_best_parameters_and_stops_after_patience():
    w = torch.zeros(3)
    stop = predictor.EarlyStopping([w], patience=2)
    stops = []
    for k, score in enumerate([5.0, 3.0, 4.0, 3.00005, 1.0]):
        w.fill_(k)
        stops.append(stop.update(score))
    # 3.0 at k=1 is the best; 4.0 and 3.00005 (not better by min_delta) are two misses: stop
    assert stops[:4] == [False, False, False, True] and stop.best == 1.0
    stop = predictor.EarlyStopping([w], patience=2)
    for k, score in enumerate([5.0, 3.0, 4.0]):
        w.fill_(k)
        stop.update(score)
    stop.restore()
    assert torch.equal(w, torch.ones(3)) and stop.best == 3.0


def test_mae_verdict_words_and_margin():
    rng = np.random.default_rng(0)
    y = rng.normal(80, 5, 300)
    good, bad = y + rng.normal(0, 0.5, 300), y + rng.normal(0, 3, 300)
    assert report.mae_verdict(y, good, bad)["verdict"] == "better"
    assert report.mae_verdict(y, bad, good)["verdict"] == "worse"
    v = report.mae_verdict(y, good, bad, margin=100.0)
    assert v["verdict"] == "not distinguishable" and v["low"] < v["diff"] < v["high"] < 0
    assert report.versus("better") == "better than" and report.versus("not distinguishable") == \
        "not distinguishable from"
    assert report.interval(1.234, 0.9, 1.5) == "1.23 [0.90, 1.50]"
    assert report.interval(-0.5, -1, 0.25, signed=True) == "-0.50 [-1.00, +0.25]"
    assert report.near_float(90.0, [80.0, 79.9, 91.0]).tolist() == [True, False, True]


def test_every_profile_names_only_known_switches_and_a_typo_is_refused():
    for name in profiles.PROFILES:
        ablations.check_settings(profiles.get(name).ablation.settings)
    bad = (profiles.AblationSetting(4, 4, (0,), ("block", "first_lst")),)
    with pytest.raises(ValueError, match="unknown switches \\['first_lst'\\]"):
        ablations.check_settings(bad)


def test_switches_change_only_what_quantize_knows():
    for sw in ablations.SWITCHES.values():
        kw = sw.kwargs(3)
        assert set(kw) <= {"blocks", "variant", "first_last_bits"}, sw.key
        assert set(kw.get("variant", {})) <= set(quant.VARIANT), sw.key
    assert len({s.name for s in ablations.SWITCHES.values()}) == len(ablations.SWITCHES)


def test_applies_respects_the_setting_blocks_and_activations():
    sw = ablations.SWITCHES
    w3 = profiles.AblationSetting(3, None, (0,))
    w4a4 = profiles.AblationSetting(4, 4, (0,), ("block",))
    assert ablations.applies(sw["ste"], w3, blocks=False)
    assert not ablations.applies(sw["act_fixed"], w3, blocks=True)        # no quantized activations
    assert not ablations.applies(sw["block"], w3, blocks=False)           # nothing to take apart
    assert ablations.applies(sw["block"], w4a4, blocks=True)
    assert not ablations.applies(sw["ste"], w4a4, blocks=True)            # not asked at this setting


def test_setting_names():
    assert quant.setting_name(4, 4) == "W4A4" and quant.setting_name(3) == "W3A32"
    assert quant.setting_name({"conv1": 8}, 8) == "WmixedA8"


def test_verdicts_take_names_and_show_both_means():
    recs = [{"arch": "resnet", "config": c, "acc": a, "seconds": 1.0}
            for c, accs in (("x", (90.0, 90.2, 90.1)), ("y", (85.0, 85.1, 84.9))) for a in accs]
    v = experiments.verdicts(recs, "x", "y", by=("arch",), column="config", names=("first", "second"))
    row = v.iloc[0]
    assert row["verdict"] == "first better" and row["x"] == pytest.approx(90.1) and row["y"] == pytest.approx(85.0)


def test_early_stopping_refuses_to_restore_when_no_score_was_finite():
    stop = predictor.EarlyStopping([torch.zeros(2)], patience=3)
    stop.update(float("nan"))
    with pytest.raises(RuntimeError, match="no validation score was finite"):
        stop.restore()


def test_widget_cells_get_a_short_timeout():
    from qlib import book

    widget = {"metadata": {"tags": ["widget"]}}
    assert book.cell_timeout_for(widget, 1200) == book.WIDGET_CELL_TIMEOUT
    assert book.cell_timeout_for(widget, None) == book.WIDGET_CELL_TIMEOUT
    assert book.cell_timeout_for(widget, 10) == 10
    assert book.cell_timeout_for({"metadata": {"tags": ["hide-input"]}}, 1200) == 1200
    assert book.cell_timeout_for({"metadata": {}}, None) is None
    # every chapter cell that builds a widget carries the tag
    import json
    for nb in book.notebooks():
        for cell in json.loads(nb.read_text())["cells"]:
            src = "".join(cell["source"])
            if cell["cell_type"] == "code" and ("widgets.tau_explorer(" in src or "widgets.bit_picker(" in src):
                assert "widget" in cell["metadata"].get("tags", []), f"{nb.name}: untagged widget cell"


def test_the_static_book_keeps_what_a_widget_drew():
    """A widget's view is replaced by its Output widgets' plots and HTML readouts, in order."""
    png = {"output_type": "display_data", "metadata": {}, "data": {"image/png": "iVBO", "text/plain": "<Image>"}}
    state = {"box": {"model_name": "VBoxModel", "state": {"children": ["IPY_MODEL_ctl", "IPY_MODEL_out", "IPY_MODEL_txt"]}},
             "ctl": {"model_name": "HBoxModel", "state": {"children": ["IPY_MODEL_btn"]}},
             "btn": {"model_name": "ToggleButtonModel", "state": {"description": "2"}},
             "out": {"model_name": "OutputModel", "state": {"outputs": [png]}},
             "txt": {"model_name": "HTMLModel", "state": {"value": "estimated top-1 <b>90.1%</b>"}}}
    pics = book.widget_pictures(state, "box")
    assert pics[0] == png and pics[1]["data"] == {"text/html": "estimated top-1 <b>90.1%</b>"} and len(pics) == 2
    assert book.widget_pictures(state, "missing") == []
