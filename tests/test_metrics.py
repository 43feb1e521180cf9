"""PLCC, SROCC, KROCC and their sum equal scipy's on the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from scipy import stats
from scripts.metrics import aggregate_metric, correlation_metrics, correlations, logistic_plcc

RNG = np.random.default_rng(7)
LABELS = np.round(RNG.uniform(0, 4, 40) * 5) / 5  # multiples of 0.2, with ties, like LDCTIQA
PREDICTIONS = LABELS + RNG.normal(0, 0.6, 40)
# an early model: predictions that differ only in the third decimal, where float32 sums fail
WEAK_PREDICTIONS = 1.17 + 1e-3 * RNG.standard_normal(40) + 1e-4 * LABELS


def scipy_values(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    values = {
        "plcc": abs(stats.pearsonr(pred, true)[0]),
        "srocc": abs(stats.spearmanr(pred, true)[0]),
        "krocc": abs(stats.kendalltau(pred, true)[0]),
    }
    return {**values, "aggregate": sum(values.values())}


def run_ignite(pred: np.ndarray, true: np.ndarray, batch_size: int) -> dict[str, float]:
    """The metrics as the evaluators attach them: decollated float32 items of shape (1,) under pred/label."""

    def step(engine: Engine, batch: list[int]) -> list[dict[str, torch.Tensor]]:
        return [{"pred": torch.tensor([pred[i]], dtype=torch.float32), "label": torch.tensor([true[i]])} for i in batch]

    engine = Engine(step)
    metrics = correlation_metrics()
    for name, metric in metrics.items():
        metric.attach(engine, name)
    aggregate_metric(metrics).attach(engine, "aggregate")
    batches = [list(range(i, min(i + batch_size, len(pred)))) for i in range(0, len(pred), batch_size)]
    return engine.run(batches).metrics


@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("predictions", [PREDICTIONS, WEAK_PREDICTIONS], ids=["good", "weak"])
def test_ignite_metrics_equal_scipy(predictions: np.ndarray, batch_size: int) -> None:
    network_output = predictions.astype(np.float32)  # what a network gives the evaluator
    expected = scipy_values(network_output.astype(np.float64), LABELS)
    computed = run_ignite(network_output, LABELS, batch_size)
    for name, value in expected.items():
        assert computed[name] == pytest.approx(value, abs=1e-6), name


def test_correlations_equal_scipy_and_are_absolute() -> None:
    expected = scipy_values(PREDICTIONS, LABELS)
    inverted = correlations(-PREDICTIONS, LABELS)  # a model that ranks backwards scores the same
    for name, value in expected.items():
        assert correlations(PREDICTIONS, LABELS)[name] == pytest.approx(value, abs=1e-12)
        assert inverted[name] == pytest.approx(value, abs=1e-12)
    assert correlations(PREDICTIONS, LABELS)["n"] == 40
    assert run_ignite(-PREDICTIONS, LABELS, 8)["plcc"] == pytest.approx(expected["plcc"], abs=1e-6)


def test_logistic_plcc_is_an_option_that_helps_monotone_nonlinear_scores() -> None:
    squashed = np.exp(LABELS)  # perfectly monotone, far from linear
    assert correlations(squashed, LABELS)["srocc"] == pytest.approx(1.0)
    assert correlations(squashed, LABELS)["plcc"] < 0.9
    assert logistic_plcc(squashed, LABELS) > 0.98
