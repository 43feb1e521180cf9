"""PLCC, SROCC, KROCC and their sum, as the LDCTIQA challenge computes them.

Raw predictions, absolute correlation values, no logistic fitting by default. The Ignite
metrics feed the workflows; ``correlations`` is the same computation on plain arrays
(scipy's pearsonr, spearmanr and kendalltau). The VQEG logistic fit before PLCC, common in
natural-image IQA, is offered by ``logistic_plcc`` and never used for LDCTIQA numbers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from ignite.metrics import Metric, MetricsLambda
from ignite.metrics.metric import reinit__is_reduced
from ignite.metrics.regression import KendallRankCorrelation, PearsonCorrelation, SpearmanRankCorrelation
from monai.handlers import from_engine
from numpy.typing import ArrayLike
from scipy import optimize, stats
from scripts.calibration import calibration_metrics
from scripts.options import as_bool

METRIC_NAMES = ("plcc", "srocc", "krocc")


def correlations(predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """``{"plcc", "srocc", "krocc", "aggregate", "n"}`` from scipy, absolute values."""
    pred = np.asarray(predictions, dtype=np.float64)
    true = np.asarray(labels, dtype=np.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant inputs give NaN, reported as such
        values = {
            "plcc": abs(float(stats.pearsonr(pred, true)[0])),
            "srocc": abs(float(stats.spearmanr(pred, true)[0])),
            "krocc": abs(float(stats.kendalltau(pred, true)[0])),
        }
    values["aggregate"] = values["plcc"] + values["srocc"] + values["krocc"]
    return {**values, "n": int(pred.size)}


def vqeg_logistic(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The VQEG 4-parameter logistic mapping of objective scores to the subjective scale."""
    mapped: np.ndarray = (b1 - b2) / (1.0 + np.exp(-(x - b3) / np.abs(b4) - 1e-12)) + b2
    return mapped


def logistic_plcc(predictions: ArrayLike, labels: ArrayLike) -> float:
    """PLCC after fitting the VQEG logistic from predictions to labels (an option, not the default)."""
    pred = np.asarray(predictions, dtype=np.float64)
    true = np.asarray(labels, dtype=np.float64)
    start = [true.max(), true.min(), float(np.mean(pred)), float(np.std(pred)) or 1.0]
    try:
        params, _ = optimize.curve_fit(vqeg_logistic, pred, true, p0=start, maxfev=20000)
    except (RuntimeError, optimize.OptimizeWarning, ValueError):
        return abs(float(stats.pearsonr(pred, true)[0]))
    return abs(float(stats.pearsonr(vqeg_logistic(pred, *params), true)[0]))


class PearsonCorrelation64(PearsonCorrelation):
    """Ignite's Pearson correlation with float64 running sums.

    The parent keeps its sums in float32; E[x^2] - E[x]^2 then cancels away the variance of
    predictions that vary little (an early or weak model) and the PLCC drifts from scipy's.
    """

    @reinit__is_reduced
    def reset(self) -> None:
        super().reset()
        for name in self._state_dict_all_req_keys[:-1]:  # the five sums; the last key is the count
            setattr(self, name, getattr(self, name).double())


def _absolute(metric: Metric) -> MetricsLambda:
    return MetricsLambda(lambda value: abs(float(value)), metric)


def pred_label_float64(output: Any) -> tuple[list, list]:
    """``pred`` (its first value: the score, see ``scripts.patches.SpreadInferer``) and ``label`` of each
    decollated item, in float64.

    Products of float32 inputs lose the digits that matter when predictions vary little.
    """
    predictions, labels = from_engine(["pred", "label"])(output)
    return [p.double().reshape(-1)[:1] for p in predictions], [y.double() for y in labels]


def correlation_metrics(output_transform: Callable[[Any], Any] | None = None) -> dict[str, Metric]:
    """Ignite metrics ``plcc``, ``srocc``, ``krocc`` (absolute) for an evaluator's ``pred``/``label``."""
    transform = output_transform or pred_label_float64
    return {
        "plcc": _absolute(PearsonCorrelation64(output_transform=transform)),
        "srocc": _absolute(SpearmanRankCorrelation(output_transform=transform, check_compute_fn=False)),
        "krocc": _absolute(KendallRankCorrelation(output_transform=transform, check_compute_fn=False)),
    }


def validation_metrics(calibrate: bool = True) -> dict[str, Metric]:
    """``correlation_metrics`` and, with ``calibrate``, the line that maps the predictions onto the labels
    (``calibration_scale``, ``calibration_shift``; see ``scripts.calibration``): what training computes on its
    validation set each epoch, and saves with its best checkpoint."""
    metrics = correlation_metrics()
    if as_bool(calibrate, "calibrate"):
        metrics.update(calibration_metrics(pred_label_float64))
    return metrics


def _finite_sum(*values: float) -> float:
    """The aggregate, or -inf when a correlation is NaN (constant predictions): NaN compares false with
    everything, so it could never be beaten and would keep an epoch as the best."""
    total = float(sum(values))
    return total if math.isfinite(total) else -math.inf


def aggregate_metric(metrics: dict[str, Metric]) -> MetricsLambda:
    """PLCC + SROCC + KROCC over the same three metric objects (computed once, not twice); -inf instead of NaN."""
    return MetricsLambda(_finite_sum, *(metrics[name] for name in METRIC_NAMES))
