"""The accuracy predictor (predictor preprint, Part 1, §2.2): per-layer histogram tokens
(:mod:`qlib.tokens`) into a Transformer encoder whose accuracy token regresses the
quantized model's top-1::

    model, history = fit((train_tokens, train_top1), (val_tokens, val_top1))
    predict_tokens(model, test_tokens)                          # predicted top-1, %
    trained = study.trained_predictor("resnet", "quick")        # chapter 5's, with its probe set
    predict(trained, qmodel)                                    # any quantized ResNet, one probe pass
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from qlib.tokens import histogram_pass, layer_histograms


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
        # 1: the output is a correction to a base estimate (the paired probe estimate), which
        # predict_tokens adds back; 0: the output is the top-1 itself (the preprint's encoder)
        self.register_buffer("residual", torch.tensor(0))
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


class EarlyStopping:
    """Keep the parameters of the best validation score seen so far (lower is better) and
    say when ``patience`` scores in a row failed to beat it by more than ``min_delta``::

        stop = EarlyStopping(model.parameters(), patience=10)
        for epoch in ...:
            if stop.update(val_mae):
                break
        stop.restore()          # the best epoch's parameters back in place
    """

    def __init__(self, tensors, patience: int, min_delta: float = 1e-4):
        self.tensors, self.patience, self.min_delta = list(tensors), patience, min_delta
        self.best, self.best_state, self.since = math.inf, None, 0

    def update(self, score: float) -> bool:
        """Record one validation score; True when training should stop."""
        if score < self.best - self.min_delta:
            self.best, self.since = score, 0
            self.best_state = [t.detach().clone() for t in self.tensors]
        else:
            self.since += 1
        return self.since >= self.patience

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the best score's parameters back; a RuntimeError if no score was finite."""
        if self.best_state is None:
            raise RuntimeError("no validation score was finite (NaN or inf throughout): training diverged; "
                               "lower the learning rate or check the inputs")
        for t, b in zip(self.tensors, self.best_state):
            t.copy_(b)


