"""Post-training quantization of a whole model: BN folding, quantized layers, and
module-by-module reconstruction with any of the six rounding functions.

The recipe is the paper's §4.1: BatchNorm folded into the convolutions; weight step sizes
per output channel by minimising ‖W − Ŵ‖² under nearest rounding; first and last layers at
8 bits; each module (a residual block, an inverted-residual block, or a lone conv/linear
layer) calibrated in turn by minimising ‖f(x) − f̂(x)‖² with Adam, where x is the module's
input in the *quantized* model so far and f(x) the *float* module's output; activation step
sizes initialised by an MSE search and learned (LSQ) during reconstruction.

    qmodel = quantize(model, calib, w_bits=4, a_bits=4, rounding="attention", iters=2000)
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from qlib.models import resolve_device
from qlib.rounding import (ROUNDINGS, adaround_beta, adaround_init, adaround_regularizer,
                           attention_round, check_bits, grid, rectified_sigmoid, round_fixed,
                           search_act_scale, search_weight_scale)
from qlib.rounding import AttentionRound, attention_probabilities, backward_factor  # noqa: F401 (API)

SUPPORTED = (nn.Conv2d, nn.Linear)
# Modules calibrated as one unit: their internal layers are optimised jointly.
_BLOCK_NAMES = ("BasicBlock", "Bottleneck", "InvertedResidual")
# Modules with weights that quantize() leaves in float: a BatchNorm with no conv before it.
_PASSIVE = (nn.BatchNorm2d,)


# --- BatchNorm folding ---------------------------------------------------------------------

@torch.no_grad()
def fold_bn(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm2d folded into the Conv2d registered just
    before it (conv then BN is how torchvision and our models build their layers):
    W' = W·γ/√(σ²+ε), b' = (b − μ)·γ/√(σ²+ε) + β; the BN becomes an Identity. The copy is
    in eval mode and matches the original's eval outputs to float rounding."""
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        prev = None
        for name, child in list(parent.named_children()):
            if (isinstance(child, nn.BatchNorm2d) and isinstance(prev, nn.Conv2d)
                    and prev.out_channels == child.num_features):
                scale = child.weight / torch.sqrt(child.running_var + child.eps)
                prev.weight.mul_(scale.view(-1, 1, 1, 1))
                bias = prev.bias if prev.bias is not None else torch.zeros_like(child.running_mean)
                new_bias = (bias - child.running_mean) * scale + child.bias
                prev.bias = nn.Parameter(new_bias)
                setattr(parent, name, nn.Identity())
                prev = None
                continue
            prev = child
    return model


# --- quantized layer -----------------------------------------------------------------------

