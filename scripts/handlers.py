"""Ignite handlers that write what evaluation and inference produce.

``PredictionWriter`` collects one score per slice and, when the run ends, writes
``predictions.csv`` and, for labelled data, ``metrics.json`` and ``scatter.png``. Every file
is written to a temporary name and renamed, so a crash never leaves a half-written output.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
from ignite.engine import Engine, Events
from scripts.ct_inputs import ErrorList
from scripts.data import DatasetError
from scripts.metrics import METRIC_NAMES, correlations, logistic_plcc
from scripts.options import LDCT_RANGE, as_bool
from scripts.output_dir import printable_tree, write_bytes_atomic, write_json_atomic

logger = logging.getLogger(__name__)


def _item_source(item: Any) -> str:
    image = item.get("image") if isinstance(item, dict) else None
    return str((getattr(image, "meta", None) or {}).get("filename_or_obj", ""))


def _batch_field(batch: Any, key: str, size: int) -> list[Any]:
    """Each item's ``key`` (None where absent), from a decollated list of items or a collated dictionary."""
    if isinstance(batch, dict):
        values = batch.get(key)
        if values is None:
            return [None] * size
        return [values] * size if isinstance(values, str) else list(values)
    return [item.get(key) if isinstance(item, dict) else None for item in batch]


def _batch_sources(batch: Any, size: int, root: Path | None) -> list[str]:
    """The source file of each item of a batch, from its image's ``filename_or_obj``.

    Workflows decollate ``engine.state.batch`` into a list of items; a collated dictionary is
    read too.
    """
    if isinstance(batch, dict):
        names = (getattr(batch.get("image"), "meta", None) or {}).get("filename_or_obj", [""] * size)
        names = [str(name) for name in ([names] if isinstance(names, str) else names)]
    else:
        names = [_item_source(item) for item in batch]
    if root is None:
        return names
    relative = []
    for name in names:
        path = Path(name).resolve() if name else None
        relative.append(str(path.relative_to(root)) if path and path != root and path.is_relative_to(root) else name)
    return relative


def pyplot() -> Any:
    """matplotlib's pyplot on the headless Agg backend (imported only when a plot is drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def figure_png(figure: Any) -> bytes:
    """A figure as PNG bytes, closed afterwards."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot().close(figure)
    return buffer.getvalue()


def scatter_png(predictions: np.ndarray, labels: np.ndarray, metrics: dict[str, float], label_range: tuple) -> bytes:
    """Predicted against true scores with the metrics in the title, as PNG bytes."""
    plt = pyplot()
    figure, axes = plt.subplots(figsize=(5, 5), dpi=120)
    axes.scatter(labels, predictions, s=12, alpha=0.6)
    low, high = label_range
    axes.plot([low, high], [low, high], color="grey", linewidth=1, linestyle="--")
    axes.set_xlabel("true score")
    axes.set_ylabel("predicted score")
    axes.set_title(
        f"PLCC {metrics['plcc']:.4f}  SROCC {metrics['srocc']:.4f}  KROCC {metrics['krocc']:.4f}\n"
        f"aggregate {metrics['aggregate']:.4f}  (n={metrics['n']})",
        fontsize=9,
    )
    figure.tight_layout()
    return figure_png(figure)


def training_curves_png(epochs: list[dict[str, float]]) -> bytes:
    """Training loss and validation metrics per epoch (records with ``epoch``, ``loss``, metrics), as PNG bytes."""
    plt = pyplot()
    figure, (loss_axes, metric_axes) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    numbers = [record["epoch"] for record in epochs]
    loss_axes.plot(numbers, [record["loss"] for record in epochs], marker="o")
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("training loss (MSE)")
    for name in ("plcc", "srocc", "krocc"):
        if epochs and name in epochs[0]:
            metric_axes.plot(numbers, [record[name] for record in epochs], marker="o", label=name.upper())
    metric_axes.set_xlabel("epoch")
    metric_axes.set_ylabel("validation correlation")
    metric_axes.set_ylim(0, 1)
    metric_axes.legend(loc="lower right")
    figure.tight_layout()
    return figure_png(figure)


