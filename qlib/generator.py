"""One representative image (predictor preprint, Part 2, §2.3–2.4): a Transformer
encoder–decoder generates a single image that, fed to a quantized model, gives histogram
tokens from which chapter 5's frozen predictor reads the model's accuracy::

    G = ImageGenerator(token_dim=64, image_shape=(1, 28, 28), value_range=(lo, hi))
    image = G(float_tokens)                 # 1 × C × H × W, the architecture's image
    hist = stage2(G.parameters(), lambda: {a: G(cond[a])[0] for a in cond}, judge, train, val,
                  ranges=ranges, bins=32)   # judge: chapter 5's predictor, frozen
    predictor.predict(trained, qmodel, images=image)     # one forward pass per prediction

The book's reading of §2.3 (chapter 6 says why): the encoder reads the **float** model's
per-layer tokens on the probe images, computed once per architecture, so the image depends
on the architecture but not on the quantized model under test. A reading in which the
encoder reads the tested model's own feature maps would need that model's pass over many
images at every prediction, and those tokens could go to the predictor directly (Part 1).

The decoder is MaskGIT's bidirectional Transformer (Chang et al. 2022) over image patches:
every patch starts as the learned [MASK] embedding plus its position, self-attention runs
in both directions, cross-attention reads the encoder, and a linear head writes the
patch's pixels. There is no codebook and no iterative unmasking: the output is one
continuous image, decoded in MaskGIT's first (all-masked) step.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qlib import tokens
from qlib.hooks import forward_hooks
from qlib.predictor import EarlyStopping, pad_tokens, predict_tokens, sinusoidal_encoding


# --- differentiable histograms -----------------------------------------------------------

def soft_histogram_counts(values: torch.Tensor, bins: int, lo: float, hi: float,
                          softness: float = 1.0) -> torch.Tensor:
    """A differentiable version of :func:`qlib.tokens.histogram_counts` (linear binning):
    a value within ``softness``/2 bin widths of an edge between two bins splits its unit
    of mass between them linearly in its distance to the edge; elsewhere it counts whole in
    its bin. softness = 1 is linear interpolation between bin centres (every value has a
    gradient); as softness → 0 the counts become the hard histogram. Values outside
    [lo, hi] count whole in the end bins, as the hard counts clamp them; the counts sum to
    values.numel(). Cost O(values), not O(values × bins)."""
    tokens.check_bins(bins)
    if not hi > lo:
        raise ValueError(f"histogram range must have hi > lo, got [{lo}, {hi}]")
    if not (isinstance(softness, (int, float)) and math.isfinite(softness) and 0 < softness <= 1):
        raise ValueError(f"softness must be in (0, 1] (bin widths), got {softness!r}")
    u = (values.reshape(-1) - lo) * (bins / (hi - lo))
    inside = (u >= 0) & (u < bins)
    j = torch.floor(u.detach()).clamp(0, bins - 1).long()
    f = u - j                                   # position inside the bin, 0..1, with gradient
    left = torch.clamp(0.5 - f / softness, 0, 1) * inside
    right = torch.clamp(0.5 - (1 - f) / softness, 0, 1) * inside
    counts = torch.zeros(bins, dtype=u.dtype, device=u.device)
    counts = counts.index_add(0, j, 1 - left - right)
    counts = counts.index_add(0, (j - 1).clamp_min(0), left)
    return counts.index_add(0, (j + 1).clamp_max(bins - 1), right)


def image_tokens(qmodel: nn.Module, image: torch.Tensor, bins: int, ranges: dict, *,
                 softness: float = 1.0, straight_through: bool = True) -> torch.Tensor:
    """The tokens of :func:`qlib.tokens.layer_histograms` for one image (C × H × W) or a
    few (K × C × H × W, one histogram over all of them), with a gradient to the pixels.
    ``straight_through``: the forward value is the hard histogram (so a prediction in
    training is the prediction at use) and the gradient is the soft histogram's; otherwise
    both are the soft histogram's."""
    if image.dim() == 3:
        image = image.unsqueeze(0)
    tokens.check_images(qmodel, image)
    n_images = len(image)
    names = tokens.token_layers(qmodel)
    tokens.check_ranges(names, ranges)
    per_layer = {}

    def make_hook(n):
        lo, hi = ranges[n]

        def hook(mod, inp, out):
            # histogram here, not after the forward: an in-place ReLU may overwrite ``out``
            v = out.reshape(-1)
            soft = soft_histogram_counts(v, bins, lo, hi, softness).double()
            if straight_through:
                counts = tokens.histogram_counts(v, bins, lo, hi).double() + soft - soft.detach()
            else:
                counts = soft
            per_layer[n] = tokens.token_from_counts(counts, n_images, v.numel() / n_images)
        return hook

    with forward_hooks((qmodel.get_submodule(n), make_hook(n)) for n in names):
        qmodel(image)
    return torch.stack([per_layer[n] for n in names])


