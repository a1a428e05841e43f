"""The accuracy predictor (predictor preprint, Part 1, §2.2): per-layer histogram tokens
into a Transformer encoder whose accuracy token regresses the quantized model's top-1::

    ranges = float_ranges(float_model, probe)                 # per layer, from the float model
    tokens = layer_histograms(qmodel, probe, bins=32, ranges=ranges)   # L × 64
    P = trained("resnet", "quick")                            # chapter 5's predictor, cached
    predict(P, qmodel)                                        # predicted top-1, %

A token is one layer's output feature map as two histograms over the same bins (Fig. 2):

* the **rate branch**: the share of the layer's values in each bin (sums to 1);
* the **count branch**: the count per image on a log scale, log(1 + c/N) / log(1 + V) for
  c values in the bin over N images and V values per image. Dividing by N makes it
  independent of how many images were fed (chapter 6 feeds one); dividing the log by
  log(1 + V) puts every layer on [0, 1] whatever its size (a bin holding every value is 1).
  A linear count per image would be the rate times V, a constant per layer, and carry
  nothing the rate branch lacks; the log makes this branch a view of the tails, where a
  few outliers that quantization pushes out of the float range are visible.

Bin edges are fixed per layer from the **float** model: the minimum and maximum of its
output on the probe images, so the float model fills the range and every value a quantized
model pushes beyond it lands in the two end bins (clamped there, never dropped).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qlib.graph import fold_bn, quantizable_layers


# --- histogram tokens ----------------------------------------------------------------------

def _check_bins(bins) -> int:
    if not isinstance(bins, int) or isinstance(bins, bool) or bins < 2:
        raise ValueError(f"bins must be an integer ≥ 2 (bins per histogram branch), got {bins!r}")
    return bins


def histogram_counts(values: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """Counts of ``values`` in ``bins`` equal bins over [lo, hi]; values below lo count in
    the first bin, above hi in the last (clamped, so the counts sum to values.numel())."""
    _check_bins(bins)
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"histogram range must be finite with hi > lo, got [{lo}, {hi}]")
    v = values.detach().reshape(-1).float().clamp(lo, hi)
    return torch.histc(v, bins=bins, min=lo, max=hi)


def token_from_counts(counts: torch.Tensor, n_images: float, values_per_image: float) -> torch.Tensor:
    """One layer's token, count branch ⊕ rate branch (see the module docstring): 2 × bins."""
    counts = counts.double()
    total = counts.sum().clamp_min(1)
    count_branch = torch.log1p(counts / n_images) / math.log1p(values_per_image)
    return torch.cat([count_branch, counts / total]).float()