def fit(train: tuple[list[torch.Tensor], torch.Tensor], val: tuple[list[torch.Tensor], torch.Tensor], *,
        d_model: int = 64, heads: int = 4, layers: int = 2, epochs: int = 400, patience: int = 60,
        lr: float = 2e-3, batch_size: int = 32, weight_decay: float = 1e-2, loss: str = "mse",
        seed: int = 0, position_encoding: bool = True, progress: bool = True,
        desc: str = "predictor") -> tuple[AccuracyPredictor, dict]:
    """Train an :class:`AccuracyPredictor` on (token sequences, top-1 %) with AdamW on
    standardised targets, ``loss`` "mse" (the preprint's) or "huber" (δ = 1 standard
    deviation: a few collapsed models cannot dominate the fit); early stopping on the
    validation configs' MAE (the best epoch's weights are kept). Batches hold sequences of
    one length (one architecture), so no time goes to padding. Returns the model and its
    history."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {loss!r}")
    (xs, y), (vxs, vy) = train, val
    if len(xs) == 0 or len(vxs) == 0:
        raise ValueError("fit() needs at least one training and one validation configuration")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    X, M = pad_tokens(xs)
    VX, VM = pad_tokens(vxs)
    vgroups = [(torch.nonzero(vl == L).squeeze(1), L) for vl in [torch.tensor([len(t) for t in vxs])]
               for L in vl.unique().tolist()]
    y, vy = torch.as_tensor(y, dtype=torch.float32), torch.as_tensor(vy, dtype=torch.float32)
    model = AccuracyPredictor(X.shape[2], d_model, heads, layers, position_encoding=position_encoding)
    model.y_mean.fill_(float(y.mean()))
    model.y_std.fill_(float(y.std()) if len(y) > 1 and float(y.std()) > 0 else 1.0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    lengths = torch.tensor([len(t) for t in xs])
    stop = EarlyStopping(model.state_dict().values(), patience)
    hist = {"train_loss": [], "val_mae": []}
    start = time.perf_counter()
    bar = tqdm(range(epochs), desc=desc, leave=False, disable=not progress)
    for _ in bar:
        hist["train_loss"].append(_epoch(model, opt, X, M, y, lengths, batch_size, g, LOSSES[loss]))
        model.eval()
        with torch.no_grad():
            pv = torch.empty_like(vy)
            for idx, L in vgroups:  # one length at a time: no work on padding
                pv[idx] = model(VX[idx, :L], VM[idx, :L])
            mae = float((pv - vy).abs().mean())
        hist["val_mae"].append(mae)
        if stop.update(mae):
            break
        bar.set_postfix(val_mae=f"{mae:.2f}", best=f"{stop.best:.2f}")
    stop.restore()
    model.eval()
    hist.update(best_epoch=int(np.argmin(hist["val_mae"])), best_val_mae=stop.best,
                epochs_run=len(hist["val_mae"]), seconds=time.perf_counter() - start)
    return model, hist


LOSSES = {"mse": lambda e: (e ** 2).mean(),
          "huber": lambda e: torch.nn.functional.huber_loss(e, torch.zeros_like(e), delta=1.0)}


def _epoch(model: AccuracyPredictor, opt, X, M, y, lengths, batch_size: int, g: torch.Generator, loss_fn) -> float:
    """One pass over the training configurations in a seeded order, each batch of one
    sequence length (cut to it); the mean loss."""
    model.train()
    perm = torch.randperm(len(X), generator=g)
    batches = []
    for L in lengths.unique().tolist():
        same = perm[lengths[perm] == L]
        batches += [(same[i:i + batch_size], L) for i in range(0, len(same), batch_size)]
    tot = 0.0
    for k in torch.randperm(len(batches), generator=g).tolist():
        idx, L = batches[k]
        pred = model(X[idx, :L], M[idx, :L])
        loss = loss_fn((pred - y[idx]) / model.y_std)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tot += loss.item() * len(idx)
    return tot / len(X)


@torch.no_grad()
def predict_tokens(model: AccuracyPredictor, token_list: list[torch.Tensor], base=None) -> np.ndarray:
    """Predicted top-1 (%) for each token sequence; a residual model's correction is added
    to ``base`` (one base estimate per sequence, required then)."""
    X, M = pad_tokens(token_list)
    model.eval()
    out = model(X, M).numpy()
    if int(model.residual):
        if base is None or len(base) != len(out):
            raise ValueError("this predictor corrects a base estimate (the paired probe estimate): "
                             f"pass base= with one value per token sequence ({len(out)})")
        out = out + np.asarray(base, dtype=out.dtype)
    return out


def predict(trained: dict, qmodel: nn.Module, images: torch.Tensor | None = None) -> float:
    """Predicted top-1 (%) of a quantized model of ``trained``'s architecture (a dict from
    :func:`qlib.study.trained_predictor`: ``model``, ``probe``, ``bins``, ``ranges``), from
    the histograms of its layer outputs on ``images`` (default: the probe images). A
    residual predictor adds its correction to the paired estimate on the probe images
    (``float_acc`` + probe top-1 − ``float_probe_acc``, with ``probe_labels``)."""
    model = trained["model"]
    if not int(model.residual):
        images = trained["probe"] if images is None else images
        tokens = layer_histograms(qmodel, images, trained["bins"], trained["ranges"])
        return float(predict_tokens(model, [tokens])[0])
    if images is not None:
        raise ValueError("this predictor corrects the paired estimate on its own probe images, whose float "
                         "top-1 it knows: call predict(trained, qmodel) without images")
    out = histogram_pass(qmodel, trained["probe"], trained["bins"], trained["ranges"], labels=trained["probe_labels"])
    base = trained["float_acc"] + out["acc"] - trained["float_probe_acc"]
    return float(predict_tokens(model, [out["tokens"]], base=[base])[0])
