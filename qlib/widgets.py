"""Interactive explorers for the chapters: ipywidgets on top of pure functions.

The pure functions (``tau_explorer_data``) compute everything a figure shows, so the tests
check them without a browser; the widget functions only wire sliders to a plot.
"""
from __future__ import annotations

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


def bit_picker(model, bitlist=(3, 4, 5, 6), eps2: float | None = None):
    """Toggle buttons for the candidate widths 2..8 and an ε² slider (default
    :data:`qlib.mixed.EPS2`), driving the per-layer allocation plot and the model size
    against single precision."""
    import ipywidgets as W
    import matplotlib.pyplot as plt

    toggles = {b: W.ToggleButton(value=b in bitlist, description=str(b), layout=W.Layout(width="42px"))
               for b in range(2, 9)}
    e_s = W.FloatLogSlider(value=mixed.EPS2 if eps2 is None else eps2, base=10, min=-5, max=1, step=0.25, description="ε²")
    out = W.Output()

    def redraw(*_):
        with out:
            out.clear_output(wait=True)
            chosen = [b for b, t in toggles.items() if t.value]
            if not chosen:
                print("pick at least one bit width")
                return
            d = bit_picker_data(model, chosen, e_s.value)
            plot_bit_allocation(d)
            plt.tight_layout()
            plt.show()
            print(f"model size {1e3 * d['size_mb']:.2f} kB; single precision: " +
                  ", ".join(f"{b} bits {1e3 * s:.2f} kB" for b, s in d["uniform_mb"].items()))

    for w in [*toggles.values(), e_s]:
        w.observe(redraw, names="value")
    redraw()
    return W.VBox([W.HBox([W.Label("bit widths"), *toggles.values()]), e_s, out])
