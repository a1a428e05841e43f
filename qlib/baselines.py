"""The cheap predictors the accuracy encoder must beat: what a statistician would try first
with the same probe images and the same labelled configurations.

Each takes population records (see :mod:`qlib.population`) split by configuration and
returns predicted top-1 (%) for the test records; whatever it tunes (a ridge penalty, an
MLP's size) is chosen on the validation records, never on the test ones.

* :func:`train_mean` — the training configurations' mean label;
* :func:`probe_top1` — top-1 on the probe images the histograms are taken on;
* :func:`paired` — the float model's exact test top-1 plus the quantized − float
  difference on the same probe images (the noise is only in the disagreements);
* :func:`ridge` on ``"agree"`` features — agreement with the float model's predictions on
  the probe images, the paired estimate, activation bits and the per-layer bits; on
  ``"weights"`` features — per-layer bits and weight SQNR, activation bits and rounding: no
  forward pass at all;
* :func:`mlp` — a multilayer perceptron on the same flattened histogram tokens, one
  architecture; :func:`mlp_pooled` the same on every architecture's records at once (tokens
  zero-padded to the longest architecture, plus an architecture one-hot), fitted on the
  pooled data the encoder sees.
"""
from __future__ import annotations

import numpy as np

from qlib.population import ROUNDINGS

RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
MLP_GRID = tuple((h, a) for h in ((64,), (128, 64)) for a in (1e-2, 1.0, 10.0))
#: the pooled MLP's grid: on 1,500 configurations × 3,400 token values a grid point costs
#: ~10 s on two cores. In a trial on ResNet's records (first split) (128, 64) with L2 1.0 was
#: the best of MLP_GRID on validation; the grid keeps it and the next stronger penalty
POOLED_MLP_GRID = (((128, 64), 1.0), ((128, 64), 10.0))
MLP_EPOCHS = 200        # Adam epochs at most (sklearn stops earlier when the loss stalls)


def labels(records: list[dict]) -> np.ndarray:
    """The measured top-1 (%) of each record."""
    return np.asarray([r["acc"] for r in records], dtype=float)


def train_mean(train: list[dict], test: list[dict]) -> np.ndarray:
    """Every test configuration predicted at the training configurations' mean top-1."""
    return np.full(len(test), labels(train).mean())


def probe_top1(test: list[dict]) -> np.ndarray:
    """Top-1 on the probe images the histograms were taken on, read as the prediction."""
    return np.asarray([r["probe_acc"] for r in test], dtype=float)


def paired(test: list[dict], float_ref: dict) -> np.ndarray:
    """float top-1 (full test set, exact) + (probe top-1 − float probe top-1)."""
    return float_ref["acc"] + probe_top1(test) - float_ref["probe_acc"]


def features(records: list[dict], kind: str, float_ref: dict | None = None) -> np.ndarray:
    """Per-configuration feature rows: ``"weights"`` (no forward pass: per-layer bits and
    weight SQNR, activation bits with float as 32, rounding one-hot) or ``"agree"`` (probe
    agreement with the float model, the paired estimate (needs ``float_ref``), activation
    bits, per-layer bits)."""
    if kind == "agree" and float_ref is None:
        raise ValueError("the agreement features include the paired estimate: pass float_ref "
                         "(the float model's acc and probe_acc)")
    rows = []
    for r in records:
        bits = [float(b) for b in r["config"]["w_bits"].values()]
        a = r["config"]["a_bits"] or 32
        if kind == "weights":
            rows.append(bits + list(r["sqnr"]) + [float(a), 1.0 / a] +
                        [float(r["config"]["rounding"] == k) for k in ROUNDINGS])
        elif kind == "agree":
            rows.append([r["probe_agree"], float(paired([r], float_ref)[0]), float(a), 1.0 / a] + bits)
        else:
            raise ValueError(f"kind must be 'weights' or 'agree', got {kind!r}")
    return np.asarray(rows, dtype=float)


def _fit_select(make, grid, Xtr, ytr, Xva, yva):
    """Fit ``make(h)`` for each h of ``grid`` on train, keep the lowest validation MAE."""
    best = None
    for h in grid:
        m = make(h).fit(Xtr, ytr)
        mae = float(np.abs(m.predict(Xva) - yva).mean())
        if best is None or mae < best[0]:
            best = (mae, h, m)
    return best


