"""Metrics equal scikit-learn / scipy, and hand-checked values."""

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from lora_jax import metrics
from lora_jax.data import TASKS


def test_hand_values():
    m = metrics.compute(("accuracy", "f1", "matthews"), np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    assert m["accuracy"] == 0.75
    assert m["f1"] == pytest.approx(2 / 3)  # precision 1/2, recall 1
    assert m["matthews"] == pytest.approx(1 / np.sqrt(3))
    r = metrics.compute(("pearson", "spearman"), np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.5]))
    assert r["spearman"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(3))
def test_equal_to_sklearn_and_scipy(seed):
    rng = np.random.default_rng(seed)
    y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    m = metrics.compute(("accuracy", "f1", "matthews"), p, y)
    assert m == {"accuracy": accuracy_score(y, p), "f1": f1_score(y, p), "matthews": matthews_corrcoef(y, p)}
    s, t = rng.normal(size=50), rng.normal(size=50)
    r = metrics.compute(("pearson", "spearman"), s, t)
    assert r["pearson"] == pytest.approx(pearsonr(s, t)[0]) and r["spearman"] == pytest.approx(spearmanr(s, t)[0])


def test_constant_prediction_gives_zero_correlation():
    r = metrics.compute(("pearson", "matthews"), np.zeros(5), np.arange(5.0) > 2)
    assert r == {"pearson": 0.0, "matthews": 0.0}


def test_every_task_metric_exists_and_primary_is_listed():
    for task in TASKS.values():
        assert task.primary in task.metrics
        metrics.compute(task.metrics, np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0]))


def test_predictions_from_logits():
    logits = np.array([[0.1, 2.0], [3.0, -1.0]])
    assert metrics.predictions_from_logits(logits, False).tolist() == [1, 0]
    assert metrics.predictions_from_logits(np.array([[2.5], [0.5]]), True).tolist() == [2.5, 0.5]


def test_trivial_solution_is_one_class_or_a_flat_regression():
    labels = np.array([0, 1] * 50)
    assert metrics.is_trivial(metrics.spread(np.zeros(100, int), labels, False))
    assert metrics.is_trivial(metrics.spread(np.r_[np.zeros(96, int), np.ones(4, int)], labels, False))
    assert not metrics.is_trivial(metrics.spread(np.r_[np.zeros(94, int), np.ones(6, int)], labels, False))
    y = np.linspace(0, 5, 100)
    assert metrics.is_trivial(metrics.spread(2.5 + 0.05 * y, y, True))  # std 0.05x the labels'
    assert not metrics.is_trivial(metrics.spread(2.5 + 0.5 * y, y, True))
    line = metrics.trivial_warning("dev", metrics.spread(np.zeros(100, int), labels, False))
    assert "100% of its dev predictions are one class" in line and "\n" not in line


def test_the_trivial_warning_advises_a_lower_rate_for_loraplus_on_many_matrices():
    """Where LoRA+ on every linear layer overshoots, "a higher --lr" would make it worse."""
    values = metrics.spread(np.zeros(100, int), np.array([0, 1] * 50), False)
    many = {"method": "lora", "targets": "all", "lr": 5e-4, "loraplus_lr_ratio": 16.0}
    assert "lower --lr" in metrics.trivial_warning("dev", values, many)
    for other in ({**many, "targets": "qv"}, {**many, "lr": 2e-4}, {**many, "loraplus_lr_ratio": 1.0},
                  {**many, "method": "full"}, None):
        line = metrics.trivial_warning("dev", values, other)
        assert "higher --lr" in line and "lower --lr" not in line
