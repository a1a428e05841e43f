"""Post-training quantization of a whole model: the user's entry point.

The recipe is the paper's §4.1: BatchNorm folded into the convolutions; weight step sizes
per output channel by minimising ‖W − Ŵ‖² under nearest rounding; first and last layers at
8 bits; each unit (a residual block, an inverted-residual block, or a lone conv/linear
layer) calibrated in turn by minimising ‖f(x) − f̂(x)‖² with Adam; activation step sizes
initialised by an MSE search and learned (LSQ) during reconstruction::

    qmodel = quantize(model, calib, w_bits=4, a_bits=4, rounding="attention", iters=2000)
    save(qmodel, "resnet-w4a4.pt"); qmodel = load("resnet-w4a4.pt", "resnet")
    export(qmodel)   # {layer: integer weights, per-channel scale, bits, activation step}

A quantized model is an artefact: every QuantLayer holds its integer weights and scales as
buffers and its bit widths as extra state, so ``state_dict``, ``.to(device)`` and
``torch.load(weights_only=True)`` carry all of it, and the calibration report travels in
the state dict too (``quant_report``).
"""
from __future__ import annotations

import copy
import inspect
import json
import os
import tempfile
import time
import warnings
import weakref
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from qlib import cache, checks, models
from qlib.capture import capture, capture_many  # noqa: F401 (API: chapters use quant.capture)
from qlib.graph import (DEFAULT_BLOCKS, calibration_units, check_blocks, fold_bn,  # noqa: F401
                        quantizable_layers, set_module)
from qlib.recon import reconstruct
from qlib.rounding import (ROUNDINGS, adaround_init, attention_round, check_bits, grid,
                           rectified_sigmoid, round_fixed, search_act_scale, search_weight_scale,
                           ste_round)
from qlib.rounding import AttentionRound  # noqa: F401 (public name: qlib.quant.AttentionRound, eq. 3 / eq. 6)

FIXED = ("nearest", "floor", "ceil", "stochastic")  # no calibration
LEARNED = ("adaround", "attention")                  # block reconstruction
#: Chapter 7's ablation switches and the recipe's choices (the defaults): weight steps by the
#: ‖W − Ŵ‖² search or max-abs, per channel or per tensor; Attention Round's α started from
#: N(0, τ²) or zeros, trained through eq. 6's backward or a plain straight-through gradient;
#: activation steps learned during reconstruction or left at their MSE initialisation.
VARIANT = {"weight_steps": "mse", "per_channel": True, "alpha_init": "gaussian", "backward": "eq6",
           "learn_act_steps": True}
FORMAT = "qlib.quant/1"


def setting_name(w_bits, a_bits: int | None = None) -> str:
    """The book's label for a setting: "W4A4", "W3A32" for float activations, "WmixedA8"
    for a per-layer bit dict."""
    w = w_bits if isinstance(w_bits, int) else "mixed"
    return f"W{w}A{a_bits or 32}"


def int_dtype(bits: int) -> torch.dtype:
    """The narrowest signed integer type that holds a ``bits``-bit grid."""
    return torch.int8 if check_bits(bits) <= 8 else torch.int16


# --- quantized layers ----------------------------------------------------------------------