def ridge(train: list[dict], val: list[dict], test: list[dict], kind: str,
          float_ref: dict | None = None) -> tuple[np.ndarray, dict]:
    """Standardised ridge regression on :func:`features`; the penalty from RIDGE_ALPHAS by
    validation MAE. Returns test predictions and {"alpha", "val_mae"}."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Xtr, Xva, Xte = (features(s, kind, float_ref) for s in (train, val, test))
    mae, alpha, m = _fit_select(lambda a: make_pipeline(StandardScaler(), Ridge(alpha=a)), RIDGE_ALPHAS,
                                Xtr, labels(train), Xva, labels(val))
    return m.predict(Xte), {"alpha": alpha, "val_mae": mae}


def flat_tokens(records: list[dict], key: str = "tokens_probe") -> np.ndarray:
    """Each record's per-layer histogram tokens, flattened into one feature row."""
    return np.stack([r[key].reshape(-1).numpy() for r in records]).astype(float)


def pooled_tokens(records_by_arch: dict[str, list[dict]], key: str = "tokens_probe",
                  length: int | None = None) -> np.ndarray:
    """Feature rows for records of several architectures at once: each record's tokens
    zero-padded to ``length`` layers (default: the longest), flattened, then a one-hot of
    its architecture (in ``records_by_arch``'s order)."""
    archs = list(records_by_arch)
    L = length or max(r[key].shape[0] for recs in records_by_arch.values() for r in recs)
    rows = []
    for k, a in enumerate(archs):
        for r in records_by_arch[a]:
            t = r[key].numpy()
            pad = np.zeros((L, t.shape[1]))
            pad[: len(t)] = t
            rows.append(np.concatenate([pad.reshape(-1), np.eye(len(archs))[k]]))
    return np.asarray(rows, dtype=float).reshape(len(rows), -1)


def mlp_pooled(train: dict[str, list[dict]], val: dict[str, list[dict]], test: dict[str, list[dict]],
               key: str = "tokens_probe", seed: int = 0, grid=None,
               epochs: int | None = None) -> tuple[np.ndarray, dict]:
    """:func:`mlp` on every architecture's records at once ({arch: records}, the same
    architectures in each), as the encoder is trained: features from :func:`pooled_tokens`;
    ``grid`` of (hidden sizes, L2) pairs, default POOLED_MLP_GRID; ``epochs`` at most (default
    MLP_EPOCHS). Returns test predictions in
    ``test``'s order (architectures, then records)."""
    if not (list(train) == list(val) == list(test)):
        raise ValueError("train, val and test must hold the same architectures in the same order")
    L = max(r[key].shape[0] for part in (train, val, test) for recs in part.values() for r in recs)
    X = [pooled_tokens(part, key, L) for part in (train, val, test)]
    y = [np.concatenate([labels(recs) for recs in part.values()]) for part in (train, val, test)]
    return _mlp_fit(X[0], y[0], X[1], y[1], X[2], seed, grid or POOLED_MLP_GRID, epochs)


def mlp(train: list[dict], val: list[dict], test: list[dict], key: str = "tokens_probe",
        seed: int = 0) -> tuple[np.ndarray, dict]:
    """An MLP on the flattened tokens (one architecture: a fixed length), inputs and target
    standardised, size and weight decay (L2) from MLP_GRID by validation MAE."""
    Xtr, Xva, Xte = (flat_tokens(s, key) for s in (train, val, test))
    return _mlp_fit(Xtr, labels(train), Xva, labels(val), Xte, seed)


def _mlp_fit(Xtr, ytr, Xva, yva, Xte, seed: int, grid=MLP_GRID, epochs: int | None = None) -> tuple[np.ndarray, dict]:
    import warnings

    from sklearn.compose import TransformedTargetRegressor
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def make(h):  # inputs and targets standardised, as the encoder's targets are
        net = MLPRegressor(hidden_layer_sizes=h[0], alpha=h[1], max_iter=epochs or MLP_EPOCHS, random_state=seed)
        return TransformedTargetRegressor(make_pipeline(StandardScaler(), net), transformer=StandardScaler())

    with warnings.catch_warnings():  # a few hundred samples: Adam stops at max_iter, by design
        warnings.simplefilter("ignore", ConvergenceWarning)
        mae, h, m = _fit_select(make, grid, Xtr, ytr, Xva, yva)
    return m.predict(Xte), {"hidden": h[0], "alpha": h[1], "val_mae": mae}