class ActQuant(nn.Module):
    """Uniform activation quantizer with a learned step size (LSQ, Esser et al. 2020):
    round-to-nearest with a straight-through gradient, the step's gradient scaled by
    1/√(numel · h)."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = bits
        self.signed = True
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.enabled = False

    def init_from(self, x: torch.Tensor) -> None:
        self.signed = bool(x.min() < 0)
        self.scale.data.fill_(search_act_scale(x, self.bits, self.signed))
        self.enabled = True

    def forward(self, x):
        if not self.enabled:
            return x
        lo, hi = grid(self.bits, self.signed)
        g = 1.0 / (x[0].numel() * hi) ** 0.5
        s = self.scale * g + (self.scale * (1 - g)).detach()  # LSQ gradient scaling
        v = torch.clamp(x / s, lo, hi)
        return (v + (torch.round(v) - v).detach()) * s  # straight-through round


class QuantLayer(nn.Module):
    """A Conv2d or Linear whose weight is quantized with one of the six rounding functions,
    and whose input is optionally quantized by an :class:`ActQuant`."""

    def __init__(self, layer: nn.Module, w_bits: int, a_bits: int | None, rounding: str,
                 tau: float = 0.5, tau_units: str = "grid", generator: torch.Generator | None = None):
        super().__init__()
        self.layer = layer
        self.w_bits, self.rounding = w_bits, rounding
        layer.weight.requires_grad_(False)
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        w = layer.weight.data
        self.register_buffer("scale", search_weight_scale(w, w_bits))
        self.lo, self.hi = grid(w_bits, True)
        v = w / self.scale
        self.register_buffer("v", v)
        self.w_int = None  # final integer weights, set by finalize()
        if rounding in ("nearest", "floor", "ceil", "stochastic"):
            self.w_int = torch.clamp(round_fixed(v, rounding, generator), self.lo, self.hi)
        elif rounding == "adaround":
            self.V = nn.Parameter(adaround_init(v))
        elif rounding == "attention":
            # σ, the std of α in grid steps: τ itself (the book's reading), or τ/s per output
            # channel (the literal reading, τ in weight units)
            sigma = torch.as_tensor(float(tau)) if tau_units == "grid" else tau / self.scale
            self.register_buffer("sigma", sigma.to(w.dtype))
            noise = torch.randn(v.shape, generator=generator)
            self.alpha = nn.Parameter(noise * sigma)  # α ~ N(0, σ²), σ in grid steps
        else:
            raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
        self.act = ActQuant(a_bits) if a_bits is not None else None
        self.soft = False  # AdaRound trains through the soft h(V); set by the reconstruction

    def rounding_params(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters(recurse=False) if n in ("V", "alpha")]

    def integer_weight(self, soft: bool = False) -> torch.Tensor:
        """The weight on the integer grid (clipped). AdaRound uses the soft h(V) while it is
        being trained (``soft=True``), its hard 0/1 choice otherwise."""
        if self.w_int is not None:
            return self.w_int
        if self.rounding == "adaround":
            h = rectified_sigmoid(self.V) if soft else (self.V >= 0).to(self.v.dtype)
            z = torch.floor(self.v) + h
        else:
            z = attention_round(self.v, self.alpha, self.sigma)
        return torch.clamp(z, self.lo, self.hi)

    def weight(self, soft: bool = False) -> torch.Tensor:
        return self.scale * self.integer_weight(soft)

    @torch.no_grad()
    def finalize(self) -> None:
        """Freeze the learned rounding into integers; drop the training state."""
        self.w_int = self.integer_weight(soft=False).clone()
        for n in ("V", "alpha"):
            if hasattr(self, n):
                delattr(self, n)

    def forward(self, x):
        if self.act is not None:
            x = self.act(x)
        w = self.weight(soft=self.soft)
        if isinstance(self.layer, nn.Conv2d):
            m = self.layer
            return F.conv2d(x, w, m.bias, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, w, self.layer.bias)


# --- model surgery -------------------------------------------------------------------------

def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d/Linear layers, in registration order; a ValueError names any
    other module holding weights, since quantize() could not quantize it."""
    names = []
    for name, m in model.named_modules():
        if isinstance(m, SUPPORTED):
            names.append(name)
        elif (list(m.parameters(recurse=False)) and not isinstance(m, _PASSIVE)):
            raise ValueError(
                f"layer {name!r} of type {type(m).__name__} holds weights but cannot be quantized; "
                f"supported weight layers: Conv2d, Linear (BatchNorm2d is folded into its conv)"
            )
    if not names:
        raise ValueError("the model has no Conv2d or Linear layer to quantize")
    return names


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def calibration_units(model: nn.Module) -> list[str]:
    """The modules reconstructed one at a time, in forward order: residual / inverted-residual
    blocks as wholes, any other quantized layer on its own."""
    units, inside = [], set()
    for name, m in model.named_modules():
        if any(name.startswith(u + ".") for u in inside):
            continue
        if type(m).__name__ in _BLOCK_NAMES:
            units.append(name)
            inside.add(name)
        elif isinstance(m, QuantLayer):
            units.append(name)
            inside.add(name)
    return units


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, module: nn.Module, data: torch.Tensor, batch_size: int,
            dev: torch.device, want: str) -> torch.Tensor:
    """Run ``model`` on ``data`` and collect ``module``'s input or output, stopping the
    forward pass there (the rest of the network is not needed)."""
    return capture_many(model, [module], data, batch_size, dev, want)[0]


@torch.no_grad()
def capture_many(model: nn.Module, modules: list[nn.Module], data: torch.Tensor,
                 batch_size: int, dev: torch.device, want: str) -> list[torch.Tensor]:
    """Like :func:`capture` for several modules in one pass per batch: the forward stops
    once every module has fired. Returns one tensor per module, in the order given."""
    chunks: list[list[torch.Tensor]] = [[] for _ in modules]
    fired: set[int] = set()

    def make_hook(k):
        def hook(mod, inp, out):
            # a copy: the forward goes on past this module, and an in-place op further on
            # (VGG's ReLU(inplace=True) after a conv) would otherwise overwrite what we keep
            chunks[k].append((inp[0] if want == "input" else out).detach().clone())
            fired.add(k)
            if len(fired) == len(modules):
                raise _Stop
        return hook

    hooks = [m.register_forward_hook(make_hook(k)) for k, m in enumerate(modules)]
    try:
        for i in range(0, len(data), batch_size):
            fired.clear()
            try:
                model(data[i:i + batch_size].to(dev))
            except _Stop:
                pass
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(c) for c in chunks]


