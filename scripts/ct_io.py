"""CT pixels in Hounsfield units, and the window that brings them to the LDCTIQA scale.

LDCTIQA's slices are CT windowed to [-1000, 400] HU and scaled to [0, 1]; a model trained on them
must see raw CT (DICOM, NIfTI) the same way. DICOM frames go to HU with their rescale slope and
intercept or Modality LUT (pydicom's ``apply_modality_lut``), read from the dataset itself or, for
enhanced (multi-frame) CT, from its functional groups.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from scripts.decoders import check_codestream, decoding_options, native_frame

HU_WINDOW = (-1000.0, 400.0)

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


def window_hu(hu: ArrayT, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]) -> ArrayT:
    """The LDCTIQA display window: HU in [low, high] -> [0, 1], clipped (works on arrays and tensors)."""
    scaled = (hu - low) / (high - low)
    return scaled.clamp(0.0, 1.0) if isinstance(scaled, torch.Tensor) else np.clip(scaled, 0.0, 1.0)


def _frame_transformation(ds: Any, frame: int = 0) -> Any:
    """The dataset (or functional-group item) that maps one frame's stored values to HU, or None.

    The top level's Modality LUT Sequence or Rescale Slope/Intercept first, else the frame's or the
    shared functional groups' Pixel Value Transformation (enhanced CT).
    """
    if "ModalityLUTSequence" in ds or ("RescaleSlope" in ds and "RescaleIntercept" in ds):
        return ds
    groups = [*ds.get("PerFrameFunctionalGroupsSequence", [])[frame : frame + 1]]
    groups += ds.get("SharedFunctionalGroupsSequence", [])[:1]
    for group in groups:
        if "PixelValueTransformationSequence" in group:
            return group.PixelValueTransformationSequence[0]
    return None


def stored_values_are_hu(ds: Any) -> bool:
    """Whether integer CT pixels with no way to HU (neither RescaleSlope nor RescaleIntercept, no Modality LUT or
    Pixel Value Transformation) are read as HU themselves: only signed ones, as scanners that store HU directly write
    them (unsigned CT keeps an offset, usually +1024, that only the missing intercept would say)."""
    no_rescale = "RescaleSlope" not in ds and "RescaleIntercept" not in ds
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    return "PixelData" in ds and _frame_transformation(ds) is None and no_rescale and signed


def check_hu_mapping(ds: Any) -> None:
    """``ValueError`` unless integer CT pixels have a way to HU (rescale or Modality LUT, or signed stored values, see
    ``stored_values_are_hu``); float pixel data is HU."""
    if "PixelData" in ds and _frame_transformation(ds) is None and not stored_values_are_hu(ds):
        kind = "signed" if int(ds.get("PixelRepresentation", 0) or 0) == 1 else "unsigned"
        reason = f"no RescaleIntercept/RescaleSlope or Modality LUT for its {kind} values"
        raise ValueError(f"{reason}: the HU of this CT cannot be known")


def shared_rescale(ds: Any) -> tuple[int, int] | None:
    """The ``integer_rescale`` every frame of ``ds`` goes through: its top level's Rescale Slope/Intercept; None for
    any other mapping to HU (a Modality LUT, a per-frame or fractional rescale, none)."""
    transformation = _frame_transformation(ds)
    return integer_rescale(transformation) if transformation is ds else None


def frame_count(ds: Any) -> int:
    """How many frames a dataset's pixel data holds (1 for a classic slice)."""
    return int(ds.get("NumberOfFrames", 1) or 1)


def frame_hu(ds: Any, index: int = 0, compact: bool = False) -> np.ndarray:
    """One frame of a CT dataset in HU as float32; only that frame is decoded (enhanced CT holds several).

    With ``compact``, HU that are whole numbers within int16 by construction (the usual integer rescale) come as
    int16, the same values in half the bytes: what reader processes pass on and copy to the GPU.
    """
    from pydicom.pixels import apply_modality_lut

    pixels = _frame_pixels(ds, index)
    transformation = _frame_transformation(ds, index)
    if transformation is None:
        check_hu_mapping(ds)
        return pixels.astype(np.float32, copy=False)  # float pixel data holds the values themselves
    rescale = integer_rescale(transformation)
    if rescale is not None and pixels.dtype.kind in "iu" and pixels.dtype.itemsize <= 2:
        return rescaled_hu(pixels, *rescale, compact)
    return apply_modality_lut(pixels, transformation).astype(np.float32, copy=False)