class ActQuant(nn.Module):
    """Uniform activation quantizer with a learned step size (LSQ, Esser et al. 2020):
    round-to-nearest with a straight-through gradient, the step's gradient scaled by
    1/√(numel · h). ``bits``, ``signed`` and ``enabled`` are extra state (in state_dict)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = check_bits(bits, "a_bits")
        self.signed = True
        self.enabled = False
        self.scale = nn.Parameter(torch.tensor(1.0))

    def init_from(self, x: torch.Tensor) -> None:
        self.signed = bool(x.min() < 0)
        self.scale.data.fill_(search_act_scale(x, self.bits, self.signed))
        self.enabled = True

    def get_extra_state(self) -> dict:
        return {"bits": self.bits, "signed": self.signed, "enabled": self.enabled}

    def set_extra_state(self, state: dict) -> None:
        self.bits, self.signed, self.enabled = state["bits"], state["signed"], state["enabled"]

    def forward(self, x):
        if not self.enabled:
            return x
        lo, hi = grid(self.bits, self.signed)
        if not torch.is_grad_enabled():
            # evaluation: the same grid in three in-place passes instead of LSQ's six
            return (x / self.scale).clamp_(lo, hi).round_().mul_(self.scale)
        g = 1.0 / (x[0].numel() * hi) ** 0.5
        s = self.scale * g + (self.scale * (1 - g)).detach()  # LSQ gradient scaling
        v = torch.clamp(x / s, lo, hi)
        return (v + (torch.round(v) - v).detach()) * s  # straight-through round

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, enabled={self.enabled}"


class QuantLayer(nn.Module):
    """A Conv2d or Linear with a quantized weight ŵ = scale · w_int and, optionally, a
    quantized input (:class:`ActQuant`).

    Built from a float layer it is a finished layer's skeleton: ``w_int`` (int8, int16 above
    8 bits), ``scale`` (per output channel) and ``bias`` buffers. :meth:`start` adds the
    calibration state of a rounding function (v = w/s and AdaRound's V or Attention Round's
    α); :meth:`finalize` freezes it into ``w_int`` and drops it."""

    def __init__(self, layer: nn.Module, w_bits: int, a_bits: int | None = None):
        super().__init__()
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise ValueError(f"QuantLayer takes a Conv2d or Linear, got {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise ValueError(f"Conv2d with padding_mode={layer.padding_mode!r} cannot be quantized; "
                             "only zero padding is supported")
        self.w_bits, self.rounding = check_bits(w_bits, "w_bits"), "nearest"
        self.conv = (dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                          groups=layer.groups) if isinstance(layer, nn.Conv2d) else None)
        w = layer.weight.detach()
        self.register_buffer("w_int", torch.zeros(w.shape, dtype=int_dtype(self.w_bits), device=w.device))
        self.register_buffer("scale", torch.ones(w.shape[0], *([1] * (w.dim() - 1)), device=w.device))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().clone())
        self.register_buffer("v", None)  # w/s while a learned rounding is being calibrated
        self.act = ActQuant(a_bits) if a_bits is not None else None
        self.soft = False  # AdaRound trains through the soft h(V); set by the reconstruction
        self.backward = "eq6"
        # ŵ materialised once by freeze(), for evaluation passes: a buffer so that .to()
        # moves it, not persistent so that it is never saved
        self.register_buffer("frozen", None, persistent=False)

    @property
    def lo(self) -> int:
        return grid(self.w_bits, True)[0]

    @property
    def hi(self) -> int:
        return grid(self.w_bits, True)[1]

    @torch.no_grad()
    def start(self, weight: torch.Tensor, rounding: str, tau: float = 0.5, tau_units: str = "grid",
              generator: torch.Generator | None = None, variant: dict | None = None) -> "QuantLayer":
        """Search the step sizes for ``weight`` and set up ``rounding``: a fixed rule rounds
        at once (the layer is final); AdaRound and Attention Round get their variables.
        ``variant`` holds chapter 7's ablation switches (see :data:`VARIANT`)."""
        v_ = {**VARIANT, **(variant or {})}
        self.frozen = None  # new weights follow
        self.rounding = rounding
        self.backward = v_["backward"]
        self.scale = search_weight_scale(weight, self.w_bits, method=v_["weight_steps"],
                                         per_channel=v_["per_channel"])
        v = weight / self.scale
        if rounding in FIXED:
            self.w_int = torch.clamp(round_fixed(v, rounding, generator), self.lo, self.hi).to(self.w_int.dtype)
        elif rounding == "adaround":
            self.v = v
            self.V = nn.Parameter(adaround_init(v))
        elif rounding == "attention":
            self.v = v
            # σ, the std of α in grid steps: τ itself (the book's reading), or τ/s per output
            # channel (the literal reading, τ in weight units)
            sigma = torch.as_tensor(float(tau)) if tau_units == "grid" else tau / self.scale
            self.register_buffer("sigma", sigma.to(weight.dtype).to(weight.device))
            noise = torch.randn(v.shape, generator=generator).to(v.device)
            if v_["alpha_init"] == "zeros":
                noise = torch.zeros_like(v)
            self.alpha = nn.Parameter(noise * self.sigma)  # α ~ N(0, σ²), σ in grid steps
        else:
            raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
        return self

    def rounding_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters(recurse=False) if n in ("V", "alpha")]

    def integer_weight(self, soft: bool = False) -> torch.Tensor:
        """The weight on the integer grid (clipped), as floats. While AdaRound is trained
        (``soft=True``) its soft h(V), its hard 0/1 choice otherwise."""
        if self.v is None:
            return self.w_int.to(self.scale.dtype)
        if self.rounding == "adaround":
            h = rectified_sigmoid(self.V) if soft else (self.V >= 0).to(self.v.dtype)
            z = torch.floor(self.v) + h
        elif self.backward == "ste":
            z = ste_round(self.v, self.alpha)
        else:
            z = attention_round(self.v, self.alpha, self.sigma)
        return torch.clamp(z, self.lo, self.hi)

    def weight(self, soft: bool = False) -> torch.Tensor:
        """ŵ = scale · w_int (eq. 3's ŵ for Attention Round)."""
        return self.scale * self.integer_weight(soft)

    @torch.no_grad()
    def finalize(self) -> None:
        """Freeze the learned rounding into ``w_int``; drop v, V, α and σ."""
        self.frozen = None
        if self.v is None:
            return
        self.w_int = self.integer_weight(soft=False).to(self.w_int.dtype)
        self.v = None
        for name in ("V", "alpha", "sigma"):
            if hasattr(self, name):
                delattr(self, name)

    @torch.no_grad()
    def freeze(self) -> "QuantLayer":
        """Materialise ŵ = scale · w_int once, so evaluation passes (no autograd) skip the
        integer → float conversion per batch (never saved; loading a state or finalize()
        drops it). A layer still being calibrated cannot be frozen."""
        if self.v is not None:
            raise ValueError("this layer is still being calibrated; call finalize() first")
        self.frozen = self.weight()
        return self

    def get_extra_state(self) -> dict:
        return {"w_bits": self.w_bits, "rounding": self.rounding,
                "a_bits": self.act.bits if self.act is not None else None}

    def set_extra_state(self, state: dict) -> None:
        self.w_bits, self.rounding = state["w_bits"], state["rounding"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # an int16 (9–16 bit) state loaded into an int8 layer would wrap around in copy_
        w = state_dict.get(prefix + "w_int")
        if w is not None and w.dtype != self.w_int.dtype and w.shape == self.w_int.shape:
            self.w_int = torch.empty_like(self.w_int, dtype=w.dtype)
        self.frozen = None  # materialised from the old weights
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x):
        if self.act is not None:
            x = self.act(x)
        w = self.frozen if self.frozen is not None and not torch.is_grad_enabled() else self.weight(soft=self.soft)
        if self.conv is not None:
            return F.conv2d(x, w, self.bias, **self.conv)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        kind = "Conv2d" if self.conv is not None else "Linear"
        return f"{kind} {tuple(self.w_int.shape)}, w_bits={self.w_bits}, rounding={self.rounding}"