_GRAPH_WARMUP = 3  # eager steps before a CUDA graph is captured (they count as training steps)


def _reconstruct(unit: nn.Module, x: torch.Tensor, y: torch.Tensor, *, iters: int,
                 batch_size: int, lr: float, rounding: str, generator: torch.Generator,
                 desc: str, progress: bool, cuda_graph: bool = True) -> list[float]:
    """Minimise ‖f(x) − f̂(x)‖² over one unit's rounding variables and activation steps.

    On a GPU the training step (gather, forward, backward, Adam) is captured once as a CUDA
    graph and replayed: the small blocks of these models are otherwise bound by Python and
    kernel-launch overhead, not by the GPU."""
    qlayers = [m for m in unit.modules() if isinstance(m, QuantLayer)]
    round_params = [p for q in qlayers for p in q.rounding_params()]
    act_params = [q.act.scale for q in qlayers if q.act is not None and q.act.enabled]
    groups = [{"params": round_params, "lr": lr}] if round_params else []
    if act_params:
        groups.append({"params": act_params, "lr": lr / 10})  # as BRECQ: steps learn slower
    if not groups or iters == 0:
        return []
    use_graph = cuda_graph and x.is_cuda and iters > _GRAPH_WARMUP
    # fused Adam on a GPU: one kernel for all parameters; capturable so a graph can replay it
    opt = (torch.optim.Adam(groups, fused=True, capturable=use_graph) if x.is_cuda
           else torch.optim.Adam(groups))
    for q in qlayers:
        q.soft = rounding == "adaround"
    # Every mini-batch drawn up front and moved once, and the losses kept on the device:
    # the loop then makes no host-device copy and never waits for the GPU.
    batches = torch.randint(0, len(x), (iters, batch_size), generator=generator).to(x.device)
    losses = torch.empty(iters, device=x.device)

    def step_fn(idx, beta, reg_weight):
        out = unit(x[idx])
        # ‖·‖² summed over channels, averaged over batch and positions (as BRECQ's lp_loss)
        rec = (out - y[idx]).pow(2).sum(1).mean()
        loss = rec
        if reg_weight is not None:
            loss = rec + reg_weight * sum(adaround_regularizer(q.V, beta) for q in qlayers)
        loss.backward()
        opt.step()
        return rec.detach()

    adaround = rounding == "adaround"

    def schedule(step):  # AdaRound's β and regulariser weight (weight 0 in the warm-up)
        beta = adaround_beta(step, iters)
        return (20.0, 0.0) if beta is None else (beta, 0.01)

    bar = tqdm(range(iters), desc=desc, leave=False, disable=not progress, mininterval=1.0)
    if not use_graph:
        for step in bar:
            beta, reg_weight = schedule(step) if adaround else (None, 0.0)
            opt.zero_grad(set_to_none=True)
            losses[step] = step_fn(batches[step], beta, reg_weight or None)
    else:
        beta_t = torch.tensor(20.0, device=x.device)
        reg_t = torch.tensor(0.0, device=x.device)
        static_idx = batches[0].clone()
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        it = iter(bar)
        with torch.cuda.stream(side):  # the first steps run eagerly: graphs need a warm-up
            for step in range(_GRAPH_WARMUP):
                next(it)
                beta, reg_weight = schedule(step)
                beta_t.fill_(beta)
                reg_t.fill_(reg_weight)
                opt.zero_grad(set_to_none=True)
                losses[step] = step_fn(batches[step], beta_t, reg_t if adaround else None)
        torch.cuda.current_stream(x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):
            static_rec = step_fn(static_idx, beta_t, reg_t if adaround else None)
        for step in it:
            beta, reg_weight = schedule(step)
            beta_t.fill_(beta)
            reg_t.fill_(reg_weight)
            static_idx.copy_(batches[step])
            graph.replay()
            losses[step] = static_rec
    for q in qlayers:
        q.soft = False
    return losses.tolist()


