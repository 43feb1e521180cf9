"""Score calibration: a trained model's raw outputs mapped linearly onto the radiologists' scale.

A regressor trained with MSE on a hard task pulls its outputs towards the mean score: the demo
model, which scores a slice as the mean over crops that were each trained with the slice's label,
gave 1.1 to slices rated 0 and 3.2 to slices rated 4. When a best checkpoint is saved, the
validation slices' predictions ``p`` and labels ``y`` give the least-squares line
``y = scale * p + shift``; the checkpoint stores that line in the network (``ScoreCalibration``,
two buffers at the end of its head), so every path that runs the network (evaluation, inference,
``score``, TorchScript, ONNX, MONAI Label, MONAI Deploy) gives calibrated scores.

PLCC, SROCC and KROCC, which LDCTIQA takes in absolute value, are those of the raw outputs: only
the absolute error falls. On the validation slices the calibrated scores spread no wider than the
labels (their standard deviation is |r| times the labels'), so a weak model is never stretched
into confident scores. A model whose outputs run against the labels (an early epoch can, and the
absolute correlations can still make it the best) gets a decreasing line, which turns its scores
the right way round. Checkpoints saved before calibration existed load with the identity line.
"""

import logging  # no ``from __future__ import annotations``: TorchScript reads the buffers' annotations as types
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.metrics import Metric, MetricsLambda
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from torch import nn

logger = logging.getLogger(__name__)

SCALE_METRIC = "calibration_scale"
SHIFT_METRIC = "calibration_shift"
STEEP_LINE = 5.0  # a line steeper than this stretches the outputs' rounding noise into the scores: said in the log


class ScoreCalibration(nn.Module):
    """``scale * x + shift``, with both kept as buffers (saved in the state dict, never trained)."""

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("shift", torch.tensor(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """A checkpoint saved before calibration existed holds no line: it loads as the identity."""
        for name, identity in (("scale", 1.0), ("shift", 0.0)):
            state_dict.setdefault(prefix + name, torch.tensor(identity))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


def scoring_calibration(network: nn.Module) -> tuple[str, ScoreCalibration] | None:
    """The state-dict prefix and module of the calibration that ends ``network``'s score (not the one F keeps
    for its unused phase-1 head), through the DDP, ``torch.compile`` and ``PatchScorer`` wrappers; None for a
    network without one."""
    prefix, unwrapped = "", True
    while unwrapped:
        unwrapped = False
        for wrapper in ("module", "_orig_mod", "network"):  # DDP, torch.compile, PatchScorer
            inner = getattr(network, wrapper, None)
            if isinstance(inner, nn.Module):
                network, prefix, unwrapped = inner, prefix + wrapper + ".", True
                break
    calibration = getattr(network, "calibration", None)
    return (prefix + "calibration.", calibration) if isinstance(calibration, ScoreCalibration) else None


def fit_line(predictions: Sequence[float], labels: Sequence[float]) -> tuple[float, float]:
    """The least-squares line ``labels = scale * predictions + shift``, or the identity (1, 0) where there is
    none that keeps the ranking: fewer than 3 points, constant predictions, or no correlation at all."""
    n = len(predictions)
    sums = [n, sum(predictions), sum(labels), sum(p * p for p in predictions)]
    sums.append(sum(p * y for p, y in zip(predictions, labels, strict=True)))
    return _line_from_sums(*map(float, sums))


def _line_from_sums(n: float, sum_p: float, sum_y: float, sum_pp: float, sum_py: float) -> tuple[float, float]:
    if n < 3:
        return 1.0, 0.0
    variance = sum_pp / n - (sum_p / n) ** 2
    covariance = sum_py / n - (sum_p / n) * (sum_y / n)
    if not (variance > 1e-12 and covariance != 0 and math.isfinite(covariance / variance)):
        return 1.0, 0.0
    scale = covariance / variance
    return scale, (sum_y - scale * sum_p) / n


class LineFit(Metric):
    """Ignite metric: ``fit_line`` over an evaluator's epoch, from float64 running sums (summed over
    processes in distributed validation). ``compute`` returns ``(scale, shift)``."""

    _state_dict_all_req_keys = ("_sums",)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sums = torch.zeros(5, dtype=torch.float64, device=self._device)

    @reinit__is_reduced
    def update(self, output: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]) -> None:
        predictions, labels = output
        p = torch.cat([torch.as_tensor(x).reshape(-1) for x in predictions]).double().to(self._device)
        y = torch.cat([torch.as_tensor(x).reshape(-1) for x in labels]).double().to(self._device)
        count = torch.tensor(float(p.numel()), dtype=torch.float64, device=self._device)
        self._sums += torch.stack([count, p.sum(), y.sum(), (p * p).sum(), (p * y).sum()])

    @sync_all_reduce("_sums")
    def compute(self) -> tuple[float, float]:
        return _line_from_sums(*self._sums.tolist())


def calibration_metrics(output_transform: Callable[[Any], Any]) -> dict[str, Metric]:
    """``calibration_scale`` and ``calibration_shift``: one ``LineFit`` over an evaluator's ``pred``/``label``,
    logged with the validation metrics and read by ``scripts.checkpoints.BestCheckpointSaver``."""
    line = LineFit(output_transform=output_transform)
    return {
        SCALE_METRIC: MetricsLambda(lambda fit: fit[0], line),
        SHIFT_METRIC: MetricsLambda(lambda fit: fit[1], line),
    }


def calibrated_state(network: nn.Module, metrics: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``network``'s state dict with its scoring calibration refitted from an epoch's ``metrics``: the fitted
    line applied after the one it already has (a fine-tuned model that started calibrated). The network itself
    is left as it is: training goes on with the line it had."""
    state = network.state_dict()
    found = scoring_calibration(network)
    if found is None or SCALE_METRIC not in metrics:
        return state
    prefix, calibration = found
    scale, shift = float(metrics[SCALE_METRIC]), float(metrics[SHIFT_METRIC])
    state[prefix + "scale"] = (calibration.scale * scale).detach().clone()
    state[prefix + "shift"] = (calibration.shift * scale + shift).detach().clone()
    logger.info("calibration line fitted on the labelled slices: score = %.4f x output %+.4f", scale, shift)
    slope = float(state[prefix + "scale"])
    if slope < 0:
        logger.warning(
            "the model's outputs run against the labels (line slope %.4f): its scores are its outputs turned round, "
            "which holds only while it stays inverted; train it longer, or check that higher labels mean better",
            slope,
        )
    if abs(slope) > STEEP_LINE:
        logger.warning(
            "the model's outputs barely vary: its line stretches them %.1f times, and their rounding with them "
            "(bf16 and fp16 inference above all)",
            abs(slope),
        )
    return state
