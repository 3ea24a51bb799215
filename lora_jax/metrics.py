"""GLUE metrics, computed by scikit-learn and scipy.

``predictions`` are class indices (int) for classification and scores (float)
for STS-B regression.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

_METRICS = {
    "accuracy": lambda p, y: accuracy_score(y, p),
    "f1": lambda p, y: f1_score(y, p),
    "matthews": lambda p, y: matthews_corrcoef(y, p),
    "pearson": lambda p, y: pearsonr(p, y)[0],
    "spearman": lambda p, y: spearmanr(p, y)[0],
}


def compute(names: tuple[str, ...], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{name: value}`` for each metric name; a constant prediction gives correlation 0, not NaN."""
    out = {}
    for name in names:
        with warnings.catch_warnings():  # scipy warns on constant input; we report 0 for it below
            warnings.simplefilter("ignore")
            value = float(_METRICS[name](np.asarray(predictions), np.asarray(labels)))
        out[name] = 0.0 if np.isnan(value) else value
    return out


def predictions_from_logits(logits: np.ndarray, regression: bool) -> np.ndarray:
    """(N, C) logits -> (N,) class indices, or (N, 1) -> (N,) scores for regression."""
    return logits[:, 0] if regression else logits.argmax(-1)
