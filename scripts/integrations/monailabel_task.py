"""A MONAI Label inference task that returns a CT image's quality score (a number, not a label map).

Needs ``pip install monailabel`` (not a dependency of the bundle). In a MONAI Label app's
``main.py``::

    from scripts.integrations.monailabel_task import CTQualityTask

    self.infers = {"ct_quality": CTQualityTask("/path/to/bundle")}   # repository's bundle/ or an export

A ready app that serves it: ``monailabel_app/`` (``monailabel start_server --app monailabel_app ...``).
The request's ``image`` is a file (DICOM, NIfTI, NRRD, TIFF/PNG) or a folder of DICOM (MONAI Label
passes DICOM series as folders). The result JSON holds the mean score over the slices, min/max,
the per-slice scores in slice order, the worst slices, and ``errors`` for inputs not scored.
No label file is written. An empty ``image`` (what MONAI Label passes for an id its datastore does not
hold) is an error entry, never the server's working folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType
from scripts.clinical.score import SliceScorer, score_inputs, series_summary
from scripts.ct_inputs import ErrorList


class CTQualityTask(InferTask):
    """Bundle-based scoring: the bundle's inference config (network, preprocessing, window) and ``models/model.pt``
    (or ``checkpoint``: another checkpoint for the same configs)."""

    def __init__(
        self,
        bundle_dir: str | Path,
        device: str | None = None,
        batch_size: int = 16,
        num_workers: int = 0,
        description: str = "CT image quality, 0 (bad) to 4 (excellent), as radiologists score it (TFKT)",
        checkpoint: str | Path | None = None,
    ) -> None:
        super().__init__(type=InferType.OTHERS, labels=None, dimension=2, description=description)
        self.bundle_dir = Path(bundle_dir)
        self.checkpoint = Path(checkpoint) if checkpoint is not None else self.bundle_dir / "models" / "model.pt"
        self.device = device
        self.batch_size = batch_size
        self.num_workers = num_workers
        self._scorer: SliceScorer | None = None

    def is_valid(self) -> bool:
        return (self.bundle_dir / "configs" / "inference.json").is_file() and self.checkpoint.is_file()

    def info(self) -> dict[str, Any]:
        return {**super().info(), "output": "score"}

    def scorer(self) -> SliceScorer:
        """The bundle's network and preprocessing, loaded on first use and kept."""
        if self._scorer is None:
            self._scorer = SliceScorer.from_bundle(
                self.bundle_dir, self.device, self.batch_size, self.num_workers, checkpoint=str(self.checkpoint)
            )
        return self._scorer

    def __call__(self, request: dict[str, Any]) -> tuple[None, dict[str, Any]]:
        image = request.get("image")
        if not isinstance(image, (str, Path)) or not str(image):
            reason = "no image path (MONAI Label passes an empty one for an id its datastore does not hold)"
            no_image = ErrorList()
            no_image.add(str(image or ""), reason)
            return None, {"score": None, "errors": no_image}
        series, errors = score_inputs([image], self.scorer())
        if not series:
            return None, {"score": None, "errors": errors}
        scores = [score for entry in series for score in entry.scores]
        result: dict[str, Any] = {
            "score": sum(scores) / len(scores),
            "min": min(scores),
            "max": max(scores),
            "n_slices": len(scores),
            "slice_scores": scores,
            "slice_score_sd": [spread for entry in series for spread in entry.spreads],
            "series": {entry.name: series_summary(entry) for entry in series},
            "errors": errors,
        }
        return None, result