# The calibration report travels in the state dict under this key: a state-dict hook on the
# model's root adds it and a load pre-hook takes it back. (A child module would be simpler,
# but nn.Sequential calls every child in its forward.)
REPORT_KEY = "quant_report"


def _report_to_state(module, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + REPORT_KEY] = dict(module.quant_report)


def _report_from_state(module, state_dict, prefix, local_metadata, strict, missing, unexpected,
                       errors) -> None:
    report = state_dict.pop(prefix + REPORT_KEY, None)
    if report is not None:
        module.quant_report = dict(report)


def attach_report(qmodel: nn.Module, report: dict) -> None:
    """Set ``qmodel.quant_report`` and make it part of the model's state dict."""
    qmodel.quant_report = dict(report)
    qmodel.register_state_dict_post_hook(_report_to_state)
    qmodel.register_load_state_dict_pre_hook(_report_from_state)


def freeze(qmodel: nn.Module) -> nn.Module:
    """Every QuantLayer of ``qmodel`` with its ŵ materialised (:meth:`QuantLayer.freeze`),
    for repeated evaluation passes; the outputs are bit-identical to the unfrozen model's."""
    for m in quant_layers(qmodel).values():
        m.freeze()
    return qmodel


def quant_layers(model: nn.Module) -> dict[str, QuantLayer]:
    """Every QuantLayer of ``model`` by name, in registration order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLayer)}


# --- quantize(), step by step --------------------------------------------------------------

def _check_args(model, calib, rounding, tau, tau_units, a_bits, first_last_bits, iters, batch_size,
                lr, act_lr, seed) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
    checks.number(tau, "tau", low=0, meaning="the std of α in grid steps")
    if tau_units not in ("grid", "weight"):
        raise ValueError(f"tau_units must be 'grid' or 'weight', got {tau_units!r}")
    check_bits(first_last_bits, "first_last_bits")
    if a_bits is not None:
        check_bits(a_bits, "a_bits")
    checks.integer(batch_size, "batch_size", low=1, meaning="calibration images per step")
    checks.integer(iters, "iters", low=0, meaning="Adam steps per unit")
    checks.integer(seed, "seed", low=0)
    checks.number(lr, "lr", low=0, strict=True, meaning="Adam's step size")
    if act_lr is not None:
        checks.number(act_lr, "act_lr", low=0, strict=True, meaning="Adam's step size for activation steps")
    checks.images(calib, "calib", model)
    checks.finite_model(model)
    if rounding in LEARNED and len(calib) < batch_size:
        raise ValueError(f"{len(calib)} calibration images are fewer than the batch size "
                         f"{batch_size}; pass more images or a smaller batch_size")


def check_variant(variant) -> dict:
    """The ablation switches with the recipe's defaults filled in; unknown keys or values are
    refused with what is allowed."""
    if variant is None:
        return dict(VARIANT)
    if not isinstance(variant, dict):
        raise ValueError(f"variant must be a dict over {sorted(VARIANT)}, got {type(variant).__name__}")
    unknown = set(variant) - set(VARIANT)
    if unknown:
        raise ValueError(f"unknown variant keys {sorted(unknown)}; choose from {sorted(VARIANT)}")
    allowed = {"weight_steps": ("mse", "maxabs"), "per_channel": (True, False),
               "alpha_init": ("gaussian", "zeros"), "backward": ("eq6", "ste"), "learn_act_steps": (True, False)}
    for k, v in variant.items():
        if v not in allowed[k] or (isinstance(v, bool) != isinstance(allowed[k][0], bool)):
            raise ValueError(f"variant[{k!r}] must be one of {allowed[k]}, got {v!r}")
    return {**VARIANT, **variant}


def bits_per_layer(names: list[str], w_bits, first_last_bits: int = 8) -> dict[str, int]:
    """``{layer: bits}`` from an int or a dict (which may omit the first and last layers);
    the first and last layers always get ``first_last_bits``."""
    first, last = names[0], names[-1]
    if isinstance(w_bits, dict):
        missing = [n for n in names if n not in w_bits and n not in (first, last)]
        unknown = [n for n in w_bits if n not in names]
        if missing or unknown:
            raise ValueError(f"w_bits dict: missing layers {missing}, unknown layers {unknown}; "
                             f"quantized layers are {names}")
        bits = {n: check_bits(w_bits.get(n, first_last_bits), f"w_bits[{n!r}]") for n in names}
    else:
        check_bits(w_bits, "w_bits")
        bits = {n: w_bits for n in names}
    bits[first] = bits[last] = first_last_bits
    return bits


def _act_bits(n: str, names: list[str], a_bits: int | None, first_last_bits: int) -> int | None:
    """The first layer's input stays float (it is the image); the last layer's at 8 bits."""
    if a_bits is None or n == names[0]:
        return None
    return first_last_bits if n == names[-1] else a_bits


def _insert_quant_layers(fp: nn.Module, names, bits, a_bits, first_last_bits, rounding, tau,
                         tau_units, generator, dev, variant=None) -> nn.Module:
    q = copy.deepcopy(fp)
    for n in names:
        layer = q.get_submodule(n)
        ql = QuantLayer(layer, bits[n], _act_bits(n, names, a_bits, first_last_bits))
        ql.start(layer.weight.detach(), rounding, tau, tau_units, generator, variant)
        set_module(q, n, ql.to(dev))
    return q.eval()


# Initial activation steps depend only on the float model, the first 256 calibration images
# and the bit widths, yet cost a capture pass and one search per layer: populations and
# tables quantize one float model many times, so they are kept per model object (weakly: an
# entry dies with its model) under a key that changes when any weight is modified in place.
_ACT_INIT_MEMO: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _act_init_key(model: nn.Module, calib: torch.Tensor, a_bits: int, first_last_bits: int, dev) -> tuple:
    tensors = list(model.parameters()) + list(model.buffers())
    head = calib[:256]
    return (tuple((id(t), t._version) for t in tensors), calib.data_ptr(), calib._version,
            tuple(head.shape), float(head.double().sum()), a_bits, first_last_bits, str(dev))


def _init_act_steps(model: nn.Module, fp: nn.Module, q: nn.Module, names: list[str], calib: torch.Tensor,
                    batch_size: int, dev: torch.device, a_bits: int, first_last_bits: int) -> None:
    """Every activation step size from an MSE search on the float model's layer inputs
    (256 images, one capture pass), memoised per float model."""
    key = _act_init_key(model, calib, a_bits, first_last_bits, dev)
    memo = _ACT_INIT_MEMO.setdefault(model, {})
    if key not in memo:
        inputs = capture_many(fp, [fp.get_submodule(n) for n in names[1:]], calib[:256],
                              batch_size, dev, "input")
        for n, x_in in zip(names[1:], inputs):
            q.get_submodule(n).act.init_from(x_in)
        if len(memo) >= 16:  # a few bit widths per model; stale weight versions age out
            memo.pop(next(iter(memo)))
        memo[key] = {n: (q.get_submodule(n).act.scale.item(), q.get_submodule(n).act.signed) for n in names[1:]}
        return
    for n, (scale, signed) in memo[key].items():
        act = q.get_submodule(n).act
        act.scale.data.fill_(scale)
        act.signed, act.enabled = signed, True


def _calibrate_units(fp, q, calib, blocks, *, iters, batch_size, lr, act_lr, rounding, generator,
                     dev, progress, learn_act_steps: bool = True) -> dict[str, list[float]]:
    """Reconstruct every unit in forward order; returns each unit's loss curve."""
    units = calibration_units(q, (QuantLayer,), blocks)
    # The float units' outputs (the targets) never change: one pass for all of them. Each
    # unit's input comes from the quantized model as calibrated so far, so it is captured
    # afresh, once per unit, after the units before it are frozen.
    targets = capture_many(fp, [fp.get_submodule(u) for u in units], calib, batch_size, dev, "output")
    losses = {}
    for k, u in enumerate(units):
        unit = q.get_submodule(u)
        x = capture(q, unit, calib, batch_size, dev, "input")
        y, targets[k] = targets[k], None  # free each target once its unit is done
        qlayers = [m for m in unit.modules() if isinstance(m, QuantLayer)]
        for m in qlayers:
            if m.act is not None:
                m.act.scale.requires_grad_(learn_act_steps)
        with torch.enable_grad():
            losses[u] = reconstruct(unit, qlayers, x, y, iters=iters, batch_size=batch_size, lr=lr,
                                    act_lr=act_lr, rounding=rounding, generator=generator,
                                    desc=f"{rounding} {k + 1}/{len(units)} {u}", progress=progress)
        for m in qlayers:
            m.finalize()
    return losses


