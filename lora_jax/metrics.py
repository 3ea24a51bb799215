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


# A run "ends trivial" when its predictions ignore the input: one class for at least this share of
# the dev examples, or (regression) a prediction spread below this share of the labels' spread.
TRIVIAL_CLASS_SHARE = 0.95
TRIVIAL_STD_RATIO = 0.1
# The rate at which LoRA+ on every linear layer learnt RTE, MRPC and SST-2 (results/rank-baseline/).
MANY_TARGETS_LORAPLUS_LR = 2e-4


def spread(predictions: np.ndarray, labels: np.ndarray, regression: bool) -> dict[str, float]:
    """How much the predictions vary: ``{"majority_share"}``, the share of the most common predicted
    class, or for regression ``{"std_ratio"}``, std(predictions) / std(labels)."""
    predictions = np.asarray(predictions)
    if regression:
        std = float(np.std(labels))
        return {"std_ratio": float(np.std(predictions)) / std if std > 0 else 0.0}
    return {"majority_share": float(np.bincount(predictions.astype(np.int64)).max() / max(len(predictions), 1))}


def is_trivial(values: dict[str, float]) -> bool:
    """Whether ``values`` (with ``spread``'s entry) are those of the trivial solution."""
    if "majority_share" in values:
        return values["majority_share"] >= TRIVIAL_CLASS_SHARE
    return "std_ratio" in values and values["std_ratio"] < TRIVIAL_STD_RATIO


def trivial_warning(split: str, values: dict[str, float], config: dict | None = None) -> str:
    """One line saying that a run ended at the trivial solution and what to try; ``config`` (the report's
    ``TrainConfig.to_dict()``) picks the advice."""
    what = (f"{values['majority_share']:.0%} of its {split} predictions are one class"
            if "majority_share" in values else
            f"its {split} predictions vary {values['std_ratio']:.2f}x as much as the labels")
    c = config or {}
    if (c.get("method") != "full" and c.get("targets", "qv") != "qv" and c.get("loraplus_lr_ratio", 1) > 1
            and c.get("lr", 0) > MANY_TARGETS_LORAPLUS_LR):
        # LoRA+ moves every B 16x faster, and on many matrices at once that overshoots. Every linear layer at
        # 5e-4: on RTE medians below the majority class, 3 of 6 seeds trivial; on MRPC both seed-0 runs trivial.
        # At 2e-4 none of r = 8's or auto's 12 seeds on the two tasks was (results/rank-baseline/). So here a
        # *lower* rate is the advice.
        advice = ("with LoRA+ on more than q, v try a lower --lr such as 2e-4 (every linear layer at "
                  "5e-4 stayed on this plateau on RTE and MRPC where 2e-4 learnt, results/rank-baseline/)")
    else:
        advice = ("try more --epochs, a higher --lr, or, if the run set a lower --loraplus-lr-ratio, the default 16 "
                  "(it left this plateau on MRPC where plain LoRA did not, results/robust-lora/)")
    return f"warning: the run ended at the trivial solution ({what}); {advice}"