def rescaled_hu(pixels: np.ndarray, slope: int, intercept: int, compact: bool = False) -> np.ndarray:
    """8- or 16-bit integer stored values through an ``integer_rescale``, in int32: every value is exact, and exact
    in float32 too, so it equals pydicom's float64 result. float32, or with ``compact`` int16 where every value fits
    (``frame_hu``)."""
    hu = pixels.astype(np.int32)
    if slope != 1:
        hu *= slope
    if intercept:
        hu += intercept
    info = np.iinfo(np.int16)
    fits = compact and hu.size > 0 and info.min <= hu.min() and hu.max() <= info.max
    return hu.astype(np.int16 if fits else np.float32)


def _frame_pixels(ds: Any, index: int) -> np.ndarray:
    """One frame's stored values: the usual uncompressed 16-bit frame straight from its bytes, others decoded by
    pydicom, compressed frames through imagecodecs where it is faster (``scripts.decoders``), falling back to
    pydicom's own decoders where that plugin fails."""
    from pydicom.pixels import pixel_array

    native = native_frame(ds, index)
    if native is not None:
        return native
    check_codestream(ds, index)
    options = decoding_options(ds)
    if options:
        try:
            return pixel_array(ds, index=index, **options)
        except Exception:  # left to pydicom's own decoders, which raise the reason if they fail too
            pass
    return pixel_array(ds, index=index) if frame_count(ds) > 1 else ds.pixel_array


def integer_rescale(transformation: Any) -> tuple[int, int] | None:
    """(slope, intercept) of the usual CT rescale, whole numbers and no Modality LUT, which ``rescaled_hu`` applies
    exactly to integer stored values; None for anything else (pydicom applies it)."""
    if "ModalityLUTSequence" in transformation or "RescaleSlope" not in transformation:
        return None
    try:
        slope, intercept = float(transformation.RescaleSlope), float(transformation.RescaleIntercept)
    except (AttributeError, TypeError, ValueError):  # malformed: pydicom says what is wrong
        return None
    if not (slope.is_integer() and intercept.is_integer() and abs(slope) <= 128 and abs(intercept) <= 2**23):
        return None  # beyond these a float32 sum could round where float64 does not
    return int(slope), int(intercept)


def frames_hu(ds: Any) -> list[np.ndarray]:
    """Every frame of a CT dataset, in HU (one for a classic slice, several for enhanced CT)."""
    return [frame_hu(ds, index) for index in range(frame_count(ds))]


def write_dicom_slice(
    path: str | Path,
    hu: np.ndarray | None,
    series_uid: str,
    position: float = 0.0,
    modality: str = "CT",
    floats: bool = False,
) -> Path:
    """Write one slice as a scanner would: uint16 pixels with a rescale to HU (or float32 HU with ``floats``).

    ``hu=None`` writes an object without pixel data. Used by the benchmark's test series and by the tests.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, RTStructureSetStorage, generate_uid

    sop_class = {"CT": CTImageStorage, "MR": MRImageStorage, "RTSTRUCT": RTStructureSetStorage}[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, "1.2.3"
    if hu is not None:
        ds.Rows, ds.Columns = hu.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.ImagePositionPatient = [0.0, 0.0, float(position)]
        if floats:
            ds.BitsAllocated = 32
            ds.FloatPixelData = hu.astype(np.float32).tobytes()
        else:
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
            ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
            ds.PixelData = np.clip(np.rint(hu + 1024), 0, 65535).astype(np.uint16).tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def compress_dicom(source: str | Path, syntax: str, target: str | Path | None = None) -> Path:
    """A one-frame monochrome DICOM file re-encoded losslessly in ``syntax``, at ``target`` (default: in place): RLE
    and JPEG 2000 by pydicom; JPEG lossless (SV1), JPEG-LS and HTJ2K by imagecodecs, which pydicom cannot encode,
    from the stored bits as DICOM encoders write them. Used by the benchmark's series and by the tests."""
    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID, HTJ2KLossless, JPEGLosslessSV1, JPEGLSLossless

    encoders: dict[str, Callable[[np.ndarray], bytes | bytearray]] = {
        JPEGLosslessSV1: lambda bits: imagecodecs.jpeg8_encode(bits, lossless=True, predictor=1, bitspersample=16),
        JPEGLSLossless: imagecodecs.jpegls_encode,
        HTJ2KLossless: lambda bits: imagecodecs.htj2k_encode(bits),  # looked up when used: older versions lack it
    }
    ds = pydicom.dcmread(source)
    if syntax in encoders:
        if ds.BitsAllocated != 16 or ds.SamplesPerPixel != 1:
            raise ValueError(f"{source}: only one-sample 16-bit pixel data is re-encoded by imagecodecs")
        stored = ds.pixel_array.view(np.uint16)  # the 16 stored bits, signed values as their two's complement
        ds.PixelData = encapsulate([bytes(encoders[syntax](stored))])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        ds.file_meta.TransferSyntaxUID = UID(syntax)
    else:
        ds.compress(syntax)
    path = Path(target if target is not None else source)
    ds.save_as(path, enforce_file_format=True)
    return path
