"""Score real CT: DICOM files and folders, NIfTI volumes and TIFF/PNG slices, slice by slice and per series.

``python -m scripts score PATH [PATH ...] --output_dir OUT [--ckpt FILE] [--window=-1000,400] [--device D]``

- DICOM: files anywhere under the paths (no preamble or file meta needed), grouped into series by
  SeriesInstanceUID and sorted by slice position; enhanced (multi-frame) CT is split into frames.
  Only CT is scored; other modalities and files without pixel data are reported, never scored.
- NIfTI (``.nii``, ``.nii.gz``): a volume in HU, scored along its axial (third, after reorienting
  to RAS) axis.
- TIFF/PNG: taken as already rendered (float data as is, integers scaled by their type's range).

CT values go to HU (rescale slope and intercept), through the same window as the training data,
then to the network rebuilt from the checkpoint alone. Every input that cannot be scored becomes
an ``errors`` entry ``{path, reason}``; the others are scored regardless. Outputs in OUT, written
atomically: ``scores.csv`` (source, series, slice_index, score) and ``summary.json`` (per series:
slices, mean/min/max score, the worst slices; and ``errors``).
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import ScaleIntensity

from scripts.checkpoints import read_checkpoint
from scripts.ct_io import HU_WINDOW, frames_hu, window_hu
from scripts.data import write_json_atomic
from scripts.handlers import figure_png, pyplot, write_bytes_atomic
from scripts.networks import load_network
from scripts.transforms import SLICE_SUFFIXES, ImageReadError, ResizeSliced, read_slice

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SCORE_RANGE = (0.0, 4.0)
WORST_LISTED = 3


class InputError(ValueError):
    """An input that cannot be scored, with the reason."""


@dataclass
class Series:
    """Slices of one DICOM series, NIfTI volume or rendered slice file, in order, windowed to [0, 1]."""

    name: str
    sources: list[str] = field(default_factory=list)
    slices: list[np.ndarray] = field(default_factory=list)
    positions: list[float] = field(default_factory=list)

    def add(self, source: str, slices: list[np.ndarray], positions: list[float]) -> None:
        self.sources += [source] * len(slices)
        self.slices += slices
        self.positions += positions


def _files(paths: Iterable[str | Path]) -> list[Path]:
    found: list[Path] = []
    for path in map(Path, paths):
        found.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return found


def _finite_2d(pixels: np.ndarray, what: str) -> np.ndarray:
    if pixels.ndim != 2:
        raise InputError(f"{what} has shape {pixels.shape}, not a 2-D slice")
    if not np.isfinite(pixels).all():
        raise InputError(f"{what} contains NaN or Inf")
    return pixels


def _frame_positions(ds: Any, count: int) -> list[float]:
    """Slice positions along z: per-frame plane positions (enhanced CT), the slice's own, or the order."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    if len(per_frame) == count and all("PlanePositionSequence" in group for group in per_frame):
        return [float(group.PlanePositionSequence[0].ImagePositionPatient[2]) for group in per_frame]
    if count == 1 and "ImagePositionPatient" in ds:
        return [float(ds.ImagePositionPatient[2])]
    if count == 1 and "InstanceNumber" in ds:
        return [float(ds.InstanceNumber)]
    return [float(i) for i in range(count)]


