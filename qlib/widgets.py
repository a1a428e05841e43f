"""Interactive explorers for the chapters: ipywidgets on top of pure functions.

The pure functions (``tau_explorer_data``) compute everything a figure shows, so the tests
check them without a browser; the widget functions only wire sliders to a plot.
"""
from __future__ import annotations

import threading

import numpy as np
import torch

from qlib import checks, mixed
from qlib.rounding import attention_probabilities, backward_factor, grid


def tau_explorer_data(v: float, tau: float, bits: int = 4, n_alpha: int = 401) -> dict:
    """What the τ explorer draws for a weight at v = w/s grid steps:

    * ``grid``, ``prob``: each grid integer and the probability (eq. 2) that ⌊v + α⌉ lands
      there when α ~ N(0, τ²) (τ in grid steps, the book's reading), clipping included;
    * ``alpha``, ``factor_pos``, ``factor_neg``: the eq. 6 backward factor against α, for an
      incoming gradient ∂L/∂z > 0 and ≤ 0."""
    v = checks.number(v, "v", meaning="the weight in grid steps, w/s")
    tau = checks.number(tau, "tau", low=0, meaning="the std of α in grid steps")
    checks.integer(n_alpha, "n_alpha", low=2)
    lo, hi = grid(bits, signed=True)
    prob = attention_probabilities(v, tau, lo, hi).numpy()
    span = 3 * max(tau, 0.5)
    alpha = torch.linspace(-span, span, n_alpha, dtype=torch.float64)
    pos = backward_factor(alpha, tau, torch.ones_like(alpha, dtype=torch.bool)).numpy()
    neg = backward_factor(alpha, tau, torch.zeros_like(alpha, dtype=torch.bool)).numpy()
    return {"grid": np.arange(lo, hi + 1), "prob": prob, "alpha": alpha.numpy(),
            "factor_pos": pos, "factor_neg": neg, "v": v, "tau": tau, "bits": bits}


def plot_tau_explorer(d: dict, axes=None):
    """Draw one state of the τ explorer on two matplotlib axes."""
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    ax1, ax2 = axes
    ax1.bar(d["grid"], d["prob"], color="tab:blue", alpha=0.8)
    ax1.axvline(d["v"], color="tab:red", ls="--", label=f"w/s = {d['v']:.2f}")
    ax1.set(xlabel="grid point q (integer)", ylabel="P(⌊w/s + α⌉ = q)", ylim=(0, 1.05),
            title=f"eq. 2: start after one draw of α (τ = {d['tau']:.2f}, {d['bits']} bits)")
    ax1.legend(loc="upper left")
    ax2.plot(d["alpha"], d["factor_pos"], label="∂L/∂z > 0: Φ(α/σ), σ = τ")
    ax2.plot(d["alpha"], d["factor_neg"], label="∂L/∂z ≤ 0: 1 − Φ(α/σ)")
    ax2.set(xlabel="α (grid steps)", ylabel="∂z/∂α", ylim=(-0.05, 1.05), title="eq. 6: backward factor")
    ax2.legend(loc="center right")
    return axes