# --- the encoder–decoder -----------------------------------------------------------------

class ImageGenerator(nn.Module):
    """Transformer encoder over per-layer tokens → MaskGIT-style bidirectional decoder over
    image patches → one image in ``value_range`` (per channel, the data's normalised range).

    ``image_shape`` (C, H, W) comes from the data: (1, 28, 28) for Fashion-MNIST, (3, 32, 32)
    for CIFAR-10; ``patch`` must divide H and W. ``n_images`` = K > 1 writes K images per
    input (B × K × C × H × W; chapter 6 asks what the single image costs): each has its own
    learned slot embedding added to the decoder's queries and its own pixel bias, all K
    starting at ``init_image`` and told apart by their slots once the head trains."""

    def __init__(self, token_dim: int, image_shape: tuple[int, int, int], value_range, *,
                 d_model: int = 64, heads: int = 4, enc_layers: int = 2, dec_layers: int = 2,
                 patch: int = 4, max_layers: int = 128, init_image: torch.Tensor | None = None,
                 n_images: int = 1, seed: int = 0):
        super().__init__()
        if not isinstance(n_images, int) or n_images < 1:
            raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
        C, H, W = image_shape
        if H % patch or W % patch:
            raise ValueError(f"patch {patch} must divide the image's height {H} and width {W}")
        lo, hi = (torch.as_tensor(v, dtype=torch.float32).reshape(-1) for v in value_range)
        if lo.numel() not in (1, C) or hi.numel() != lo.numel() or not bool((hi > lo).all()):
            raise ValueError(f"value_range must be (lo, hi) with hi > lo, one value or one per "
                             f"channel ({C}), got {value_range}")
        torch.manual_seed(seed)
        self.image_shape, self.patch = (C, H, W), patch
        self.n_patches = (H // patch) * (W // patch)
        self.register_buffer("lo", lo.expand(C).clone().view(1, C, 1, 1))
        self.register_buffer("hi", hi.expand(C).clone().view(1, C, 1, 1))
        self.embed = nn.Linear(token_dim, d_model)
        self.register_buffer("pe", sinusoidal_encoding(max_layers, d_model))
        enc = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True,
                                         norm_first=True)
        self.encoder = nn.TransformerEncoder(enc, enc_layers, enable_nested_tensor=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d_model))
        self.patch_pos = nn.Parameter(torch.randn(1, self.n_patches, d_model) * 0.02)
        dec = nn.TransformerDecoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True,
                                         norm_first=True)
        self.decoder = nn.TransformerDecoder(dec, dec_layers)  # no causal mask: bidirectional
        self.ln = nn.LayerNorm(d_model)
        self.to_pixels = nn.Linear(d_model, C * patch * patch)
        # zero head: at initialisation the image is exactly sigmoid(pixel_bias), the
        # ``init_image`` (e.g. the data's mean image), not that image plus the decoder's
        # random output (~0.9 in pixels at most with a default-initialised head). The
        # head's weights still get a gradient (the decoder's output), so training moves off it
        nn.init.zeros_(self.to_pixels.weight)
        nn.init.zeros_(self.to_pixels.bias)
        self.pixel_bias = nn.Parameter(torch.zeros(n_images, C, H, W))
        if init_image is not None:
            with torch.no_grad():
                self.pixel_bias.copy_(image_to_logits(init_image.reshape(1, C, H, W), self.lo, self.hi))
        self.token_dim, self.n_images = token_dim, n_images
        if n_images > 1:  # created last: a one-image generator's initialisation is unchanged by it
            self.slot = nn.Parameter(torch.randn(n_images, 1, d_model) * 0.02)

    def param_groups(self, lr: float, pixel_lr: float) -> list[dict]:
        """Adam's parameter groups for stage 2: the network at ``lr`` and the per-pixel
        bias at ``pixel_lr``. A network learning rate (~1e-3) moves the bias ~lr logits a
        step, a tenth of what a free image moves at its own rate; with the free image's
        rate here the generator can reach at least every image the free image reaches."""
        rest = [p for n, p in self.named_parameters() if n != "pixel_bias"]
        return [{"params": rest, "lr": lr}, {"params": [self.pixel_bias], "lr": pixel_lr}]

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: L × token_dim (or B × L × token_dim) → B × C × H × W (B × K × C × H × W
        with ``n_images`` = K > 1)."""
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        if tokens.dim() != 3 or tokens.shape[2] != self.token_dim or tokens.shape[1] > len(self.pe):
            raise ValueError(f"tokens must be L × {self.token_dim} with L ≤ {len(self.pe)}, "
                             f"got {tuple(tokens.shape)}")
        B, L, _ = tokens.shape
        memory = self.encoder(self.embed(tokens) + self.pe[:L], src_key_padding_mask=pad_mask)
        K = self.n_images
        queries = self.mask_token.expand(B, self.n_patches, -1) + self.patch_pos
        if K > 1:  # B·K query sets, image k's with its slot; each reads its own copy of memory
            queries = (queries[:, None] + self.slot).reshape(B * K, self.n_patches, -1)
            memory = memory.repeat_interleave(K, 0)
            pad_mask = None if pad_mask is None else pad_mask.repeat_interleave(K, 0)
        h = self.ln(self.decoder(queries, memory, memory_key_padding_mask=pad_mask))
        C, H, W = self.image_shape
        p = self.patch
        x = self.to_pixels(h).view(B * K, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5)
        x = x.reshape(B, K, C, H, W) + self.pixel_bias
        x = logits_to_image(x, self.lo, self.hi)
        return x if K > 1 else x[:, 0]


def logits_to_image(z: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """lo + (hi − lo)·sigmoid(z): pixels that stay in the data's range."""
    return lo + (hi - lo) * torch.sigmoid(z)