def _ensure_transfer_syntax(ds: Any) -> None:
    """Files without file meta (raw datasets) name no transfer syntax: record the encoding they were read with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    ds.file_meta = meta if meta is not None else FileMetaDataset()
    implicit, little = ds.original_encoding
    if implicit:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def read_dicom(path: Path, window: Sequence[float]) -> tuple[str, list[float], list[np.ndarray]]:
    """(series UID, slice positions, windowed slices) of one CT DICOM file; ``InputError`` otherwise."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError) as error:
        raise InputError(f"not a readable DICOM file ({type(error).__name__}: {error})") from error
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        if len(ds) == 0 or "SOPClassUID" not in ds and "Modality" not in ds:
            raise InputError("not a DICOM file (no DICOM elements found)")
        kind = ds.get("Modality", "") or str(ds.get("SOPClassUID", "unknown"))
        raise InputError(f"no pixel data (a {kind} object, not an image)")
    _ensure_transfer_syntax(ds)
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        raise InputError(f"modality {modality or 'missing'} is not CT; only CT is scored")
    try:
        frames = frames_hu(ds)
    except Exception as error:  # decoders raise many types for truncated or unsupported data
        raise InputError(f"pixel data cannot be decoded ({type(error).__name__}: {error})") from error
    slices = [window_hu(_finite_2d(frame, "pixel data"), *window) for frame in frames]
    series = str(ds.get("SeriesInstanceUID", "")) or f"{path.name} (no SeriesInstanceUID)"
    return series, _frame_positions(ds, len(slices)), slices