def tau_explorer(v: float = 0.3, tau: float = 0.5, bits: int = 4):
    """Sliders for w/s and τ (and the bit width) driving the two eq. 2 / eq. 6 plots."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    lo, hi = grid(bits)
    v_s = W.FloatSlider(value=v, min=lo - 1, max=hi + 1, step=0.05, description="w/s")
    t_s = W.FloatSlider(value=tau, min=0.0, max=2.0, step=0.05, description="τ (steps)")
    b_s = W.IntSlider(value=bits, min=2, max=8, description="bits")
    out = W.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            plot_tau_explorer(tau_explorer_data(v_s.value, t_s.value, b_s.value))
            plt.tight_layout()
            plt.show()

    for s in (v_s, t_s, b_s):
        s.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([v_s, t_s, b_s]), out])


# --- the bit-list picker (chapter 4) ----------------------------------------------------------

def bit_picker_data(model, bitlist, eps2: float) -> dict:
    """What the bit-list picker shows: every layer's coding length (eq. 12), Algorithm 1's
    allocation for ``bitlist`` and ``eps2``, the model size (every quantized layer, MB) and, for
    comparison, the size of each single-precision model with a width from the list."""
    widths = mixed.normalize_bitlist(bitlist)
    bits = mixed.allocate_bits(model, widths, eps2)
    return {"lengths": mixed.layer_coding_lengths(model, eps2), "bits": bits,
            "size_mb": mixed.model_size_mb(model, bits),
            "uniform_mb": {b: mixed.model_size_mb(model, b) for b in widths},
            "bitlist": widths, "eps2": eps2}


def plot_bit_allocation(d: dict, ax=None, first_last_bits: int = 8, title: str | None = None):
    """Bars of bits per layer (first and last layers hatched at their fixed 8 bits;
    downsample/shortcut 1×1 layers in orange), coding length as a line on a second axis."""
    import matplotlib.pyplot as plt

    names = list(d["lengths"])
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 0.45 * len(names)), 3.6))
    bits = [d["bits"].get(n, first_last_bits) for n in names]
    fixed = [n not in d["bits"] for n in names]
    shortcut = ["downsample" in n or "shortcut" in n for n in names]
    colors = ["tab:orange" if s else "lightgray" if f else "tab:blue" for s, f in zip(shortcut, fixed)]
    bars = ax.bar(range(len(names)), bits, color=colors)
    for b, f in zip(bars, fixed):
        if f:
            b.set_hatch("//")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("bits")
    ax.set_ylim(0, max(bits) + 1)
    ax2 = ax.twinx()
    ax2.plot(range(len(names)), list(d["lengths"].values()), color="black", marker=".", lw=1)
    ax2.set_ylabel("coding length L (bits)")
    ax2.grid(False)
    ax.set_title(title or f"bits {d['bitlist']}, ε² = {d['eps2']:g}: {1e3 * d['size_mb']:.2f} kB")
    return ax


ACT_CHOICES = {"float": None, "8 bits": 8, "6 bits": 6, "4 bits": 4}   # the picker's activation widths
INTERVAL = 0.95   # the share of validation errors the picker's ± covers


def picker_context(model, trained: dict, calib: torch.Tensor, test_set) -> dict:
    """What the bit-list picker's estimates share, checked and computed once: the float
    model, chapter 5's trained predictor for its architecture
    (:func:`qlib.study.trained_predictor`), the calibration images for the activation steps,
    the test set for "measure", the float model's per-image correctness on the probe images
    (the paired estimate's other half) and ``half_width``: the predictor's 95th-percentile
    absolute error on its validation configurations (points), the ± around an estimate."""
    from qlib import tokens

    missing = [k for k in ("model", "probe", "probe_labels", "bins", "ranges", "float_acc", "float_probe_acc")
               if k not in trained]
    if missing:
        raise ValueError(f"trained lacks {', '.join(missing)}: pass study.trained_predictor(arch, profile)")
    if calib is None or test_set is None:
        raise ValueError("the estimate needs calib (images for the activation steps) and test_set (for measure)")
    if set(tokens.token_layers(model)) != set(trained["ranges"]):
        raise ValueError(f"this predictor was trained for {trained.get('arch', 'another architecture')}: its "
                         "layers are not the model's; pass study.trained_predictor for the model's architecture")
    preds = trained.get("float_probe_preds")
    if preds is None:
        from qlib.graph import fold_bn   # as the population measured it
        preds = tokens.histogram_pass(fold_bn(model).eval(), trained["probe"], trained["bins"], trained["ranges"])["preds"]
    err = trained.get("val_abs_err")
    return {"model": model, "trained": trained, "calib": calib, "test_set": test_set,
            "float_probe_correct": preds == trained["probe_labels"], "tried": [],
            "half_width": float(np.quantile(err, INTERVAL)) if err is not None and len(err) else None}


def paired_interval(q_correct: torch.Tensor, f_correct: torch.Tensor, z: float = 1.96) -> float:
    """Half-width (points) of the paired estimate's ≈95% sampling interval: z standard
    errors of the mean per-image difference (quantized − float correct: −1, 0 or 1) over the
    n probe images, and never below the rule of three's 300/n (the 95% bound on a
    disagreement rate when none is seen), so a handful of disagreements never looks surer
    than none."""
    d = q_correct.float() - f_correct.float()
    n = len(d)
    se = float(100 * z * d.std(unbiased=True) / n ** 0.5) if n > 1 else 100.0
    return max(se, 300.0 / n)


def allocation_estimate(ctx: dict, bitlist, eps2: float, a_bits: int | None) -> dict:
    """For the picker's current choice: Algorithm 1's allocation of ``bitlist`` at ``eps2``
    (:func:`bit_picker_data`), quantized with nearest rounding (activation steps by the
    MSE search at ``a_bits``; None: float activations), and its estimated top-1 (%): chapter
    5's predictor (:func:`qlib.predictor.predict`, from one pass over the probe images) with
    ``half_width`` (:func:`picker_context`; the paired interval if the predictor has no
    validation errors), and the paired probe estimate with its own interval. Also ``qmodel``
    (for "measure") and ``seconds``."""
    import time

    from qlib import predictor, quant, tokens

    start = time.perf_counter()
    d = bit_picker_data(ctx["model"], bitlist, eps2)
    tr = ctx["trained"]
    q = quant.quantize(ctx["model"], ctx["calib"], w_bits=d["bits"], a_bits=a_bits, rounding="nearest",
                       progress=False)
    out = tokens.histogram_pass(q, tr["probe"], tr["bins"], tr["ranges"], labels=tr["probe_labels"])
    paired = tr["float_acc"] + out["acc"] - tr["float_probe_acc"]
    residual = int(tr["model"].residual)
    estimate = float(predictor.predict_tokens(tr["model"], [out["tokens"]], base=[paired] if residual else None)[0])
    paired_half = paired_interval(out["preds"] == tr["probe_labels"], ctx["float_probe_correct"])
    d.update(a_bits=a_bits, qmodel=q, estimate=estimate, paired=paired, paired_half=paired_half,
             half_width=ctx["half_width"] if ctx["half_width"] is not None else paired_half,
             half_note=("covers 95% of the predictor's errors on chapter 5's validation configurations"
                        if ctx["half_width"] is not None else "the paired probe interval"),
             float_acc=tr["float_acc"], seconds=time.perf_counter() - start, measured=None)
    return d


def remember(ctx: dict | None, d: dict) -> None:
    """Keep ``d`` (shown to the reader) as a point of the frontier :func:`plot_frontier` draws."""
    if ctx is None:   # a picker without estimates keeps no frontier
        return
    d["summary"] = {k: d[k] for k in ("bitlist", "eps2", "a_bits", "size_mb", "estimate", "half_width")}
    ctx["tried"].append(d["summary"])


def measure(ctx: dict, d: dict) -> float:
    """The real top-1 (%) of :func:`allocation_estimate`'s quantized model on the test set,
    stored in ``d["measured"]``."""
    from qlib import models

    d["measured"] = 100 * models.evaluate(d["qmodel"], ctx["test_set"])
    return d["measured"]


def plot_frontier(ctx: dict, d: dict, ax=None, singles: dict | None = None):
    """Model size against estimated top-1 for every allocation tried since the picker opened
    (grey), the current one (blue, with its interval and, once measured, the measured top-1
    as a red cross) and the single-precision models ``singles`` {bits: (MB, estimate)}."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5, 3.6))
    tried = [t for t in ctx["tried"] if t is not d.get("summary")]
    if tried:
        ax.scatter([1e3 * t["size_mb"] for t in tried], [t["estimate"] for t in tried], color="gray",
                   alpha=0.6, s=18, label="tried")
    for b, (mb, est) in (singles or {}).items():
        ax.scatter(1e3 * mb, est, marker="s", color="black", s=20)
        ax.annotate(f"W{b}", (1e3 * mb, est), textcoords="offset points", xytext=(4, 3), fontsize=8)
    ax.errorbar(1e3 * d["size_mb"], d["estimate"], yerr=d["half_width"], fmt="o", color="tab:blue",
                capsize=3, label="this allocation (± its 95% error)")
    if d.get("measured") is not None:
        ax.scatter(1e3 * d["size_mb"], d["measured"], marker="x", color="tab:red", s=50, label="measured")
    ax.axhline(d["float_acc"], color="gray", ls=":", lw=1, label="float")
    ax.set(xlabel="weights (kB)", ylabel="top-1 (%)", title="size against accuracy")
    ax.legend(fontsize=7, loc="best", framealpha=0.6)
    return ax


