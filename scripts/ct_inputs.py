"""Real CT inputs to score: DICOM files and folders, NIfTI volumes and rendered TIFF/PNG slices.

Scoring runs in two steps so that reading can overlap with the network (DataLoader workers):

1. ``index_inputs`` reads headers only. DICOM files (no preamble or file meta needed) are
   grouped into series by SeriesInstanceUID and sorted by slice position; enhanced (multi-frame)
   CT gives one item per frame; a NIfTI volume gives one item per axial slice (after
   reorienting to RAS); a TIFF/PNG file is one already-rendered slice. Each item is
   ``{"image": path, "frame": k, "series": name, "position": z, "error": "", "warning": ""}`` (``warning``:
   what was assumed to read it, e.g. a missing PhotometricInterpretation). Inputs that cannot
   be scored (other modalities, no pixel data, unreadable, wrong dimensionality) are listed as
   ``{path, reason}`` instead.
2. ``LoadCTSliced`` reads one item's pixels: CT to HU (rescale slope and intercept), through the
   training window to [0, 1]. Problems only found in the pixels (truncated or undecodable data,
   NaN/Inf) are recorded in the item's ``error`` instead of stopping the batch.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from scripts.ct_io import HU_WINDOW, check_hu_mapping, check_window, frame_count, frame_hu, window_hu
from scripts.data import DatasetError
from scripts.transforms import SLICE_SUFFIXES, ImageReadError, read_slice, to_channels

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
HEADER_DEFER_SIZE = 4096  # bytes: larger values (the pixels) are left in the file while indexing
PLACEHOLDER_SIZE = 8
MIN_SIDE = 8  # pixels: smaller "slices" are not images a radiologist could score
ASSUMED_MONOCHROME2 = "no PhotometricInterpretation: read as MONOCHROME2"


class InputError(ValueError):
    """An input that cannot be scored, with the reason."""


def add_error(errors: list[dict], path: str, reason: str) -> None:
    """Add ``{path, reason}`` to ``errors`` unless it is there already (a volume's slices share one reason)."""
    entry = {"path": str(path), "reason": reason}
    if entry not in errors:
        errors.append(entry)


def find_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and every file under the folders named, in a stable order."""
    found: list[Path] = []
    for path in map(Path, paths):
        found.extend(sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path])
    return found


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_rendered(path: Path) -> bool:
    return path.suffix.lower() in SLICE_SUFFIXES


# --- DICOM -------------------------------------------------------------------------------------


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


def read_dicom_ct(path: Path, header_only: bool = False) -> Any:
    """A CT DICOM dataset (pixels left in the file when ``header_only``); ``InputError`` for anything else."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, force=True, defer_size=HEADER_DEFER_SIZE if header_only else None)
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as error:
        raise InputError(f"not a readable DICOM file ({type(error).__name__}: {error})") from error
    if not any(tag in ds for tag in PIXEL_TAGS):
        sop_class = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
        if len(ds) == 0 or (sop_class is None and "Modality" not in ds):
            raise InputError("not a DICOM file (no DICOM elements found)")
        kind = ds.get("Modality", "") or getattr(sop_class, "name", str(sop_class))  # e.g. a DICOMDIR
        raise InputError(f"no pixel data (a {kind} object, not an image)")
    modality = str(ds.get("Modality", ""))
    if modality != "CT":
        raise InputError(f"modality {modality or 'missing'} is not CT; only CT is scored")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise InputError(f"{samples} samples per pixel: a colour image, not a CT slice (wrong dimensionality)")
    if not ds.get("Rows") or not ds.get("Columns"):
        raise InputError("no Rows/Columns: the pixel data has no 2-D shape")
    if min(int(ds.Rows), int(ds.Columns)) < MIN_SIDE:
        raise InputError(f"slice of {ds.Rows} x {ds.Columns} pixels is too small (at least {MIN_SIDE} x {MIN_SIDE})")
    try:
        check_hu_mapping(ds)
    except ValueError as error:
        raise InputError(str(error)) from None
    if "PhotometricInterpretation" not in ds:  # common in old implicit-VR files; viewers read them so too
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.photometric_assumed = True
    _ensure_transfer_syntax(ds)
    return ds


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


# --- NIfTI -------------------------------------------------------------------------------------


def _nifti_header(path: Path) -> Any:
    """The NIfTI image with its pixels left in the file; ``InputError`` unless it is one 3-D volume."""
    import nibabel

    try:
        image = nibabel.load(str(path))
    except Exception as error:  # nibabel raises several types for corrupt or truncated headers
        raise InputError(f"not a readable NIfTI volume ({type(error).__name__}: {error})") from error
    shape = image.shape[:3] if len(image.shape) == 4 and image.shape[3] == 1 else image.shape
    if len(shape) != 3:
        raise InputError(f"expected a 3-D volume, got shape {tuple(image.shape)} (wrong dimensionality)")
    return image


def _nifti_depth(path: Path) -> int:
    """How many axial slices the volume has once reoriented to RAS, from the header alone."""
    import nibabel

    image = _nifti_header(path)
    axes = nibabel.io_orientation(image.affine)[:, 0]
    axial = next((axis for axis, target in enumerate(axes) if target == 2), 2)
    in_plane = [int(image.shape[axis]) for axis in range(3) if axis != axial]
    if min(in_plane) < MIN_SIDE:
        raise InputError(
            f"axial slices of {in_plane[0]} x {in_plane[1]} pixels are too small (at least {MIN_SIDE} x {MIN_SIDE})"
        )
    return int(image.shape[axial])


@functools.lru_cache(maxsize=1)
def nifti_volume(path: str, modified: float) -> np.ndarray:
    """The whole RAS volume in HU, kept for the next slices of the same file (one per process)."""
    import nibabel

    image = _nifti_header(Path(path))
    try:
        volume = np.asarray(nibabel.as_closest_canonical(image).get_fdata(dtype=np.float32))
    except Exception as error:  # truncated or corrupt data blocks
        raise InputError(f"NIfTI pixel data cannot be read ({type(error).__name__}: {error})") from error
    return volume.reshape(volume.shape[:3])


# --- both steps --------------------------------------------------------------------------------


def _index_file(path: Path) -> tuple[str, list[float], str]:
    """(series name, slice positions, warning) of one input, from its header."""
    if not path.is_file():
        raise InputError("file does not exist")
    if _is_nifti(path):
        return str(path), [float(k) for k in range(_nifti_depth(path))], ""
    if _is_rendered(path):
        return str(path), [0.0], ""
    ds = read_dicom_ct(path, header_only=True)
    series = str(ds.get("SeriesInstanceUID", "")) or f"{path.name} (no SeriesInstanceUID)"
    warning = ASSUMED_MONOCHROME2 if getattr(ds, "photometric_assumed", False) else ""
    return series, _frame_positions(ds, frame_count(ds)), warning


def index_inputs(paths: Iterable[str | Path]) -> tuple[list[dict], list[dict]]:
    """Slice items of every scorable input, grouped by series and sorted by position; ``{path, reason}`` for the rest.

    Only headers are read, so this is quick even for large folders.
    """
    by_series: dict[str, list[dict]] = {}
    errors: list[dict] = []
    for path in find_files(paths):
        try:
            series, positions, warning = _index_file(path)
        except Exception as error:  # one odd file never stops the others
            reason = str(error) if isinstance(error, InputError) else f"unreadable ({type(error).__name__}: {error})"
            logger.warning("not scored: %s: %s", path, reason)
            add_error(errors, str(path), reason)
            continue
        by_series.setdefault(series, []).extend(
            {
                "image": str(path),
                "frame": frame,
                "series": series,
                "position": position,
                "error": "",
                "warning": warning,
            }
            for frame, position in enumerate(positions)
        )
    items = [item for group in by_series.values() for item in sorted(group, key=lambda item: item["position"])]
    return items, errors


def _finite_2d(pixels: np.ndarray, where: str = "") -> np.ndarray:
    """The pixels if they are one finite 2-D slice; ``where`` names the slice of a multi-slice file."""
    if pixels.ndim != 2:
        raise InputError(f"{where}pixel data has shape {pixels.shape}, not a 2-D slice (wrong dimensionality)")
    if not np.isfinite(pixels).all():
        raise InputError(f"{where}pixel data contains NaN or Inf")
    return pixels


def read_scored_slice(
    path: str | Path, frame: int = 0, window: Sequence[float] = HU_WINDOW, channels: int = 1
) -> np.ndarray:
    """One slice as the network sees it before resizing: (channels, H, W) float32 in [0, 1].

    CT (DICOM, NIfTI) goes from HU through ``window``; TIFF/PNG are taken as rendered.
    Raises ``InputError`` with the reason when the pixels cannot be used.
    """
    path = Path(path)
    low, high = (float(value) for value in window)
    if _is_rendered(path):
        try:
            return to_channels(read_slice(path), channels)
        except ImageReadError as error:
            raise InputError(error.reason) from error
    if _is_nifti(path):
        volume = nifti_volume(str(path), path.stat().st_mtime)
        if not 0 <= frame < volume.shape[2]:
            raise InputError(f"slice {frame} is outside the volume's {volume.shape[2]} slices")
        hu = np.ascontiguousarray(volume[:, :, frame].T[::-1])
        where = f"slice {frame}: "
    else:
        ds = read_dicom_ct(path)
        try:
            hu = frame_hu(ds, frame)
        except Exception as error:  # decoders raise many types for truncated or unsupported data
            raise InputError(f"pixel data cannot be decoded ({type(error).__name__}: {error})") from error
        where = f"frame {frame}: " if frame_count(ds) > 1 else ""
    return to_channels(window_hu(_finite_2d(hu, where), low, high).astype(np.float32), channels)


class LoadCTSliced(MapTransform):
    """Replace each key's path with the slice ``frame`` of that file as a channel-first ``MetaTensor``.

    With ``error_key`` set, a slice that cannot be read becomes a small zero placeholder and its
    reason goes to ``data[error_key]`` (items already carrying an error are passed through the
    same way), so a DataLoader batch survives one bad file; without it, ``InputError`` is raised.
    """

    def __init__(
        self,
        keys: KeysCollection,
        window: Sequence[float] = HU_WINDOW,
        channels: int = 1,
        frame_key: str = "frame",
        error_key: str | None = "error",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.window = check_window(window)
        self.channels = channels
        self.frame_key = frame_key
        self.error_key = error_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        frame = int(d.get(self.frame_key, 0))
        for key in self.key_iterator(d):
            path = str(d[key])
            error = d.get(self.error_key, "") if self.error_key else ""
            pixels = None
            if not error:
                try:
                    pixels = read_scored_slice(path, frame, self.window, self.channels)
                except Exception as caught:  # one odd file never stops the batch
                    if self.error_key is None:
                        raise InputError(f"{path}: {caught}") from caught
                    error = str(caught) if isinstance(caught, InputError) else f"{type(caught).__name__}: {caught}"
                    logger.warning("not scored: %s [slice %d]: %s", path, frame, error)
            if pixels is None:
                pixels = np.zeros((self.channels, PLACEHOLDER_SIZE, PLACEHOLDER_SIZE), dtype=np.float32)
            d[key] = MetaTensor(torch.from_numpy(pixels), meta={"filename_or_obj": path})
            if self.error_key:
                d[self.error_key] = error
        return d


def inference_items(dataset_dir: str | Path) -> list[dict]:
    """Slice items for the bundle's inference config: every input under ``dataset_dir``.

    Inputs that cannot be scored come along as items with their ``error`` set, so the
    prediction writer lists them in ``errors.json`` next to the scores of the others.
    """
    root = Path(dataset_dir)
    if not root.exists():
        raise DatasetError([(str(root), "folder does not exist")])
    items, errors = index_inputs([root])
    if not items:
        problems = [(error["path"], error["reason"]) for error in errors]
        raise DatasetError([(str(root), "no scorable CT or slice files found"), *problems])
    failed = [
        {"image": e["path"], "frame": 0, "series": "", "position": 0.0, "error": e["reason"], "warning": ""}
        for e in errors
    ]
    return items + failed