def read_nifti(path: Path, window: Sequence[float]) -> list[np.ndarray]:
    """The axial slices of a NIfTI volume in HU, windowed; ``InputError`` when it is not a usable volume."""
    import nibabel

    try:
        image = nibabel.as_closest_canonical(nibabel.load(str(path)))
        volume = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as error:  # nibabel raises several types for corrupt or truncated files
        raise InputError(f"not a readable NIfTI volume ({type(error).__name__}: {error})") from error
    if volume.ndim == 4 and volume.shape[3] == 1:
        volume = volume[..., 0]
    if volume.ndim != 3:
        raise InputError(f"expected a 3-D volume, got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise InputError("volume contains NaN or Inf")
    return [window_hu(np.ascontiguousarray(volume[:, :, k].T[::-1]), *window) for k in range(volume.shape[2])]


def read_inputs(paths: Iterable[str | Path], window: Sequence[float] = HU_WINDOW) -> tuple[list[Series], list[dict]]:
    """Every scorable slice under ``paths`` grouped into series, and ``{path, reason}`` for the rest."""
    series: dict[str, Series] = {}
    errors: list[dict[str, str]] = []
    for path in _files(paths):
        name = path.name.lower()
        try:
            if not path.is_file():
                raise InputError("file does not exist")
            if name.endswith(NIFTI_SUFFIXES):
                slices = read_nifti(path, window)
                series.setdefault(str(path), Series(str(path))).add(
                    str(path), slices, list(map(float, range(len(slices))))
                )
            elif path.suffix.lower() in SLICE_SUFFIXES:
                pixels = read_slice(path)
                grey = pixels if pixels.ndim == 2 else pixels.mean(axis=-1)
                series.setdefault(str(path), Series(str(path))).add(str(path), [grey], [0.0])
            else:
                uid, positions, slices = read_dicom(path, window)
                series.setdefault(uid, Series(uid)).add(str(path), slices, positions)
        except (InputError, ImageReadError) as error:
            reason = error.reason if isinstance(error, ImageReadError) else str(error)
            logger.warning("not scored: %s: %s", path, reason)
            errors.append({"path": str(path), "reason": reason})
    for entry in series.values():
        order = np.argsort(entry.positions, kind="stable")
        entry.sources = [entry.sources[i] for i in order]
        entry.slices = [entry.slices[i] for i in order]
        entry.positions = [entry.positions[i] for i in order]
    return list(series.values()), errors


class SliceScorer:
    """The network of a checkpoint with the bundle's preprocessing: resize, min-max scale, score, clip to [0, 4]."""

    def __init__(self, checkpoint: str | Path, device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        self.device = torch.device(device)
        self.network = load_network(str(checkpoint), map_location=self.device).to(self.device)
        settings = read_checkpoint(checkpoint)[1]
        self.channels = int(settings.get("in_channels", 1))
        size = int(settings.get("image_size", 512))
        self.resize = ResizeSliced("image", (size, size))
        self.scale = ScaleIntensity(minv=0.0, maxv=1.0)
        self.batch_size = batch_size

    def _prepare(self, pixels: np.ndarray) -> torch.Tensor:
        image = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None]
        image = self.resize({"image": image})["image"]
        return torch.as_tensor(self.scale(image)).repeat(self.channels, 1, 1)

    @torch.inference_mode()
    def __call__(self, slices: Sequence[np.ndarray]) -> list[float]:
        scores: list[float] = []
        for start in range(0, len(slices), self.batch_size):
            batch = torch.stack([self._prepare(p) for p in slices[start : start + self.batch_size]]).to(self.device)
            scores += self.network(batch).clamp(*SCORE_RANGE).flatten().tolist()
        return scores


def series_png(entry: Series, scores: Sequence[float]) -> bytes:
    """The score along the slice axis, with thumbnails of the best and the worst slice, as PNG bytes."""
    plt = pyplot()
    best, worst = int(np.argmax(scores)), int(np.argmin(scores))
    figure = plt.figure(figsize=(9, 3.2), dpi=100)
    curve = figure.add_axes((0.07, 0.16, 0.5, 0.72))
    curve.plot(range(len(scores)), scores, marker="o" if len(scores) < 60 else None)
    curve.set_ylim(*SCORE_RANGE)
    curve.set_xlabel("slice index")
    curve.set_ylabel("score (0 bad .. 4 excellent)")
    curve.set_title(entry.name[-60:], fontsize=8)
    for column, (label, index) in enumerate((("best", best), ("worst", worst))):
        thumbnail = figure.add_axes((0.62 + 0.19 * column, 0.16, 0.17, 0.72))
        thumbnail.imshow(entry.slices[index], cmap="gray", vmin=0.0, vmax=1.0)
        thumbnail.set_title(f"{label}: slice {index}, {scores[index]:.2f}", fontsize=8)
        thumbnail.axis("off")
    return figure_png(figure)


def _plot_name(number: int, name: str) -> str:
    safe = "".join(c if c.isalnum() or c in ".-" else "_" for c in Path(name).name)[-60:]
    return f"series/{number:03d}_{safe}.png"


def write_report(output_dir: Path, series: list[Series], scores: list[list[float]], errors: list[dict]) -> dict:
    """``scores.csv``, ``summary.json`` and a plot per series in ``output_dir``, atomically; returns the summary."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["source", "series", "slice_index", "score"])
    summary: dict[str, Any] = {"series": {}, "errors": errors}
    for number, (entry, values) in enumerate(zip(series, scores, strict=True)):
        plot = _plot_name(number, entry.name)
        write_bytes_atomic(output_dir / plot, series_png(entry, values))
        for index, (source, value) in enumerate(zip(entry.sources, values, strict=True)):
            writer.writerow([source, entry.name, index, f"{value:.4f}"])
        worst = np.argsort(values, kind="stable")[:WORST_LISTED]
        summary["series"][entry.name] = {
            "n_slices": len(values),
            "mean": float(np.mean(values)),
            "min": float(np.min(values)),
            "max": float(np.max(values)),
            "worst": [{"slice_index": int(i), "source": entry.sources[i], "score": values[i]} for i in worst],
            "plot": plot,
        }
    write_bytes_atomic(output_dir / "scores.csv", buffer.getvalue().encode())
    write_json_atomic(output_dir / "summary.json", summary)
    return summary


def score_paths(
    paths: Sequence[str | Path],
    output_dir: str | Path,
    ckpt: str | Path = "bundle/models/model.pt",
    window: Sequence[float] = HU_WINDOW,
    device: str | None = None,
    batch_size: int = 16,
) -> dict:
    """Score every input; returns the summary (``summary["series"]`` is empty when nothing could be scored)."""
    window = tuple(float(v) for v in window)
    if len(window) != 2 or window[0] >= window[1]:
        raise ValueError(f"window must be two HU values low,high with low < high, got {window}")
    scorer = SliceScorer(ckpt, device or ("cuda:0" if torch.cuda.is_available() else "cpu"), batch_size)
    series, errors = read_inputs(paths, window)
    scores = [scorer(entry.slices) for entry in series]
    return write_report(Path(output_dir), series, scores, errors)