def single_references(ctx: dict, a_bits: int | None) -> dict:
    """:func:`allocation_estimate` of single-precision models (3, 4, 6 and 8 bits) at
    ``a_bits``: the frontier plot's reference points."""
    return {b: allocation_estimate(ctx, [b], 1.0, a_bits) for b in (3, 4, 6, 8)}


def picker_readout(d: dict) -> str:
    """The picker's line under the plot (HTML): size, and where there is one, the estimate
    with its interval and the measured top-1."""
    size = (f"model size {1e3 * d['size_mb']:.2f} kB; single precision: "
            + ", ".join(f"{b} bits {1e3 * s:.2f} kB" for b, s in d["uniform_mb"].items()))
    if "estimate" not in d:
        return size
    act = "float" if d["a_bits"] is None else f"{d['a_bits']}-bit"
    text = (size + f". Nearest rounding, {act} activations: estimated top-1 <b>{d['estimate']:.1f}%</b> "
            f"± {d['half_width']:.1f} ({d['half_note']}; paired probe estimate "
            f"{d['paired']:.1f}% ± {d['paired_half']:.1f}; float {d['float_acc']:.1f}%; {d['seconds']:.2f} s)")
    if d.get("measured") is not None:
        text += f"; <b>measured {d['measured']:.2f}%</b> on the test images"
    return text