def image_to_logits(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, margin: float = 1e-3) -> torch.Tensor:
    """The inverse of :func:`logits_to_image` (pixels at the range's ends pulled in by ``margin``)."""
    u = ((x - lo) / (hi - lo)).clamp(margin, 1 - margin)
    return torch.log(u) - torch.log1p(-u)


# --- stage 2 -----------------------------------------------------------------------------

def _check_entries(entries, what: str) -> None:
    if not entries:
        raise ValueError(f"stage 2 needs at least one {what} model (arch, quantized model, label)")
    for e in entries:
        if len(e) != 3 or not isinstance(e[1], nn.Module):
            raise ValueError(f"each {what} entry must be (arch, quantized model, top-1 %), got {e!r}")


def _predictions(judge: nn.Module, entries, images: dict, ranges: dict, bins: int, softness: float,
                 straight_through: bool = True) -> torch.Tensor:
    toks = [image_tokens(q, images[a], bins, ranges[a], softness=softness, straight_through=straight_through)
            for a, q, _ in entries]
    X, M = pad_tokens(toks)
    return judge(X, M)


@torch.no_grad()
def images_tokens(entries, images: dict, ranges: dict, bins: int) -> list[torch.Tensor]:
    """Each (arch, quantized model, label)'s hard-histogram tokens on ``images[arch]`` (one
    image, or K images histogrammed together): what a judge reads, whichever judge it is."""
    return [tokens.layer_histograms(q, images[a].reshape(-1, *images[a].shape[-3:]), bins, ranges[a])
            for a, q, _ in entries]


@torch.no_grad()
def evaluate_images(judge: nn.Module, entries, images: dict, ranges: dict, bins: int) -> np.ndarray:
    """The frozen predictor's output for each (arch, quantized model, label) fed
    :func:`images_tokens`."""
    return predict_tokens(judge, images_tokens(entries, images, ranges, bins))