def quantize(model: nn.Module, calib: torch.Tensor, *, w_bits, a_bits: int | None = None,
             rounding: str = "attention", tau: float = 0.5, iters: int = 2000,
             batch_size: int = 64, lr: float = 4e-4, first_last_bits: int = 8,
             device: str | torch.device = "auto", seed: int = 0, tau_units: str = "grid",
             blocks=None, act_lr: float | None = None, variant: dict | None = None,
             progress: bool = True) -> nn.Module:
    """A quantized copy of ``model`` (which is left untouched), calibrated on ``calib``.

    * ``w_bits``: an int, or ``{layer_name: bits}`` for every quantized layer (first and
      last layers may be omitted: they use ``first_last_bits``).
    * ``a_bits``: bits for the input of every layer but the first (None: activations stay
      float).
    * ``rounding``: nearest, floor, ceil, stochastic (fixed, no calibration), adaround or
      attention (eq. 3–6; unit-by-unit reconstruction, ``iters`` Adam steps per unit).
    * ``lr``, ``act_lr``: Adam's learning rates for the rounding variables (α or V) and for
      the activation step sizes (None: lr/10, BRECQ's ratio).
    * ``tau``: the std of Attention Round's α. ``tau_units="grid"`` (the book's reading)
      takes τ in grid steps, α ~ N(0, τ²); ``"weight"`` is the literal reading
      α ~ N(0, (τ/s)²).
    * ``blocks``: module types reconstructed as one unit (default
      :data:`qlib.graph.DEFAULT_BLOCKS`: torchvision's BasicBlock, Bottleneck and
      InvertedResidual); ``()`` reconstructs layer by layer.
    * ``variant``: chapter 7's ablation switches, a dict over the keys of :data:`VARIANT`
      (the defaults are the recipe): weight_steps "mse"/"maxabs", per_channel, alpha_init
      "gaussian"/"zeros", backward "eq6"/"ste", learn_act_steps.

    The returned model is on the CPU and carries ``quant_report`` (seconds, images,
    iterations, device, bits and the per-unit reconstruction losses), part of its state."""
    _check_args(model, calib, rounding, tau, tau_units, a_bits, first_last_bits, iters, batch_size,
                lr, act_lr, seed)
    blocks = check_blocks(blocks)
    variant = check_variant(variant)
    start = time.perf_counter()
    dev = models.resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    fp = fold_bn(model).to(dev)
    names = quantizable_layers(fp)
    bits = bits_per_layer(names, w_bits, first_last_bits)
    q = _insert_quant_layers(fp, names, bits, a_bits, first_last_bits, rounding, tau, tau_units, gen, dev,
                             variant)
    calib = calib.to(dev)
    if a_bits is not None:
        _init_act_steps(model, fp, q, names, calib, batch_size, dev, a_bits, first_last_bits)
    losses = {}
    if rounding in LEARNED:
        losses = _calibrate_units(fp, q, calib, blocks, iters=iters, batch_size=batch_size, lr=lr,
                                  act_lr=act_lr, rounding=rounding, generator=gen, dev=dev, progress=progress,
                                  learn_act_steps=variant["learn_act_steps"])
    for m in quant_layers(q).values():
        m.finalize()  # a no-op for the fixed rules and for every calibrated unit
    q.requires_grad_(False)
    attach_report(q, {"seconds": time.perf_counter() - start, "images": len(calib),
                      "iters_per_module": iters if rounding in LEARNED else 0, "device": str(dev),
                      "rounding": rounding, "w_bits": bits, "a_bits": a_bits, "losses": losses})
    return q.cpu()