def _png(draw) -> bytes:
    """A figure drawn by ``draw(fig)`` as PNG bytes, without pyplot (safe off the main thread)."""
    import io

    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.8))
    draw(fig)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def picker_picture(d: dict, ctx: dict | None = None, singles: dict | None = None) -> bytes:
    """The picker's picture as PNG: the allocation (:func:`plot_bit_allocation`) and, with
    an estimate (``ctx``), the size-against-accuracy frontier beside it."""
    def draw(fig):
        if ctx is None:
            plot_bit_allocation(d, fig.subplots())
            return
        ax1, ax2 = fig.subplots(1, 2, gridspec_kw={"width_ratios": [2.2, 1]})
        plot_bit_allocation(d, ax1)
        plot_frontier(ctx, d, ax2, {b: (s["size_mb"], s["estimate"]) for b, s in (singles or {}).items()})
    return _png(draw)


def debounced(fn, delay: float):
    """``trigger`` calls ``fn(generation)`` in a timer thread ``delay`` seconds after the last
    trigger (earlier pending calls are cancelled); ``current(generation)`` says whether no
    trigger came since, so a long ``fn`` can drop a stale result. Returns (trigger, current)."""
    import threading

    state = {"gen": 0, "timer": None}

    def trigger(*_):
        state["gen"] += 1
        if state["timer"] is not None:
            state["timer"].cancel()
        state["timer"] = threading.Timer(delay, fn, args=(state["gen"],))
        state["timer"].start()
    return trigger, lambda gen: gen == state["gen"]