class PredictionWriter:
    """Write ``predictions.csv`` (file, [slice,] [label,] prediction, score_sd), and metrics for labelled data.

    ``score_sd`` is the spread of the score over the crops a slice was scored from (the second column
    of a ``scripts.patches.SpreadInferer`` prediction; 0 for networks that read whole slices).

    Items carrying a ``frame`` (slices of DICOM or NIfTI files) get a ``slice`` column. Items
    whose ``error`` is set (inputs that could not be read) get no prediction: with
    ``errors_file`` they are listed there as ``{path, reason}``.

    Args:
        output_dir: folder for the outputs.
        dataset_dir: file names are written relative to it when they lie under it.
        clip_range: clamp written predictions to this range (inference); None keeps them raw
            (evaluation, where metrics use raw values).
        logistic_fit: also report ``plcc_logistic`` (VQEG logistic fit before PLCC).
        label_range: the score scale, for the scatter plot's axes.
        errors_file: file name in ``output_dir`` for the inputs not scored, or None.
    """

    def __init__(
        self,
        output_dir: str | Path,
        dataset_dir: str | Path | None = None,
        clip_range: tuple[float, float] | None = None,
        logistic_fit: bool = False,
        label_range: tuple[float, float] = LDCT_RANGE,
        errors_file: str | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.root = Path(dataset_dir).resolve() if dataset_dir else None
        self.clip_range = clip_range
        self.logistic_fit = as_bool(logistic_fit, "logistic_fit")
        self.label_range = tuple(label_range)
        self.errors_file = errors_file
        self.rows: list[tuple[str, int | None, float | None, float, float]] = []
        self.patients: list[str | None] = []
        self.errors = ErrorList()

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.write)

    def reset(self, engine: Engine | None = None) -> None:
        self.rows = []
        self.patients = []
        self.errors = ErrorList()

    def collect(self, engine: Engine) -> None:
        batch = engine.state.batch
        outputs = cast(list[dict[str, Any]], engine.state.output)  # the decollated predictions (ignite types it int)
        names = _batch_sources(batch, len(outputs), self.root)
        frames = _batch_field(batch, "frame", len(outputs))
        errors = _batch_field(batch, "error", len(outputs))
        patients = _batch_field(batch, "patient", len(outputs))
        for name, frame, error, patient, item in zip(names, frames, errors, patients, outputs, strict=True):
            if error:
                self.errors.add(name, str(error))
                continue
            self.patients.append(None if patient is None else str(patient))
            pred = item["pred"].reshape(-1)
            spread = float(pred[1]) if pred.numel() > 1 else 0.0
            label = item.get("label")
            label_value = None if label is None else float(np.asarray(label.detach().cpu()).reshape(-1)[0])
            self.rows.append((name, None if frame is None else int(frame), label_value, float(pred[0]), spread))

    def write(self, engine: Engine | None = None) -> dict[str, Any] | None:
        labelled = bool(self.rows) and all(label is not None for _, _, label, _, _ in self.rows)
        sliced = any(frame is not None for _, frame, _, _, _ in self.rows)
        predictions = np.array([row[3] for row in self.rows], dtype=np.float64)
        if self.clip_range is not None:
            predictions = np.clip(predictions, *self.clip_range)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["file"] + ["slice"] * sliced + ["label"] * labelled + ["prediction", "score_sd"])
        for (name, frame, label, _, spread), prediction in zip(self.rows, predictions, strict=True):
            row = [name] + [frame] * sliced + ([f"{label:.6g}"] if labelled else [])
            writer.writerow(printable_tree(row + [f"{prediction:.9g}", f"{spread:.4g}"]))
        write_bytes_atomic(self.output_dir / "predictions.csv", buffer.getvalue().encode())
        logger.info("wrote %d predictions to %s", len(self.rows), self.output_dir / "predictions.csv")
        if self.errors_file:
            write_json_atomic(self.output_dir / self.errors_file, self.errors)
            logger.info("%d inputs not scored, listed in %s", len(self.errors), self.output_dir / self.errors_file)
        if not self.rows and self.errors:
            raise DatasetError([(error["path"], error["reason"]) for error in self.errors])  # nothing was scored
        if not labelled or len(self.rows) < 2:
            return None
        labels = np.array([row[2] for row in self.rows], dtype=np.float64)
        metrics = self._metrics(engine, predictions, labels)
        if all(patient is not None for patient in self.patients):
            metrics["per_patient"] = self._per_patient(predictions, labels)
        write_json_atomic(self.output_dir / "metrics.json", metrics)
        write_bytes_atomic(self.output_dir / "scatter.png", scatter_png(predictions, labels, metrics, self.label_range))
        logger.info(
            "metrics: %s", ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k not in ("n", "per_patient"))
        )
        if "per_patient" in metrics:
            per_patient = metrics["per_patient"]
            logger.info(
                "per patient (%d): %s", per_patient["n"], ", ".join(f"{k} {per_patient[k]:.4f}" for k in METRIC_NAMES)
            )
        return metrics

    def _per_patient(self, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Each patient's mean prediction against their mean label (the scan-level use of slice scores), with
        ``patients.csv`` (patient, slices, label, prediction) beside the metrics."""
        groups: dict[str, list[int]] = {}
        for index, patient in enumerate(self.patients):
            groups.setdefault(str(patient), []).append(index)
        names = sorted(groups)
        members = [groups[name] for name in names]
        mean_predictions = np.array([predictions[index].mean() for index in members])
        mean_labels = np.round([labels[index].mean() for index in members], 6)  # float32 labels: ties stay ties
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["patient", "slices", "label", "prediction"])
        for name, indices, label, prediction in zip(names, members, mean_labels, mean_predictions, strict=True):
            writer.writerow(printable_tree([name, len(indices), f"{label:.6g}", f"{prediction:.9g}"]))
        write_bytes_atomic(self.output_dir / "patients.csv", buffer.getvalue().encode())
        return correlations(mean_predictions, mean_labels)

    def _metrics(self, engine: Engine | None, predictions: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """The engine's Ignite correlations when attached, else the same numbers from scipy; with the mean absolute
        and root-mean-square errors."""
        engine_metrics = engine.state.metrics if engine is not None else {}
        if all(name in engine_metrics for name in METRIC_NAMES):
            metrics: dict[str, Any] = {name: float(engine_metrics[name]) for name in METRIC_NAMES}
            metrics["aggregate"] = sum(metrics[name] for name in METRIC_NAMES)
            metrics["n"] = int(labels.size)
        else:
            metrics = correlations(predictions, labels)
        errors = predictions - labels  # agreement on the scale itself, which the correlations do not see
        metrics["mae"], metrics["rmse"] = float(np.abs(errors).mean()), float(np.sqrt(np.mean(errors**2)))
        if self.logistic_fit:
            metrics["plcc_logistic"] = logistic_plcc(predictions, labels)
        return metrics