def quantize(model: nn.Module, calib: torch.Tensor, *, w_bits, a_bits: int | None = None,
             rounding: str = "attention", tau: float = 0.5, iters: int = 2000,
             batch_size: int = 64, lr: float = 4e-4, first_last_bits: int = 8,
             device: str | torch.device = "auto", seed: int = 0, tau_units: str = "grid",
             progress: bool = True) -> nn.Module:
    """A quantized copy of ``model`` (which is left untouched), calibrated on ``calib``.

    w_bits: an int, or ``{layer_name: bits}`` for every quantized layer (first and last
        layers may be omitted: they use ``first_last_bits``).
    a_bits: bits for the input of every layer but the first (None: activations stay float).
    rounding: nearest, floor, ceil, stochastic (fixed, no calibration), adaround or
        attention (module-by-module reconstruction, ``iters`` Adam steps per module).
    tau: the std of Attention Round's α. ``tau_units="grid"`` (the book's reading) takes τ in
        grid steps, α ~ N(0, τ²); ``"weight"`` is the literal reading α ~ N(0, (τ/s)²).
    The returned model carries ``quant_report``: seconds, images, iterations, device and the
    per-module reconstruction losses."""
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")
    if not (isinstance(tau, (int, float)) and tau >= 0):
        raise ValueError(f"tau must be a number ≥ 0 (the std of α), got {tau!r}")
    if tau_units not in ("grid", "weight"):
        raise ValueError(f"tau_units must be 'grid' or 'weight', got {tau_units!r}")
    check_bits(first_last_bits, "first_last_bits")
    if a_bits is not None:
        check_bits(a_bits, "a_bits")
    if not isinstance(calib, torch.Tensor) or calib.dim() < 2:
        raise ValueError("calib must be a tensor of calibration inputs, N × C × H × W")
    learned = rounding in ("adaround", "attention")
    if learned and len(calib) < batch_size:
        raise ValueError(f"{len(calib)} calibration images are fewer than the batch size "
                         f"{batch_size}; pass more images or a smaller batch_size")
    if learned and (not isinstance(iters, int) or iters < 0):
        raise ValueError(f"iters must be an integer ≥ 0, got {iters!r}")

    start = time.perf_counter()
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    fp = fold_bn(model).to(dev)
    names = quantizable_layers(fp)
    first, last = names[0], names[-1]
    if isinstance(w_bits, dict):
        missing = [n for n in names if n not in w_bits and n not in (first, last)]
        unknown = [n for n in w_bits if n not in names]
        if missing or unknown:
            raise ValueError(f"w_bits dict: missing layers {missing}, unknown layers {unknown}; "
                             f"quantized layers are {names}")
        bits_of = {n: check_bits(w_bits.get(n, first_last_bits), f"w_bits[{n!r}]") for n in names}
    else:
        check_bits(w_bits, "w_bits")
        bits_of = {n: w_bits for n in names}
    bits_of[first] = bits_of[last] = first_last_bits

    q = copy.deepcopy(fp)
    for n in names:
        a = None if (a_bits is None or n == first) else (first_last_bits if n == last else a_bits)
        ql = QuantLayer(q.get_submodule(n), bits_of[n], a, rounding, tau, tau_units, gen)
        _set_module(q, n, ql.to(dev))
    q.eval()

    calib = calib.to(dev)
    if a_bits is not None:  # initialise every activation step size on the float inputs
        inputs = capture_many(fp, [fp.get_submodule(n) for n in names[1:]], calib[:256],
                              batch_size, dev, "input")
        for n, x_in in zip(names[1:], inputs):
            q.get_submodule(n).act.init_from(x_in)
        del inputs

    losses = {}
    if learned:
        units = calibration_units(q)
        # The float model's unit outputs (the targets) never change: one pass for all of them.
        # Each unit's input comes from the quantized model as calibrated so far, so it is
        # captured afresh, once per unit, after the units before it are frozen.
        targets = capture_many(fp, [fp.get_submodule(u) for u in units], calib, batch_size,
                               dev, "output")
        for k, u in enumerate(units):
            x = capture(q, q.get_submodule(u), calib, batch_size, dev, "input")
            y = targets[k]
            targets[k] = None  # free each target once its unit is done
            unit = q.get_submodule(u)
            with torch.enable_grad():
                losses[u] = _reconstruct(unit, x, y, iters=iters, batch_size=batch_size, lr=lr,
                                         rounding=rounding, generator=gen,
                                         desc=f"{rounding} {k + 1}/{len(units)} {u}", progress=progress)
            for m in unit.modules():
                if isinstance(m, QuantLayer):
                    m.finalize()
            del x, y
    for m in q.modules():
        if isinstance(m, QuantLayer) and m.w_int is None:
            m.finalize()
    q.requires_grad_(False)
    q.quant_report = {"seconds": time.perf_counter() - start, "images": len(calib),
                      "iters_per_module": iters if learned else 0, "device": str(dev),
                      "rounding": rounding, "w_bits": bits_of, "a_bits": a_bits,
                      "losses": losses}
    return q.cpu()
