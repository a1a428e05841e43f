"""The uniform quantizer and the six rounding functions of the paper's Table 5.

Notation (paper §3.1, §3.3): a weight ``w`` with step size ``s`` maps to
``ŵ = s · clip(r(w/s), l, h)``, where ``r`` is a rounding function and ``[l, h]`` the integer
grid of ``b`` bits. Every function here works on ``v = w/s`` (grid units) and returns the
integer ``r(v)`` *before* clipping.
"""
from __future__ import annotations

import math

import torch

ROUNDINGS = ("nearest", "floor", "ceil", "stochastic", "adaround", "attention")

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020, eq. 23): ζ = 1.1, γ = −0.1.
ZETA, GAMMA = 1.1, -0.1


def check_bits(bits, what: str = "bits") -> int:
    """Bits must be an integer in 2..16; anything else is a clear ValueError."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{what} must be an integer between 2 and 16, got {bits!r}")
    return bits


def grid(bits: int, signed: bool = True) -> tuple[int, int]:
    """The integer range [l, h]: signed two's-complement, or unsigned (after a ReLU)."""
    check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def fake_quant(w: torch.Tensor, s: torch.Tensor | float, bits: int, signed: bool = True) -> torch.Tensor:
    """Round-to-nearest quantize-dequantize: s · clip(⌊w/s⌉, l, h)."""
    lo, hi = grid(bits, signed)
    return s * torch.clamp(torch.round(w / s), lo, hi)


WEIGHT_STEPS = ("mse", "maxabs")


@torch.no_grad()
def search_weight_scale(w: torch.Tensor, bits: int, n_candidates: int = 100, *, method: str = "mse",
                        per_channel: bool = True) -> torch.Tensor:
    """Per-output-channel step size minimising ‖W − Ŵ‖² under nearest rounding (paper §4.1).

    Candidates are s = r · max|w| / h for r on a grid in (0, 1]; each channel keeps its best.
    ``method="maxabs"`` takes r = 1 (no clipping, the simplest rule); ``per_channel=False``
    gives the whole tensor one step (chapter 7's ablations). Returns a tensor shaped to
    broadcast against ``w`` (C_out × 1 × …)."""
    if method not in WEIGHT_STEPS:
        raise ValueError(f"unknown weight-step method {method!r}; choose one of {WEIGHT_STEPS}")
    lo, hi = grid(bits, True)
    flat = w.reshape(w.shape[0] if per_channel else 1, -1)
    max_abs = flat.abs().amax(1).clamp_min(1e-8)
    best_err = torch.full_like(max_abs, float("inf"))
    best_s = max_abs / hi
    ratios = torch.linspace(1.0 / n_candidates, 1.0, n_candidates).tolist() if method == "mse" else []
    for r in ratios:
        s = (r * max_abs / hi).unsqueeze(1)
        err = (fake_quant(flat, s, bits) - flat).pow(2).sum(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s.squeeze(1), best_s)
    return best_s.expand(w.shape[0]).reshape(-1, *([1] * (w.dim() - 1))).clone()


@torch.no_grad()
def search_act_scale(x: torch.Tensor, bits: int, signed: bool, n_candidates: int = 100) -> float:
    """One step size for an activation tensor, minimising the quantization MSE over
    candidates s = r · max|x| / h, r ∈ (0, 1]."""
    lo, hi = grid(bits, signed)
    max_abs = float(x.abs().max().clamp_min(1e-8))
    xs = x.flatten()
    # A fixed random sample of 200k values keeps the search cheap (it fits in cache: 35×
    # faster than 1M values on our CPU) and moves the chosen step by ~0.2%. Drawn with
    # replacement: a permutation of a 19M-value map cost more than the search itself.
    if xs.numel() > 200_000:
        keep = torch.randint(xs.numel(), (200_000,), generator=torch.Generator().manual_seed(0))
        xs = xs[keep.to(xs.device)]
    ratios = torch.linspace(1.0 / n_candidates, 1.0, n_candidates).tolist()
    # all candidates' errors stay on the device; one argmin at the end (no per-candidate sync)
    errs = torch.stack([(fake_quant(xs, r * max_abs / hi, bits, signed) - xs).pow(2).mean()
                        for r in ratios])
    return float(ratios[int(errs.argmin())]) * max_abs / hi