def _flat(t: torch.Tensor) -> torch.Tensor:
    """All of ``t``'s values as a 1-D view, without a copy for channels-last maps too."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        t = t.permute(0, 2, 3, 1)
    return t.reshape(-1)


def token_layers(model: nn.Module) -> list[str]:
    """The layers a model's tokens describe: its QuantLayers if it is quantized, else every
    Conv2d/Linear (the layers quantize() would replace), in forward-registration order."""
    from qlib.quant import quant_layers

    q = list(quant_layers(model))
    return q if q else quantizable_layers(model)


def _check_images(model: nn.Module, images) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor N × C × H × W, got {shape}")
    if len(images) == 0:
        raise ValueError("images is empty: pass at least one image")
    if not torch.isfinite(images).all():
        raise ValueError("images has NaN or infinite values: histograms of them mean nothing; fix the images")
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d) or
                  (hasattr(m, "w_int") and m.w_int.dim() == 4)), None)
    if first is not None:
        c_in = first.in_channels if isinstance(first, nn.Conv2d) else first.w_int.shape[1] * first.conv["groups"]
        if images.shape[1] != c_in:
            raise ValueError(f"images have {images.shape[1]} channels; the model's first layer takes {c_in}")


@torch.no_grad()
def histogram_pass(model: nn.Module, images: torch.Tensor, bins: int, ranges: dict[str, tuple[float, float]],
                   *, stride: int = 1, batch_size: int = 250, labels: torch.Tensor | None = None,
                   keep_counts: tuple[int, ...] = ()) -> dict:
    """One forward pass over ``images`` that histograms every token layer's output and keeps
    the predictions. ``stride`` > 1 histograms every stride-th value of each map (an
    unbiased estimate for the full test set at a fraction of the cost). Returns
    ``tokens`` (L × 2·bins), ``preds`` (N), ``acc`` (% if ``labels`` given) and ``seconds``;
    with ``keep_counts`` = (16, 64, …) also ``counts`` {n: L × bins raw counts over the first
    n images} and ``values_per_image`` (V per layer), from which :func:`tokens_from_counts`
    makes the tokens of any of those prefixes at ``bins`` or fewer bins (chapter 7)."""
    _check_bins(bins)
    _check_images(model, images)
    if not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be an integer ≥ 1, got {stride!r}")
    bad = [n for n in keep_counts if not isinstance(n, int) or not 1 <= n <= len(images)]
    if bad:
        raise ValueError(f"keep_counts must be image counts in 1..{len(images)}, got {bad}")
    names = token_layers(model)
    missing = [n for n in names if n not in ranges]
    if missing:
        raise ValueError(f"ranges lacks layers {missing}; build them with float_ranges() on this "
                         "architecture's float model")
    start = time.perf_counter()
    counts = {n: torch.zeros(bins, dtype=torch.float64) for n in names}
    per_image = {}

    def make_hook(n):
        lo, hi = ranges[n]

        def hook(mod, inp, out):
            per_image[n] = out[0].numel()
            counts[n] += histogram_counts(_flat(out)[::stride], bins, lo, hi).double()
        return hook

    hooks = [model.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)
    preds, kept = [], {}
    # batch edges at every multiple of batch_size and at every prefix whose counts are kept
    edges = sorted(set(range(0, len(images), batch_size)) | set(keep_counts) | {len(images)})
    try:
        for i, j in zip(edges[:-1], edges[1:]):
            x = images[i:j].contiguous(memory_format=torch.channels_last)
            preds.append(model(x).argmax(1))
            if j in keep_counts:
                kept[j] = torch.stack([counts[k].clone() * stride for k in names])
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training).to(memory_format=torch.contiguous_format)
    n = len(images)
    tokens = torch.stack([token_from_counts(counts[k] * stride, n, per_image[k]) for k in names])
    preds = torch.cat(preds)
    out = {"tokens": tokens, "preds": preds, "seconds": time.perf_counter() - start}
    if keep_counts:
        out["counts"], out["values_per_image"] = kept, [per_image[k] for k in names]
    if labels is not None:
        out["acc"] = 100 * (preds == labels).float().mean().item()
    return out


def tokens_from_counts(counts: torch.Tensor, n_images: int, values_per_image: list[int],
                       merge: int = 1) -> torch.Tensor:
    """Tokens (L × 2·bins/merge) from raw per-layer counts (L × bins, as histogram_pass's
    ``counts``), adjacent bins summed ``merge`` at a time: the bins are equal over the same
    range, so merged counts are exactly the counts at bins/merge."""
    if not isinstance(merge, int) or merge < 1 or counts.shape[1] % merge:
        raise ValueError(f"merge must be a positive divisor of the {counts.shape[1]} bins, got {merge!r}")
    merged = counts.reshape(counts.shape[0], -1, merge).sum(2)
    return torch.stack([token_from_counts(c, n_images, v) for c, v in zip(merged, values_per_image)])


def layer_histograms(model: nn.Module, images: torch.Tensor, bins: int,
                     ranges: dict[str, tuple[float, float]]) -> torch.Tensor:
    """Fig. 2: for every quantized layer (every Conv2d/Linear of a float model), the
    histogram of its output feature map on ``images`` as one token, count branch ⊕ rate
    branch, over the fixed per-layer ``ranges`` (values outside go to the end bins).
    Returns L × 2·bins."""
    return histogram_pass(model, images, bins, ranges)["tokens"]


@torch.no_grad()
def float_ranges(model: nn.Module, images: torch.Tensor, batch_size: int = 250) -> dict[str, tuple[float, float]]:
    """Per-layer histogram ranges: min and max of the BN-folded float model's layer outputs
    on ``images`` (the outputs quantize()'s layers will produce)."""
    _check_images(model, images)
    fp = fold_bn(model).eval()
    names = quantizable_layers(fp)
    lo = {n: math.inf for n in names}
    hi = {n: -math.inf for n in names}

    def make_hook(n):
        def hook(mod, inp, out):
            lo[n] = min(lo[n], float(out.min()))
            hi[n] = max(hi[n], float(out.max()))
        return hook

    hooks = [fp.get_submodule(n).register_forward_hook(make_hook(n)) for n in names]
    try:
        for i in range(0, len(images), batch_size):
            fp(images[i:i + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return {n: (lo[n], hi[n] if hi[n] > lo[n] else lo[n] + 1e-6) for n in names}


# --- the encoder ---------------------------------------------------------------------------

def sinusoidal_encoding(n_positions: int, d: int) -> torch.Tensor:
    """Eq. 1 (Vaswani et al.): PE[pos, 2i] = sin(pos / 10000^(2i/d)), PE[pos, 2i+1] =
    cos(pos / 10000^(2i/d)). Position 0 is the accuracy token, 1..L the layers in order."""
    pos = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)
    div = torch.pow(10000.0, torch.arange(0, d, 2, dtype=torch.float32) / d)
    pe = torch.zeros(n_positions, d)
    pe[:, 0::2] = torch.sin(pos / div)
    pe[:, 1::2] = torch.cos(pos / div)[:, : d // 2]
    return pe


class Block(nn.Module):
    """Pre-norm Transformer encoder layer (multi-head self-attention, then an MLP) that keeps
    its last attention map, so chapter 5 can read where the accuracy token looks."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.Dropout(dropout))
        self.last_attention = None

    def forward(self, x, pad_mask):
        h = self.ln1(x)
        a, w = self.attn(h, h, h, key_padding_mask=pad_mask, need_weights=True, average_attn_weights=True)
        self.last_attention = w.detach()  # B × (L+1) × (L+1), averaged over heads
        x = x + a
        return x + self.mlp(self.ln2(x))


class AccuracyPredictor(nn.Module):
    """ViT-style regressor (§2.2): tokens → linear embedding, + eq. 1's position encoding,
    a learned accuracy token in front (ViT's class token), ``layers`` encoder blocks, and a
    regression head on the accuracy token. Output: predicted top-1 in % (targets are
    standardised with the training mean and std, kept as buffers)."""

    def __init__(self, token_dim: int, d_model: int = 64, heads: int = 4, layers: int = 2,
                 max_layers: int = 128, dropout: float = 0.1, position_encoding: bool = True):
        super().__init__()
        self.embed = nn.Linear(token_dim, d_model)
        self.acc_token = nn.Parameter(torch.zeros(1, 1, d_model))
        nn.init.normal_(self.acc_token, std=0.02)
        self.register_buffer("pe", sinusoidal_encoding(max_layers + 1, d_model) if position_encoding
                             else torch.zeros(max_layers + 1, d_model))
        self.blocks = nn.ModuleList(Block(d_model, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, 1)
        self.register_buffer("y_mean", torch.tensor(0.0))
        self.register_buffer("y_std", torch.tensor(1.0))
        self.token_dim, self.max_layers = token_dim, max_layers

    def forward(self, tokens: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tokens: B × L × token_dim; pad_mask: B × L, True where a position is padding."""
        if tokens.dim() == 2:
            tokens = tokens.unsqueeze(0)
        B, L, D = tokens.shape
        if D != self.token_dim or L > self.max_layers:
            raise ValueError(f"tokens must be B × L × {self.token_dim} with L ≤ {self.max_layers}, "
                             f"got {tuple(tokens.shape)}")
        if pad_mask is None:
            pad_mask = torch.zeros(B, L, dtype=torch.bool, device=tokens.device)
        x = torch.cat([self.acc_token.expand(B, 1, -1), self.embed(tokens)], 1) + self.pe[: L + 1]
        mask = torch.cat([torch.zeros(B, 1, dtype=torch.bool, device=tokens.device), pad_mask], 1)
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(self.ln(x[:, 0])).squeeze(-1) * self.y_std + self.y_mean

    def attention_over_layers(self) -> torch.Tensor:
        """After a forward pass: the accuracy token's attention over the layer tokens in the
        last block (B × L, heads averaged)."""
        w = self.blocks[-1].last_attention
        if w is None:
            raise RuntimeError("run the predictor on some tokens first")
        return w[:, 0, 1:]


def pad_tokens(token_list: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack sequences of different lengths (architectures): B × L_max × D and the padding
    mask (True = padding)."""
    if not token_list:
        raise ValueError("no token sequences to stack: the population is empty")
    L = max(t.shape[0] for t in token_list)
    D = token_list[0].shape[1]
    x = torch.zeros(len(token_list), L, D)
    mask = torch.ones(len(token_list), L, dtype=torch.bool)
    for i, t in enumerate(token_list):
        x[i, : len(t)] = t
        mask[i, : len(t)] = False
    return x, mask


def fit(train: tuple[list[torch.Tensor], torch.Tensor], val: tuple[list[torch.Tensor], torch.Tensor], *,
        d_model: int = 64, heads: int = 4, layers: int = 2, epochs: int = 400, patience: int = 60,
        lr: float = 2e-3, batch_size: int = 32, seed: int = 0, position_encoding: bool = True,
        progress: bool = True, desc: str = "predictor") -> tuple[AccuracyPredictor, dict]:
    """Train an :class:`AccuracyPredictor` on (token sequences, top-1 %) with AdamW and an
    MSE loss on standardised targets; early stopping on the validation configs' MAE (the
    best epoch's weights are kept). Returns the model and its history."""
    (xs, y), (vxs, vy) = train, val
    if len(xs) == 0 or len(vxs) == 0:
        raise ValueError("fit() needs at least one training and one validation configuration")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X, M = pad_tokens(xs)
    VX, VM = pad_tokens(vxs)
    y, vy = torch.as_tensor(y, dtype=torch.float32), torch.as_tensor(vy, dtype=torch.float32)
    model = AccuracyPredictor(X.shape[2], d_model, heads, layers, position_encoding=position_encoding)
    model.y_mean.fill_(float(y.mean()))
    model.y_std.fill_(float(y.std()) if len(y) > 1 and float(y.std()) > 0 else 1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    best, best_state, since, hist = math.inf, None, 0, {"train_mse": [], "val_mae": []}
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not progress)
    for ep in bar:
        model.train()
        perm = torch.randperm(len(X), generator=g)
        tot = 0.0
        for i in range(0, len(X), batch_size):
            idx = perm[i:i + batch_size]
            pred = model(X[idx], M[idx])
            loss = (((pred - y[idx]) / model.y_std) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(idx)
        model.eval()
        with torch.no_grad():
            mae = float((model(VX, VM) - vy).abs().mean())
        hist["train_mse"].append(tot / len(X))
        hist["val_mae"].append(mae)
        if mae < best - 1e-4:
            best, since = mae, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            since += 1
            if since >= patience:
                break
        bar.set_postfix(val_mae=f"{mae:.2f}", best=f"{best:.2f}")
    model.load_state_dict(best_state)
    model.eval()
    hist.update(best_epoch=int(np.argmin(hist["val_mae"])), best_val_mae=best,
                epochs_run=len(hist["val_mae"]), seconds=time.perf_counter() - start)
    return model, hist


@torch.no_grad()
def predict_tokens(model: AccuracyPredictor, token_list: list[torch.Tensor]) -> np.ndarray:
    """Predicted top-1 (%) for each token sequence."""
    X, M = pad_tokens(token_list)
    model.eval()
    return model(X, M).numpy()


# --- chapter 5's predictor, from the cache -------------------------------------------------

def trained(arch: str, profile: str = "quick", *, progress: bool = True) -> dict:
    """Chapter 5's predictor for ``arch`` with everything :func:`predict` needs: ``model``
    (one AccuracyPredictor serving all three architectures), ``probe`` (the probe images),
    ``ranges`` and ``bins``. Built (population labelled, predictor trained) if not cached."""
    from qlib import population

    return population.trained_predictor(arch, profile, progress=progress)


def predict(P: dict, qmodel: nn.Module, images: torch.Tensor | None = None) -> float:
    """Predicted top-1 (%) of a quantized model of ``P``'s architecture, from the histograms
    of its layer outputs on ``images`` (default: ``P``'s probe images)."""
    images = P["probe"] if images is None else images
    tokens = layer_histograms(qmodel, images, P["bins"], P["ranges"])
    return float(predict_tokens(P["model"], [tokens])[0])