def picker_update(ctx: dict | None, model, chosen: list[int], eps2: float, a_bits: int | None,
                  singles: dict) -> dict:
    """One update of the picker: :func:`bit_picker_data` without an estimate (``ctx`` None),
    else :func:`allocation_estimate`, with the single-precision references of ``a_bits`` added
    to ``singles`` the first time that activation width is picked."""
    if ctx is None:
        return bit_picker_data(model, chosen, eps2)
    mixed.normalize_bitlist(chosen)   # an empty list: its clear error before the references cost anything
    if a_bits not in singles:
        singles[a_bits] = single_references(ctx, a_bits)
    return allocation_estimate(ctx, chosen, eps2, a_bits)


def bit_picker(model, bitlist=(3, 4, 5, 6), eps2: float | None = None, *, trained: dict | None = None,
               calib: torch.Tensor | None = None, test_set=None, a_bits: int | None = 8, debounce: float = 0.3):
    """Toggles for the widths 2..8 and an ε² slider (default :data:`qlib.mixed.EPS2`) drive
    the allocation plot and the model size. Given chapter 5's ``trained`` predictor, ``calib``
    and ``test_set``: an activation width, the estimated top-1 (:func:`allocation_estimate`),
    the frontier of every allocation tried and a "measure" button. Updates run off the event
    thread ``debounce`` s after the last change (:func:`debounced`): no backlog."""
    import ipywidgets as W
    from IPython.display import Image

    if a_bits not in ACT_CHOICES.values():
        raise ValueError(f"a_bits must be one of {list(ACT_CHOICES.values())} (None: float), got {a_bits!r}")
    toggles = {b: W.ToggleButton(value=b in bitlist, description=str(b), layout=W.Layout(width="42px"))
               for b in range(2, 9)}
    e_s = W.FloatLogSlider(value=mixed.EPS2 if eps2 is None else eps2, base=10, min=-5, max=1, step=0.25, description="ε²")
    act = W.Dropdown(options=list(ACT_CHOICES), value=next(k for k, v in ACT_CHOICES.items() if v == a_bits),
                     description="activations", layout=W.Layout(width="220px"))
    button = W.Button(description="measure", tooltip="top-1 on the test images")
    out, readout = W.Output(), W.HTML()
    ctx = picker_context(model, trained, calib, test_set) if trained is not None else None
    singles, current, lock = {}, {}, threading.Lock()

    def show(d) -> None:
        out.outputs = ()
        out.append_display_data(Image(picker_picture(d, ctx, singles.get(d.get("a_bits")))))
        readout.value = picker_readout(d)

    def compute(gen: int) -> None:
        with lock:   # one computation at a time; a stale one is dropped unshown
            if not is_current(gen):
                return
            try:
                d = picker_update(ctx, model, [b for b, t in toggles.items() if t.value], e_s.value,
                                  ACT_CHOICES[act.value], singles)
            except Exception as e:   # in a timer thread nobody sees a traceback: show it (an empty list too)
                out.outputs, readout.value = (), f"<b>error</b>: {type(e).__name__}: {e}"
                return
            if is_current(gen):
                current.update(d=d, gen=gen)
                remember(ctx, d)
                show(d)

    def measure_current() -> None:
        with lock:   # the allocation on screen, unless a newer change is pending
            if "d" in current and is_current(current["gen"]):
                measure(ctx, current["d"])
                show(current["d"])
        button.disabled = False

    def on_measure(_):
        button.disabled = True
        threading.Thread(target=measure_current, daemon=True).start()

    changed, is_current = debounced(compute, debounce)
    for w in [*toggles.values(), e_s, act]:
        w.observe(changed, names="value")
    button.on_click(on_measure)
    compute(0)   # the first picture synchronously: an executed notebook keeps it
    controls = [W.HBox([W.Label("bit widths"), *toggles.values()]), e_s] + ([W.HBox([act, button])] if ctx else [])
    return W.VBox([*controls, out, readout])