def round_fixed(v: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Nearest, floor, ceil or stochastic rounding of v = w/s (paper §1).

    Stochastic rounding rounds up with probability v − ⌊v⌋, so E[r(v)] = v (unbiased)."""
    if mode == "nearest":
        return torch.round(v)
    if mode == "floor":
        return torch.floor(v)
    if mode == "ceil":
        return torch.ceil(v)
    if mode == "stochastic":
        frac = v - torch.floor(v)
        u = torch.rand(v.shape, generator=generator, device="cpu").to(v.device)
        return torch.floor(v) + (u < frac).to(v.dtype)
    raise ValueError(f"unknown fixed rounding {mode!r}")


# --- AdaRound (Nagel et al. 2020) -----------------------------------------------------------

def rectified_sigmoid(V: torch.Tensor) -> torch.Tensor:
    """h(V) = clip(σ(V)(ζ − γ) + γ, 0, 1)."""
    return torch.clamp(torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA, 0, 1)


def adaround_init(v: torch.Tensor) -> torch.Tensor:
    """V such that h(V) equals the fractional part of v, so training starts at ŵ = w."""
    frac = (v - torch.floor(v)).clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)


def adaround_regularizer(V: torch.Tensor, beta: float) -> torch.Tensor:
    """``f(V) = Σ 1 − |2h(V) − 1|^β`` (AdaRound's eq. 24): pushes every h(V) to 0 or 1 as β falls."""
    return (1 - (2 * rectified_sigmoid(V) - 1).abs().pow(beta)).sum()


def adaround_beta(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0):
    """β for an iteration: None during the warm-up (no regulariser), then annealed linearly
    from 20 to 2 (as in the AdaRound reference code)."""
    w = int(warmup * total)
    if step < w:
        return None
    t = (step - w) / max(1, total - w)
    return end + (start - end) * max(0.0, 1 - t)


# --- Attention Round (paper eq. 3–7) --------------------------------------------------------

def std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) = ½ + ½ erf(x/√2) (eq. 6–7)."""
    return 0.5 + 0.5 * torch.erf(x / math.sqrt(2.0))


def backward_factor(alpha: torch.Tensor, sigma, grad_positive: torch.Tensor) -> torch.Tensor:
    """∂z/∂α of eq. 6: Φ(α/σ) where ∂L/∂z > 0, 1 − Φ(α/σ) otherwise, σ the std of α in grid
    steps. σ = 0 (τ = 0) is the limit: a step function, ½ at α = 0."""
    sigma = torch.as_tensor(sigma, dtype=alpha.dtype, device=alpha.device)
    safe = torch.where(sigma > 0, sigma, torch.ones_like(sigma))
    step = (torch.sign(alpha) + 1) / 2  # the τ → 0 limit: 0, ½, 1 (no host tensor in the loop)
    phi = torch.where(sigma > 0, std_normal_cdf(alpha / safe), step)
    return torch.where(grad_positive, phi, 1 - phi)


class AttentionRound(torch.autograd.Function):
    """z = ⌊v + α⌉ (eq. 3, round-to-nearest; the extraction prints ⌊·⌋) with the eq. 6 backward.

    ``v`` = w/s is a constant; the gradient flows to α only. ``sigma`` is the std of α in grid
    steps (a scalar or a tensor broadcastable to α)."""

    @staticmethod
    def forward(ctx, v, alpha, sigma):
        sigma = torch.as_tensor(sigma, dtype=alpha.dtype, device=alpha.device)
        ctx.save_for_backward(alpha, sigma)
        return torch.round(v + alpha)

    @staticmethod
    def backward(ctx, grad_z):
        alpha, sigma = ctx.saved_tensors
        return None, grad_z * backward_factor(alpha, sigma, grad_z > 0), None


def attention_round(v: torch.Tensor, alpha: torch.Tensor, sigma) -> torch.Tensor:
    """Functional form of :class:`AttentionRound`: ⌊v + α⌉ with the eq. 6 gradient to α."""
    return AttentionRound.apply(v, alpha, sigma)


def ste_round(v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """⌊v + α⌉ with a plain straight-through gradient (∂z/∂α = 1): eq. 3's forward without
    eq. 6's backward, for chapter 7's ablation."""
    x = v + alpha
    return x + (torch.round(x) - x).detach()


def attention_probabilities(v: float, sigma: float, lo: int, hi: int) -> torch.Tensor:
    """Eq. 2 (with the density's 1/(√(2π)σ) corrected): the probability that ⌊v + α⌉ lands on
    each grid integer q ∈ [lo, hi] when α ~ N(0, σ²), clipping included (the end cells
    absorb the tails). Returns a float64 vector of length hi − lo + 1."""
    q = torch.arange(lo, hi + 1, dtype=torch.float64)
    if sigma == 0:
        p = torch.zeros_like(q)
        p[int(min(max(round(v), lo), hi)) - lo] = 1.0
        return p
    upper = std_normal_cdf((q + 0.5 - v) / sigma)
    lower = std_normal_cdf((q - 0.5 - v) / sigma)
    upper[-1], lower[0] = 1.0, 0.0
    return upper - lower