# --- the artefact: save, load, export ------------------------------------------------------

def save(qmodel: nn.Module, path: str | Path) -> Path:
    """Write a quantized model's state (integer weights, scales, activation steps, bit
    widths, report) atomically; :func:`load` rebuilds it. No pickled code is written."""
    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError("save() takes a quantized model (from quantize()); this one has no QuantLayer")
    unfinished = [n for n, m in layers.items() if m.v is not None]
    if unfinished:
        raise ValueError(f"layers {unfinished} are still being calibrated; call finalize() first")
    path = Path(path)
    cache.save({"format": FORMAT, "state_dict": qmodel.state_dict()}, path)
    return path


def load(path: str | Path, float_model_or_arch: nn.Module | str) -> nn.Module:
    """The quantized model saved at ``path``. ``float_model_or_arch`` gives its structure:
    the float model it was quantized from (any weights: all are replaced), or the name of
    one of the book's architectures. Loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no quantized model at {path}")
    try:
        rec = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable qlib quantized model ({type(e).__name__}: {e}); "
                         "save it again with qlib.quant.save") from e
    if not isinstance(rec, dict) or rec.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} file; save it with qlib.quant.save")
    sd = rec["state_dict"]
    model = models.build(float_model_or_arch) if isinstance(float_model_or_arch, str) else float_model_or_arch
    q = fold_bn(model)
    for n in quantizable_layers(q):
        cfg = sd.get(f"{n}._extra_state")
        if cfg is None:
            raise ValueError(f"{path} has no quantized layer {n!r}: it was saved from another architecture")
        set_module(q, n, QuantLayer(q.get_submodule(n), cfg["w_bits"], cfg["a_bits"]))
    attach_report(q, {})
    q.load_state_dict(sd)
    return q.eval().requires_grad_(False)


def export(qmodel: nn.Module) -> dict[str, dict]:
    """What a deployment needs, per quantized layer: ``weight_int`` (int8; int16 above 8
    bits), ``scale`` (one float per output channel), ``bias``, ``bits``, and the input's
    ``act_step`` (None for a float input) with ``act_bits`` and ``act_signed``. The float
    weight is ``weight_int * scale`` broadcast over the output-channel axis."""
    out = {}
    for n, m in quant_layers(qmodel).items():
        if m.v is not None:
            raise ValueError(f"layer {n!r} is still being calibrated; call finalize() first")
        act = m.act if m.act is not None and m.act.enabled else None
        out[n] = {"weight_int": m.w_int.detach().cpu().clone(), "scale": m.scale.detach().flatten().cpu(),
                  "bias": None if m.bias is None else m.bias.detach().cpu().clone(), "bits": m.w_bits,
                  "act_step": float(act.scale) if act is not None else None,
                  "act_bits": act.bits if act is not None else None,
                  "act_signed": act.signed if act is not None else None}
    return out


# --- ONNX: QuantizeLinear / DequantizeLinear pairs -------------------------------------------
# Each quantized layer leaves as the standard QDQ pattern that onnxruntime reads: the weight
# as an int8 initializer behind a per-axis DequantizeLinear, the input behind Clip →
# QuantizeLinear → DequantizeLinear, the bias as int32 (TensorRT's parser is reported to refuse an int32
# DequantizeLinear; onnxruntime's integer kernels need it). QuantizeLinear's integer types are
# 8 bits wide before opset 21 (which adds 4-bit types, and nothing for 2, 3, 5 or 6 bits), so
# a b-bit grid (b ≤ 8) is represented exactly inside the 8-bit one: weights are integers of
# the b-bit range stored in int8, activations are clipped to the b-bit range's values before
# an 8-bit QuantizeLinear, which then cannot produce anything outside it.

ONNX_OPSET = 17


class _DequantizeWeight(torch.autograd.Function):
    """ŵ = scale · w_int, exported as DequantizeLinear(w_int, scale, 0, axis=0): a weight
    (int8) or a bias (int32) with one scale per output channel."""

    @staticmethod
    def forward(ctx, w_int, scale, zero_point):
        return w_int.to(scale.dtype) * scale.view(-1, *([1] * (w_int.dim() - 1)))

    @staticmethod
    def symbolic(g, w_int, scale, zero_point):
        return g.op("DequantizeLinear", w_int, scale, zero_point, axis_i=0)


class _QuantizeDequantize(torch.autograd.Function):
    """ActQuant's evaluation forward, exported as Clip → QuantizeLinear → DequantizeLinear
    (the clip only below 8 bits: at 8 the QuantizeLinear saturates at the grid's ends).
    ``clip`` holds the grid's ends in value units, lo·step and hi·step, as Python floats."""

    @staticmethod
    def forward(ctx, x, step, zero_point, lo, hi, clip):
        return (x / step).clamp(lo, hi).round() * step

    @staticmethod
    def symbolic(g, x, step, zero_point, lo, hi, clip):
        if (lo, hi) not in ((-128, 127), (0, 255)):
            x = g.op("Clip", x, *(g.op("Constant", value_t=torch.tensor(c, dtype=torch.float32)) for c in clip))
        return g.op("DequantizeLinear", g.op("QuantizeLinear", x, step, zero_point), step, zero_point)


def bias_grid(m: QuantLayer, name: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The bias of a layer with a quantized input as integer kernels hold it: int32 integers
    on the grid of the input step times each output channel's weight step (s_x · s_w), with
    that grid and the weight steps; None for a layer without a bias or with a float input.
    A channel whose integer weights are all 0 has an arbitrary weight step (ŵ is 0 whatever
    it is), so it is raised until its bias fits in int32: the step search can leave it at
    1e-10, where a bias of 0.1 would need 2³⁰ times the int32 range."""
    if m.bias is None or m.act is None or not m.act.enabled:
        return None
    s_x, b = m.act.scale.detach().float(), m.bias.detach().float()
    s_w = m.scale.detach().flatten().float()
    dead = (m.w_int.flatten(1) == 0).all(1)
    s_w = torch.where(dead, torch.maximum(s_w, b.abs() / (s_x * 2 ** 30)), s_w)
    step = s_x * s_w
    q = torch.round(b / step)
    if q.abs().max() >= 2 ** 31:
        c = int(q.abs().argmax())
        raise ValueError(f"layer {name or '?'}: the bias of output channel {c} ({float(b[c]):.3g}) does not fit "
                         f"the int32 grid of its input step × weight step ({float(step[c]):.3g}); quantize this "
                         "layer with more weight bits or leave its input in float")
    return q.to(torch.int32), step, s_w


@torch.no_grad()
def integer_bias(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` whose biases lie on the int32 grid of :func:`bias_grid`, as the
    ONNX export (:func:`to_onnx`) and every integer kernel hold them: its outputs are the
    exported model's, up to float summation order."""
    q = copy.deepcopy(qmodel)
    for n, m in quant_layers(q).items():
        bg = bias_grid(m, n)
        if bg is not None:
            m.bias = bg[0].float() * bg[1]
            m.frozen = None
    return q


class _OnnxLayer(nn.Module):
    """A finished QuantLayer in the form the ONNX exporter turns into QDQ nodes; it computes
    what :func:`integer_bias`'s copy of the QuantLayer computes."""

    def __init__(self, m: QuantLayer, name: str = ""):
        super().__init__()
        self.conv = m.conv
        self.register_buffer("w_int", m.w_int.to(torch.int8))
        self.register_buffer("scale", m.scale.detach().flatten().float().clone())
        self.register_buffer("w_zero", torch.zeros(len(self.scale), dtype=torch.int8))
        self.register_buffer("bias", None if m.bias is None else m.bias.detach().float().clone())
        bg = bias_grid(m, name)
        if bg is not None:  # a quantized input: the bias as int32 behind its own DequantizeLinear
            self.bias = None
            self.scale = bg[2].clone()
            self.register_buffer("b_int", bg[0])
            self.register_buffer("b_step", bg[1])
            self.register_buffer("b_zero", torch.zeros(len(bg[1]), dtype=torch.int32))
        act = m.act if m.act is not None and m.act.enabled else None
        self.lo, self.hi = grid(act.bits, act.signed) if act is not None else (None, None)
        if act is not None:
            self.register_buffer("step", act.scale.detach().float().clone().reshape(()))
            self.register_buffer("a_zero", torch.zeros((), dtype=torch.int8 if act.signed else torch.uint8))
            self.clip = (float(self.lo * self.step), float(self.hi * self.step))

    def forward(self, x):
        if self.lo is not None:
            x = _QuantizeDequantize.apply(x, self.step, self.a_zero, self.lo, self.hi, self.clip)
        w = _DequantizeWeight.apply(self.w_int, self.scale, self.w_zero)
        b = self.bias if not hasattr(self, "b_int") else _DequantizeWeight.apply(self.b_int, self.b_step, self.b_zero)
        if self.conv is not None:
            return F.conv2d(x, w, b, **self.conv)
        return F.linear(x, w, b)


def _onnx_export(model: nn.Module, path: Path, example_input: torch.Tensor, metadata: dict) -> Path:
    """torch.onnx.export to a temporary file with a batch axis of any size, onnx.checker,
    ``metadata`` into the model's metadata_props, then an atomic move to ``path``."""
    try:
        import onnx
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx package: pip install -e '.[deploy]'") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    # The TorchScript exporter maps a torch.autograd.Function's `symbolic` straight to ONNX
    # nodes; the dynamo exporter (the default from torch 2.9) would need onnxscript
    # translations for the same functions. torch before 2.5 has no `dynamo` argument.
    kw = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))  # that exporter's deprecation
            try:
                torch.onnx.export(model, (example_input,), str(tmp), opset_version=ONNX_OPSET,
                                  input_names=["input"], output_names=["logits"],
                                  dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, **kw)
            except Exception as e:
                raise ValueError(f"torch.onnx.export could not export this model ({type(e).__name__}: {e}); "
                                 f"the export takes Conv2d/Linear layers and the operators of ONNX opset "
                                 f"{ONNX_OPSET}: replace the module it names, or export its parts separately") from e
        proto = onnx.load(str(tmp))
        for k, v in metadata.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.checker.check_model(proto, full_check=True)
        onnx.save(proto, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _check_example(example_input, first: nn.Module) -> torch.Tensor:
    """One image of ``example_input``, checked against what the ``first`` layer (a Conv2d or
    a QuantLayer) takes."""
    x = checks.images(example_input, "example_input")
    conv = first.conv if isinstance(first, QuantLayer) else (
        dict(groups=first.groups) if isinstance(first, nn.Conv2d) else None)
    if conv is not None:
        w = first.w_int if isinstance(first, QuantLayer) else first.weight
        channels = w.shape[1] * conv["groups"]
        if x.dim() != 4 or x.shape[1] != channels:
            raise ValueError(f"example_input has shape {tuple(x.shape)}, but the model's first layer takes "
                             f"{channels}-channel images: pass 1 × {channels} × H × W")
    return x[:1].detach().float().cpu()


@torch.no_grad()
def to_onnx(qmodel: nn.Module, path: str | Path, example_input: torch.Tensor) -> Path:
    """Write ``qmodel`` (from :func:`quantize` or :func:`load`) as a standard ONNX model with
    QuantizeLinear/DequantizeLinear pairs: every weight an int8 initializer (the integers of
    its b-bit grid) with one scale per output channel and zero point 0; every quantized input
    clipped to its b-bit grid, then an 8-bit QuantizeLinear/DequantizeLinear with the learned
    step and zero point 0 (int8 for a signed input, uint8 for an unsigned one). BatchNorm
    stays folded; the batch axis is free. Each layer's bit widths are in the model's
    metadata_props (``qlib.bits``). ``example_input`` (one or more images) fixes the other
    input dimensions. Checked by ``onnx.checker``; written atomically."""
    layers = quant_layers(qmodel)
    if not layers:
        raise ValueError("to_onnx() takes a quantized model (from quantize() or load()); this one has no "
                         "QuantLayer: export a float model with float_to_onnx()")
    unfinished = [n for n, m in layers.items() if m.v is not None]
    if unfinished:
        raise ValueError(f"layers {unfinished} are still being calibrated; call finalize() first")
    wide = {n: (m.w_bits, m.act.bits if m.act is not None and m.act.enabled else None) for n, m in layers.items()
            if m.w_bits > 8 or (m.act is not None and m.act.enabled and m.act.bits > 8)}
    if wide:
        raise ValueError(f"layers {sorted(wide)} have more than 8 bits (weight, activation: {wide}); ONNX "
                         "QuantizeLinear/DequantizeLinear hold at most 8-bit integers here: quantize them "
                         "to 8 bits or fewer")
    model = copy.deepcopy(qmodel).cpu().eval()
    model._state_dict_hooks.clear()  # the report (attach_report) is no tensor for the tracer
    for n, m in quant_layers(model).items():
        set_module(model, n, _OnnxLayer(m, n))
    bits = {n: {"w_bits": m.w_bits, "a_bits": m.act.bits if m.act is not None and m.act.enabled else None}
            for n, m in layers.items()}
    return _onnx_export(model, path, _check_example(example_input, next(iter(layers.values()))),
                        {"qlib.format": "qdq/1", "qlib.bits": json.dumps(bits)})


@torch.no_grad()
def float_to_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor) -> Path:
    """The float reference of :func:`to_onnx`: ``model`` with its BatchNorms folded (as the
    quantized export has them), in ONNX with float weights."""
    if quant_layers(model):
        raise ValueError("float_to_onnx() takes a float model; export a quantized one with to_onnx()")
    fp = fold_bn(model).cpu().eval()
    first = checks.first_layer(fp)
    return _onnx_export(fp, path, _check_example(example_input, first[1] if first else fp), {"qlib.format": "float/1"})