def stage2(params: Iterable[nn.Parameter], make_images: Callable[[], dict], judge: nn.Module, train, val, *,
           ranges: dict, bins: int, steps: int = 300, batch: int = 16, lr: float = 3e-3,
           softness: float = 1.0, eval_every: int = 10, patience: int = 10, seed: int = 0,
           progress: bool = True, desc: str = "stage 2") -> dict:
    """Stage 2 (§2.4): the stage-1 predictor ``judge`` frozen, train ``params`` (the
    generator's, or a free image's) so that the judge, fed each training model's histograms
    on the image ``make_images()[arch]``, returns that model's label: Adam on the MSE in
    the judge's standardised units, ``batch`` models per step. ``train`` and ``val`` are
    lists of (arch, quantized model, top-1 %); every ``eval_every`` steps the validation MAE
    (hard histograms) is measured and the best parameters kept (early stopping after
    ``patience`` evaluations without improvement). ``params``: tensors, or Adam's parameter
    groups (dicts with "params" and their own "lr", e.g. :meth:`ImageGenerator.param_groups`).
    Returns the history."""
    _check_stage2_entries(train, val)
    if int(getattr(judge, "residual", 0)):
        raise ValueError("stage 2 needs a judge that predicts top-1 itself; this one corrects the paired "
                         "probe estimate (study.fit_pooled(residual=True)), which one image cannot give")
    groups = list(params)
    if not groups:
        raise ValueError("stage 2 needs parameters to train")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    params = [p for g in groups for p in g["params"]]
    judge.eval().requires_grad_(False)
    for _, q, _ in list(train) + list(val):
        q.eval().requires_grad_(False)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    y = torch.tensor([float(t) for _, _, t in train])
    vy = np.array([float(t) for _, _, t in val])
    opt = torch.optim.Adam(groups, lr=lr)
    stop = EarlyStopping(params, patience)
    hist = {"step": [], "loss": [], "eval_step": [], "val_mae": []}
    start = time.perf_counter()
    bar = tqdm(range(steps + 1), desc=desc, leave=False, disable=not progress)
    for step in bar:
        if step % eval_every == 0 or step == steps:
            with torch.no_grad():
                imgs = make_images()
            mae = float(np.abs(evaluate_images(judge, val, imgs, ranges, bins) - vy).mean())
            hist["eval_step"].append(step)
            hist["val_mae"].append(mae)
            done = stop.update(mae)
            bar.set_postfix(val_mae=f"{mae:.2f}", best=f"{stop.best:.2f}")
            if step == steps or done:
                break
        idx = rng.choice(len(train), size=min(batch, len(train)), replace=False)
        out = _predictions(judge, [train[i] for i in idx], make_images(), ranges, bins, softness)
        loss = (((out - y[idx]) / judge.y_std) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        hist["step"].append(step)
        hist["loss"].append(loss.item())
    stop.restore()
    hist.update(best_val_mae=stop.best, best_step=hist["eval_step"][int(np.argmin(hist["val_mae"]))],
                seconds=time.perf_counter() - start)
    return hist


def _check_stage2_entries(train, val) -> None:
    _check_entries(train, "training")
    _check_entries(val, "validation")
    shared = {id(q) for _, q, _ in train} & {id(q) for _, q, _ in val}
    if shared:
        raise ValueError(f"{len(shared)} model(s) are in both the training and the validation entries; "
                         "split the population by configuration first (population.split)")


# --- baselines' images --------------------------------------------------------------------

def bn_statistics_image(model: nn.Module, image_shape: tuple[int, int, int], *, steps: int = 500,
                        lr: float = 0.5, seed: int = 0, progress: bool = False) -> torch.Tensor:
    """ZeroQ's distilled data (Cai et al. 2020) for one image: start from Gaussian noise and
    minimise, over every BatchNorm layer of the float ``model``, ‖μ̃ − μ‖² + ‖σ̃ − σ‖² between
    the per-channel mean and std of the layer's input on the image and the layer's running
    statistics, plus the same for the input itself against 0 and 1 (Adam, lr 0.5, 500 steps,
    as ZeroQ)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not bns:
        raise ValueError("bn_statistics_image needs a float model with BatchNorm2d layers (before folding)")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *image_shape, generator=g).requires_grad_(True)
    was, grads = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    stats = []
    opt = torch.optim.Adam([x], lr=lr)
    try:
        with forward_hooks(((m, lambda m, i: stats.append((m, i[0]))) for m in bns), pre=True):
            for _ in tqdm(range(steps), desc="BN-statistics image", leave=False, disable=not progress):
                stats.clear()
                model(x)
                loss = _bn_statistics_loss(stats, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        model.train(was)
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
    return x.detach()[0]


def _bn_statistics_loss(stats: list, x: torch.Tensor) -> torch.Tensor:
    """Σ ‖μ̃ − μ‖² + ‖σ̃ − σ‖² over the BatchNorm inputs in ``stats`` against their running
    statistics, and over the image ``x`` itself against 0 and 1."""
    loss = 0.0
    for m, t in stats + [(None, x)]:
        flat = t.flatten(2)
        mu, sd = flat.mean(2), (flat.var(2, unbiased=False) + 1e-6).sqrt()
        if m is None:
            target_mu, target_sd = torch.zeros_like(mu), torch.ones_like(sd)
        else:
            target_mu, target_sd = m.running_mean, (m.running_var + m.eps).sqrt()
        loss = loss + (mu - target_mu).pow(2).sum() + (sd - target_sd).pow(2).sum()
    return loss


def peak_memory_mb(fn: Callable[[], object]) -> tuple[object, float | None]:
    """Run ``fn`` and return its result and the rise of this process's peak resident memory
    during it, in MB (Linux: glibc's freed pages trimmed, then VmHWM reset through
    /proc/self/clear_refs); None elsewhere."""
    def read(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
        return None

    try:
        import ctypes

        # hand freed heap pages back first: otherwise the call reuses pages already resident
        # and its allocations never raise the peak
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = read("VmRSS:")
    except OSError:
        return fn(), None
    out = fn()
    peak = read("VmHWM:")
    return out, (peak - before if peak is not None and before is not None else None)
