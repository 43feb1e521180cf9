"""Real CT inputs to score: DICOM files and folders, NIfTI, NRRD and MetaImage volumes and rendered TIFF/PNG slices.

Scoring runs in two steps so that reading can overlap with the network (DataLoader workers):

1. ``index_inputs`` reads headers only. DICOM files (no preamble or file meta needed) are
   grouped into series by SeriesInstanceUID (by folder and shared attributes where it was removed;
   split by slice size and orientation; copies with the
   same SOPInstanceUID and pixels reported once, other images under a reused UID split by folder)
   and sorted along the slice normal; enhanced (multi-frame) CT gives one item per frame; a NIfTI,
   NRRD or MetaImage volume gives one item per axial slice (after reorienting to RAS); a TIFF/PNG file is one
   already-rendered slice. Each item is
   ``{"image": path, "frame": k, "series": name, "position": z, "error": "", "warning": ""}`` (``warning``:
   what was assumed to read it, e.g. a missing PhotometricInterpretation, or that it is a thumbnail), and for an
   uncompressed DICOM slice ``stored_pixels``: where its pixels lie in the file. Inputs that cannot
   be scored (other modalities, no pixel data, unreadable, wrong dimensionality, a declared size that
   the file cannot hold or over the caps ``scripts.transforms.MAX_SLICE_MB`` per slice and
   ``MAX_VOLUME_MB`` per NIfTI volume) are listed as ``{path, reason}`` instead.
2. ``LoadCTSliced`` reads one item's pixels (from ``stored_pixels`` where the file is unchanged, without parsing
   its header again): CT to HU (rescale slope and intercept, Modality LUT), which
   ``scripts.transforms.WindowHUd`` (the config's ``window``) then brings to [0, 1]. Problems only found in
   the pixels (truncated or undecodable data, NaN/Inf, a NIfTI/NRRD/MetaImage volume whose values are not CT in HU:
   ``not_hu_reason``) are recorded in the item's ``error`` instead of stopping the batch.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import functools
import gzip
import hashlib
import io
import itertools
import logging
import math
import multiprocessing
import os
import re
import stat
import warnings
import zlib
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from scripts.ct_io import (
    HU_WINDOW,
    check_hu_mapping,
    frame_count,
    frame_hu,
    rescaled_hu,
    shared_rescale,
    stored_values_are_hu,
)
from scripts.decoders import native_layout, unpack_native
from scripts.metaimage import MetaImageHeader
from scripts.metaimage import data_files as metaimage_data_files
from scripts.metaimage import read_header as read_metaimage_header
from scripts.options import as_bool, check_windows, optional_intercept
from scripts.output_dir import COMPARE_ENTRIES, LOCK_NAME, REPORT_ENTRIES, TEMP_PREFIX
from scripts.transforms import (
    SLICE_SUFFIXES,
    DeclaredSizeError,
    ImageReadError,
    check_image_header,
    check_slice_size,
    format_mib,
    read_slice,
    to_channels,
    window_channels,
)

logger = logging.getLogger(__name__)

METAIMAGE_SUFFIXES = (".mha", ".mhd")  # ITK's MetaImage: one file, or a header naming its data file
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", *METAIMAGE_SUFFIXES)  # NIfTI, NRRD (3D Slicer's default), MetaImage
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
HEADER_DEFER_SIZE = 4096  # bytes: larger values (the pixels) are left in the file while indexing
PLACEHOLDER_SIZE = 8
MIN_SIDE = 8  # pixels: smaller "slices" are not images a radiologist could score
MIN_SCAN_SIDE = 64  # pixels across the longer side: smaller slices are thumbnails, scored with a warning
STORED_PIXELS = "stored_pixels"  # item key: where an uncompressed slice's pixels lie in its file (``stored_pixels``)
ASSUMED_MONOCHROME2 = "no PhotometricInterpretation: read as MONOCHROME2"
ASSUMED_CT = "no Modality: read as CT by its SOP class"
ASSUMED_HU = "no RescaleSlope/RescaleIntercept: its signed stored values read as HU"
CT_SOP_CLASSES = {  # CT Image, Enhanced CT Image and Legacy Converted Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.2.1",
    "1.2.840.10008.5.1.4.1.1.2.2",
}
SECONDARY_CAPTURE_SOP_CLASSES = {  # Secondary Capture Image Storage and its four multi-frame kinds
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
}
SCREEN_IMAGE_TYPES = {  # ImageType values scanners give the pages they save beside a series (dose, protocol)
    "SCREEN SAVE",
    "DOSE_INFO",
    "DOSE INFO",
    "DOSE REPORT",
    "CSA REPORT",
}
SERIES_ATTRIBUTES = (  # what the slices of one series share: they group a folder's files without SeriesInstanceUID
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "SeriesNumber",
    "SeriesDescription",
    "ConvolutionKernel",
    "SliceThickness",
)
ACQUISITION_KEYWORDS = (  # what summary.json reports of a series, from its first slice's header
    "Manufacturer",
    "ManufacturerModelName",
    "SeriesDescription",
    "ConvolutionKernel",
    "KVP",
    "XRayTubeCurrent",
    "Exposure",
    "CTDIvol",
    "SliceThickness",
    "ReconstructionDiameter",
)
GZIP_MAGIC = b"\x1f\x8b"
NRRD_PACKED = ("gzip", "gz", "bzip2", "bz2")  # NRRD data encodings inflated by ``_nrrd_read``
NRRD_MAX_ITEMSIZE = 8  # bytes a voxel of NRRD's widest types (double, 64-bit integers)
DEFLATED_UID = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian, as written in the file meta
DICOM_HEAD = 512  # bytes read to tell gzip and the deflated transfer syntax: the preamble and the file meta's start
NIFTI2_HEADER = 540  # bytes of a NIfTI-2 header (NIfTI-1: 348)
MAX_NIFTI_OFFSET_MB = 64.0  # MiB of header and extensions a NIfTI file may hold before its voxels
INFLATE_PIECE = 2**20  # bytes of compressed data read at a time by ``_inflated``
META_START = 144  # where the file meta's elements start after its group length: preamble, DICM, (0002,0000) UL 4
MAX_VOLUME_MB = 2048.0  # MiB per NIfTI volume as float32 (read whole, one per reading process)
AIR_HU = -500.0  # at or below: air (about -1000 HU), which a CT volume holds around the body, in lungs and bowel
MIN_AIR_SHARE = 0.01  # of a volume's voxels: CT volumes hold 15-40 %, MR at most a few interpolation ripples
ONLY_HU = "only CT in HU is scored"
MAX_LABEL = 255  # a volume of whole values from 0 to at most this is a label map (segmentation)
MAX_CLASSES = 128  # ... of at most this many values (TotalSegmentator has 118); more: an 8-bit grey-level image
PARALLEL_INDEX_FILES = 256  # fewer files: reading their headers here costs less than starting processes
INDEX_CHUNK = 16  # headers per task of an indexing process: the first ones come back within milliseconds
FILE_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}


class InputError(ValueError):
    """An input that cannot be scored, with the reason."""


class ErrorList(list):
    """``{path, reason}`` for each input not scored, each pair once (a volume's slices share one reason), in the
    order first met. ``add`` looks pairs up in a set: an archive of a million MR files is listed in seconds, where
    searching the list for each took hours. Serialises as a plain list (JSON, pickle)."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def add(self, path: str | Path, reason: str) -> None:
        key = (str(path), reason)
        if key not in self._seen:
            self._seen.add(key)
            self.append({"path": key[0], "reason": reason})


def _unreachable(path: Path, error: OSError) -> str:
    """Why ``path`` cannot be followed (``stat``) or listed."""
    if error.errno == errno.ELOOP:
        return "symbolic link loop: the link leads back to itself"
    if isinstance(error, FileNotFoundError | NotADirectoryError):
        return "broken link: its target does not exist" if path.is_symlink() else "does not exist"
    if isinstance(error, PermissionError):
        return "permission denied: cannot be read"
    return f"cannot be read ({error.strerror or error})"


def find_files(paths: Iterable[str | Path], skip: str | Path | None = None) -> tuple[list[Path], ErrorList]:
    """The files named and every file under the folders named, in a stable order; ``{path, reason}`` for the rest.

    Links are followed; a real file or folder reached a second time (overlapping inputs, links) is taken once,
    the second path skipped without an error. Link loops, broken links, FIFOs, sockets and devices, unreadable
    folders and files are errors. ``skip`` (the output folder) is never read: below an input it is left out
    (logged); named as an input itself, only its report and lock are left out, as in any folder holding a run's lock
    or a ``scores.csv`` beside a ``summary.json`` (an earlier report of ``score`` or ``compare``, perhaps copied
    without its lock: its plots are not CT slices).
    """
    files: list[Path] = []
    errors = ErrorList()
    seen: dict[tuple[int, int], Path] = {}
    voxel_files: set[tuple[int, int]] = set()  # the data files of the MetaImage headers met: read with them
    skip_info = os.stat(skip) if skip is not None and os.path.isdir(skip) else None
    skip_key = (skip_info.st_dev, skip_info.st_ino) if skip_info else None

    def visit(path: Path, ancestors: dict[tuple[int, int], Path]) -> None:
        try:
            info = path.stat()
        except OSError as error:
            errors.add(str(path), _unreachable(path, error))
            return
        key = (info.st_dev, info.st_ino)
        if key in ancestors:
            errors.add(str(path), f"symbolic link loop: leads back to {ancestors[key]}")
            return
        if key in seen:
            logger.info("already read as %s: %s", seen[key], path)
            return
        if stat.S_ISREG(info.st_mode):
            if key in voxel_files:
                logger.debug("read with its MetaImage header: %s", path)
                return
            seen[key] = path
            if os.access(path, os.R_OK):
                files.append(path)
            else:
                errors.add(str(path), "permission denied: the file cannot be read")
            return
        if not stat.S_ISDIR(info.st_mode):
            kind = FILE_KINDS.get(stat.S_IFMT(info.st_mode), "not a file or folder")
            errors.add(str(path), f"not a regular file ({kind})")
            return
        if key == skip_key and ancestors:
            logger.warning("not read as input: %s is the output folder", path)
            return
        seen[key] = path
        try:
            names = sorted(entry.name for entry in os.scandir(path))
        except OSError as error:
            errors.add(str(path), f"folder: {_unreachable(path, error)}")
            return
        earlier_report = LOCK_NAME in names or {"scores.csv", "summary.json"} <= set(names)
        if key == skip_key or earlier_report:  # the output folder named as an input, or an earlier report
            outputs = (*REPORT_ENTRIES, *COMPARE_ENTRIES, LOCK_NAME)
            left_out = [n for n in names if n in outputs or n.startswith(TEMP_PREFIX)]
            logger.info("not read as input: the report in %s (%s)", path, ", ".join(left_out))
            names = [n for n in names if n not in left_out]
        _add_voxel_files(voxel_files, [path / n for n in names if n.lower().endswith(".mhd")])
        inside = {**ancestors, key: path}
        for name in names:
            visit(path / name, inside)

    for path in map(Path, paths):
        visit(path, {})
    # logged as each file that cannot be read is: a mistyped path is said at once, not only in summary.json
    for error in errors:
        logger.warning("not scored: %s: %s", error["path"], error["reason"])
    return files, errors


def _add_voxel_files(voxel_files: set[tuple[int, int]], headers: list[Path]) -> None:
    """Adds the data files the MetaImage ``headers`` name (as (device, inode)): they are read with their headers, in
    this folder or below it, not as inputs of their own."""
    found = []
    for data_file in itertools.chain.from_iterable(map(metaimage_data_files, headers)):
        with contextlib.suppress(OSError):
            info = data_file.stat()
            voxel_files.add((info.st_dev, info.st_ino))
            found.append(data_file.name)
    if found:
        more = f" and {len(found) - 3:,} more" if len(found) > 3 else ""
        logger.info("read with their MetaImage headers: %s%s", ", ".join(found[:3]), more)


def _is_volume(path: Path) -> bool:
    return path.name.lower().endswith(VOLUME_SUFFIXES)


def is_slice_image(path: str | Path) -> bool:
    """Whether ``path`` is a TIFF/PNG/JPEG/BMP slice image (by its suffix), not DICOM or a volume."""
    return Path(path).suffix.lower() in SLICE_SUFFIXES


# --- DICOM -------------------------------------------------------------------------------------


def _archive_kind(path: Path) -> str | None:
    """The kind of archive the file is, gzip-compressed or not (ZIP, tar, 7-Zip, RAR: by its magic bytes), or None."""
    with open(path, "rb") as stream:
        head = stream.read(262)
    if head.startswith(GZIP_MAGIC):
        try:
            with gzip.open(path, "rb") as stream:
                head = stream.read(262)
        except (OSError, EOFError, zlib.error):
            return None
    kinds = {b"PK\x03\x04": "ZIP", b"7z\xbc\xaf\x27\x1c": "7-Zip", b"Rar!\x1a\x07": "RAR"}
    kind = next((name for magic, name in kinds.items() if head.startswith(magic)), None)
    return kind or ("tar" if head[257:262] == b"ustar" else None)


def _not_dicom(path: Path) -> str:
    """Why a file with no DICOM elements is not scored, with what would be."""
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes)"
    archive = _archive_kind(path)
    if archive:
        return f"a {archive} archive: unpack it and score the folder it gives"
    reason = "not a DICOM file (no DICOM elements found)"
    if path.suffix.lower() in (".hdr", ".img"):
        return f"{reason}: an Analyze or NIfTI pair (.hdr/.img) is not read; save it as .nii or .nii.gz"
    if path.suffix.lower() in (".raw", ".zraw"):
        return f"{reason}: voxels without their header; give the MetaImage header (.mhd) that names this file"
    slices = ", ".join(SLICE_SUFFIXES)
    return (
        f"{reason}; the inputs scored are DICOM, NIfTI (.nii, .nii.gz), NRRD (.nrrd), MetaImage (.mha, .mhd) "
        f"and slices ({slices})"
    )


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


def _uid_or_file_meta(ds: Any, keyword: str) -> Any:
    """``keyword`` (SOPClassUID, SOPInstanceUID) of ``ds``, or where it is missing or empty (some anonymisers empty
    it) the file meta's copy, ``MediaStorage<keyword>``; None when neither has one."""
    return ds.get(keyword) or getattr(getattr(ds, "file_meta", None), f"MediaStorage{keyword}", None)


def _sop_name(uid: Any) -> str:
    """A SOP class UID's name where pydicom knows it (``Secondary Capture Image Storage``), else the UID."""
    from pydicom.uid import UID

    return UID(str(uid)).name or str(uid)


def _gunzipped(path: Path) -> io.BytesIO | None:
    """A gzip-compressed file's contents (e.g. ``slice.dcm.gz``, as some archives and test corpora keep DICOM), or
    None for any other file; ``InputError`` when they are corrupt or would exceed ``MAX_VOLUME_MB`` unpacked. A
    DICOM file in the Deflated transfer syntax is checked the same way (``_check_inflated_size``)."""
    with open(path, "rb") as stream:
        head = stream.read(DICOM_HEAD)
        if not head.startswith(GZIP_MAGIC):
            _check_inflated_size(stream, head)
            return None
    cap = int(MAX_VOLUME_MB * 2**20)
    try:
        with gzip.open(path, "rb") as stream:
            data = stream.read(cap + 1)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"gzip-compressed, but it cannot be unpacked ({type(error).__name__}: {error})") from error
    if len(data) > cap:
        raise InputError(f"gzip-compressed, and over {MAX_VOLUME_MB:g} MiB unpacked (MAX_VOLUME_MB)")
    return io.BytesIO(data)


def _check_inflated_size(stream: BinaryIO, head: bytes) -> None:
    """``InputError`` when a DICOM file in the Deflated Explicit VR transfer syntax (its UID among the first bytes of
    ``stream``, read into ``head``) inflates to more than ``MAX_VOLUME_MB``: pydicom inflates the whole data set in
    memory, so a file of 0.8 MB of deflated zeros took 800 MiB. Counted chunk by chunk, nothing kept; a file whose
    file meta cannot be measured this way is left to pydicom, which says what is wrong."""
    if DEFLATED_UID not in head or head[128:136] != b"DICM\x02\x00\x00\x00":
        return
    stream.seek(META_START + int.from_bytes(head[META_START - 4 : META_START], "little"))  # past the file meta
    try:
        within = _inflated(stream, zlib.decompressobj(-zlib.MAX_WBITS), int(MAX_VOLUME_MB * 2**20), keep=False)
    except zlib.error:
        return
    if within is None:
        raise InputError(
            f"deflated (transfer syntax Deflated Explicit VR), and over {MAX_VOLUME_MB:g} MiB inflated (MAX_VOLUME_MB)"
        )


def _inflated(stream: BinaryIO, inflater: Any, cap: int, keep: bool = True) -> bytearray | None:
    """What a zlib or bz2 ``inflater`` makes of the rest of ``stream`` (up to the end of its compressed stream), or
    None as soon as that passes ``cap`` bytes: read and inflated a piece at a time, so that data made to inflate
    a thousandfold never take more than the cap. Without ``keep``, only counted (the result is then empty)."""
    inflated, count, chunk = bytearray(), 0, stream.read(INFLATE_PIECE)
    while chunk and not inflater.eof:
        piece = inflater.decompress(chunk, min(cap + 1 - count, 16 * INFLATE_PIECE))
        count += len(piece)
        if count > cap:
            return None
        if keep:
            inflated += piece
        chunk = getattr(inflater, "unconsumed_tail", b"")  # what zlib has not read yet; bz2 keeps it inside
        if not chunk and getattr(inflater, "needs_input", True):
            chunk = stream.read(INFLATE_PIECE)
    return inflated


def read_dicom_ct(path: Path, header_only: bool = False) -> Any:
    """A CT DICOM dataset (pixels left in the file when ``header_only``); ``InputError`` for anything else.

    A gzip-compressed file is read unpacked, in memory (its pixels too, header only or not).
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    source = _gunzipped(path)
    defer_size = HEADER_DEFER_SIZE if header_only and source is None else None
    # held back until the file proves to be DICOM: reading another format as DICOM makes pydicom warn about what it
    # guessed (an ECAT .v file: "Expected implicit VR, but found explicit VR"), which says nothing to the user
    with warnings.catch_warnings(record=True) as read_warnings:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path if source is None else source, force=True, defer_size=defer_size)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as error:
            raise InputError(f"not a readable DICOM file ({type(error).__name__}: {error})") from error
    sop_class = _uid_or_file_meta(ds, "SOPClassUID")
    if len(ds) == 0 and len(getattr(ds, "file_meta", None) or ()):  # pydicom gives up on data that ends early
        raise InputError(
            f"truncated or damaged DICOM file ({path.stat().st_size:,} bytes): it has a file meta "
            "header, but its data set cannot be read to the end"
        )
    has_pixels = any(tag in ds for tag in PIXEL_TAGS)
    if not has_pixels and (len(ds) == 0 or (sop_class is None and "Modality" not in ds)):
        raise InputError(_not_dicom(path))
    for held in read_warnings:
        warnings.warn_explicit(held.message, held.category, held.filename, held.lineno)
    if not has_pixels:
        kind = ds.get("Modality", "") or ("CT" if str(sop_class) in CT_SOP_CLASSES else _sop_name(sop_class))
        if kind == "CT":  # a header-only export, or a test corpus's stand-in for an image
            raise InputError("no pixel data: a CT header without its image (the pixel data were left out of the file)")
        raise InputError(f"no pixel data (a {kind} object, not an image)")  # RTSTRUCT, SR; a DICOMDIR by its class
    modality = str(ds.get("Modality", "")).strip()
    if not modality and str(sop_class) in CT_SOP_CLASSES:  # Modality removed (by a de-identification tool, say)
        ds.modality_assumed = True
    elif not modality:
        kind = f" (a {_sop_name(sop_class)} object)" if sop_class else ""
        raise InputError(f"no Modality in the header{kind}; only CT is scored")
    elif modality != "CT":
        raise InputError(f"modality {modality} is not CT; only CT is scored")
    not_a_slice = _not_a_slice_reason(ds, sop_class)
    if not_a_slice:
        raise InputError(not_a_slice)
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
    check_dicom_size(ds, path)
    return ds


def _not_a_slice_reason(ds: Any, sop_class: Any) -> str | None:
    """Why a CT-labelled image is not a reconstructed cross-section, or None.

    A localizer (scout) is a projection: ImageType value 3 ``LOCALIZER``, as the CT IOD defines it. Scanners
    also save a dose report or a protocol page beside each series, labelled CT: an image whose ImageType says so
    (GE ``SCREEN SAVE``, Philips ``DOSE_INFO``, Siemens ``CSA REPORT``), or a Secondary Capture of 8-bit grey
    levels, which cannot hold CT numbers. A Secondary Capture of 12 or 16 bits with a rescale (a volume
    converted to DICOM by a research tool, say) is read as CT.
    """
    image_type = ds.get("ImageType") or []
    image_type = [str(value).strip().upper() for value in ([image_type] if isinstance(image_type, str) else image_type)]
    if len(image_type) > 2 and image_type[2] == "LOCALIZER":
        return "a localizer (scout) image, not a cross-sectional slice (ImageType LOCALIZER)"
    screen = next((value for value in image_type if value in SCREEN_IMAGE_TYPES), None)
    if screen:
        return f"a saved screen (ImageType {screen}: a dose report or protocol page), not a CT slice"
    if str(sop_class) in SECONDARY_CAPTURE_SOP_CLASSES:
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        levels = f"{bits}-bit grey levels" if samples == 1 else f"{bits}-bit colour ({samples} samples per pixel)"
        if bits <= 8 or samples != 1:
            return f"a Secondary Capture of {levels} (a saved screen, a dose report say), not CT numbers"
    return None


def _fragment_counts(element: Any, path: Path) -> tuple[int, int]:
    """(Basic Offset Table entries, fragments) of encapsulated pixel data, from its item headers only."""
    from pydicom.encaps import parse_basic_offsets, parse_fragments

    with open(path, "rb") if element.value is None else io.BytesIO(element.value) as buffer:
        if element.value is None:
            buffer.seek(element.value_tell)
        offsets = parse_basic_offsets(buffer)
        return len(offsets), parse_fragments(buffer)[0]


def check_dicom_size(ds: Any, path: Path) -> None:
    """``InputError`` when the declared frames and slice size cannot be in the file, or a slice is over the cap.

    Reads headers only: native pixel data must hold frames x rows x columns x bits; encapsulated (compressed)
    data needs a fragment per frame and an offset table, if any, with one entry per frame.
    """
    rows, columns, frames = int(ds.Rows), int(ds.Columns), frame_count(ds)
    declared = f"{frames:,} frame{'s' if frames != 1 else ''} of {rows} x {columns} pixels"
    if frames < 1:
        raise InputError(f"NumberOfFrames is {frames}: no frame to read")
    tag = next(tag for tag in PIXEL_TAGS if tag in ds)
    element = ds.get_item(tag, keep_deferred=True)
    undefined = getattr(element, "length", None) == 0xFFFFFFFF or getattr(element, "is_undefined_length", False)
    if tag == "PixelData" and undefined:  # encapsulated (compressed) frames, whatever the transfer syntax says
        try:
            offsets, fragments = _fragment_counts(element, path)
        except Exception as error:  # malformed item tags or lengths
            raise InputError(f"encapsulated pixel data cannot be parsed ({type(error).__name__}: {error})") from error
        if fragments < frames or offsets not in (0, frames):
            raise InputError(
                f"declares {declared}, but its compressed pixel data has {fragments:,} fragment(s) "
                f"and {offsets:,} offset table entry(s)"
            )
    else:
        bits = int(ds.get("BitsAllocated") or 1)
        need = -(-frames * rows * columns * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8)
        held = element.length if element.value is None else len(element.value)
        if held < need:
            raise InputError(f"declares {declared} at {bits} bits ({need:,} bytes), but {tag} holds {held:,} bytes")
    try:
        check_slice_size((rows, columns))
    except DeclaredSizeError as error:
        raise InputError(str(error)) from None


def _plane(group: Any, keyword: str) -> Any:
    """``keyword`` (ImagePositionPatient, ImageOrientationPatient) of a functional group's plane item, or None."""
    sequence = "PlanePositionSequence" if keyword == "ImagePositionPatient" else "PlaneOrientationSequence"
    items = group.get(sequence) if group is not None else None
    return items[0].get(keyword) if items else None


def _frame_orientation(ds: Any, frame: int, count: int) -> Any:
    """ImageOrientationPatient of one frame: its own functional group's, the shared one's, or the dataset's."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    group = per_frame[frame] if len(per_frame) == count else None
    shared = (ds.get("SharedFunctionalGroupsSequence") or [None])[0]
    orientation = _plane(group, "ImageOrientationPatient") or _plane(shared, "ImageOrientationPatient")
    return orientation or ds.get("ImageOrientationPatient")


def slice_normal(path: str | Path, frame: int = 0) -> np.ndarray | None:
    """The unit normal (DICOM's LPS) of a DICOM frame's plane, from its header: the cross product of
    ImageOrientationPatient's directions, along which positions run. None for volumes, rendered slices and
    headers without an orientation."""
    path = Path(path)
    if _is_volume(path) or is_slice_image(path):
        return None
    ds = read_dicom_ct(path, header_only=True)
    orientation = _frame_orientation(ds, frame, frame_count(ds))
    if not orientation or len(orientation) != 6:
        return None
    normal = np.cross([float(value) for value in orientation[:3]], [float(value) for value in orientation[3:]])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 0 else None


def _frame_geometry(ds: Any, count: int) -> list[dict]:
    """Per frame: ``position`` along the slice normal (cross product of ImageOrientationPatient's row and column
    directions; axial when missing), or InstanceNumber / frame index when no ImagePositionPatient is known, and the
    keys that order and split series (rounded orientation, size, InstanceNumber, SOPInstanceUID)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    instance = int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None
    sop = str(_uid_or_file_meta(ds, "SOPInstanceUID") or "")
    frames = []
    for frame in range(count):
        group = per_frame[frame] if len(per_frame) == count else None
        orientation = _frame_orientation(ds, frame, count)
        ipp = _plane(group, "ImagePositionPatient") or (ds.get("ImagePositionPatient") if count == 1 else None)
        cosines = [float(value) for value in orientation] if orientation else [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        if len(cosines) != 6:
            raise InputError(f"ImageOrientationPatient has {len(cosines)} values, not 6")
        normal = np.cross(cosines[:3], cosines[3:])
        position = sum(float(ipp[i]) * normal[i] for i in range(3)) if ipp else None  # IndexError: < 3 values
        fallback = instance if instance is not None and count == 1 else frame
        frames.append(
            {
                "position": float(fallback if position is None else position),
                "_known": position is not None,
                "_instance": instance,
                "_sop": sop,
                "_shape": (int(ds.Rows), int(ds.Columns)),
                "_orientation": tuple(round(value, 3) + 0.0 for value in cosines) if orientation else None,
            }
        )
    return frames


# --- NIfTI, NRRD and MetaImage volumes ------------------------------------------------------

# NRRD world spaces as the signs that bring them to RAS+ (NIfTI's); other spaces (scanner-xyz, ...) are taken as is
NRRD_SPACE_SIGNS = {
    "right-anterior-superior": (1.0, 1.0, 1.0),
    "ras": (1.0, 1.0, 1.0),
    "left-anterior-superior": (-1.0, 1.0, 1.0),
    "las": (-1.0, 1.0, 1.0),
    "left-posterior-superior": (-1.0, -1.0, 1.0),
    "lps": (-1.0, -1.0, 1.0),
}


def _nrrd_affine(header: Mapping[str, Any]) -> np.ndarray:
    """Voxel to RAS+ millimetres of a NRRD header: ``space directions`` (a row per axis, NaN for non-spatial axes)
    and ``space origin``, or ``spacings`` when it names no space."""
    affine = np.eye(4)
    directions = header.get("space directions")
    if directions is None:
        spacings = [float(value) for value in header.get("spacings", [])][:3]
        affine[range(len(spacings)), range(len(spacings))] = [v if math.isfinite(v) else 1.0 for v in spacings]
        return affine
    for axis, row in enumerate(np.asarray(directions, dtype=float)[:3]):
        if np.isfinite(row).all():
            affine[: len(row[:3]), axis] = row[:3]
    origin = np.asarray(header.get("space origin", []), dtype=float)[:3]
    affine[: len(origin), 3] = np.where(np.isfinite(origin), origin, 0.0)
    signs = NRRD_SPACE_SIGNS.get(str(header.get("space", "")).strip().lower(), (1.0, 1.0, 1.0))
    return np.diag([*signs, 1.0]) @ affine


def _nrrd_read(path: Path) -> tuple[np.ndarray, dict]:
    """``nrrd.read``, except that gzip or bzip2 data in the file are inflated here, at most as many bytes as the
    header's sizes can need (8 a voxel), then read by pynrrd as uncompressed data. pynrrd inflates all the data before
    it counts them: 1 MB of gzip zeros under a 64 x 64 x 4 header took 2 GiB and 5 s before it was refused."""
    import bz2

    import nrrd

    with open(path, "rb") as stream:
        header = nrrd.read_header(stream)
        encoding = header.get("encoding")
        if encoding not in NRRD_PACKED or header.get("datafile", header.get("data file")) is not None:
            return nrrd.read_data(header, stream, str(path)), header
        for _ in range(max(0, int(header.get("lineskip", header.get("line skip", 0))))):  # lines before the data
            stream.readline()
        skip = int(header.get("byteskip", header.get("byte skip", 0)))
        cap = int(np.prod(header["sizes"], dtype=np.int64)) * NRRD_MAX_ITEMSIZE + max(skip, 0)
        gzipped = encoding in ("gzip", "gz")
        inflated = _inflated(stream, zlib.decompressobj(zlib.MAX_WBITS | 16) if gzipped else bz2.BZ2Decompressor(), cap)
    if inflated is None:
        sizes = " x ".join(str(int(size)) for size in header["sizes"])
        raise InputError(f"its {encoding} data inflate to more than the {sizes} voxels its header declares")
    raw = {key: value for key, value in header.items() if key not in ("lineskip", "line skip")}
    return nrrd.read_data(raw | {"encoding": "raw"}, io.BytesIO(inflated), str(path)), header


def _lps_affine(directions: np.ndarray, spacing: Sequence[float], origin: Sequence[float]) -> np.ndarray:
    """Voxel to RAS+ millimetres of an image in LPS (DICOM's and ITK's world): ``directions`` (a column per axis),
    the voxel ``spacing`` and the first voxel's ``origin``, of up to 3 axes."""
    axes = min(len(spacing), 3)
    affine = np.eye(4)
    affine[:axes, :axes] = np.asarray(directions, dtype=float)[:axes, :axes] * np.asarray(spacing[:axes], dtype=float)
    affine[:axes, 3] = np.asarray(origin[:axes], dtype=float)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


def _metaimage_voxels(header: MetaImageHeader, path: Path) -> np.ndarray:
    """The voxels a MetaImage header declares, (x, y, z) as in NIfTI, from its own file or its data files in turn:
    compressed ones inflated up to the declared size only, uncompressed ones checked against their file's size."""
    data = bytearray()
    for source in header.data_files or (path,):
        with open(source, "rb") as stream:
            stream.seek(_metaimage_offset(header, source))
            if header.compressed:
                inflated = _inflated(stream, zlib.decompressobj(zlib.MAX_WBITS | 32), header.file_nbytes)  # zlib, gzip
                if inflated is None:
                    sides = " x ".join(map(str, header.shape))
                    share = f"their {header.file_nbytes:,} bytes of " if header.data_files[1:] else ""
                    raise InputError(
                        f"the compressed voxels of {source.name} inflate to more than {share}the {sides} its header "
                        "declares"
                    )
                part = bytes(inflated)
            else:
                part = stream.read(header.file_nbytes)
        _check_metaimage_bytes(header, source, len(part))
        data += part
    return np.frombuffer(data, header.dtype, math.prod(header.shape)).reshape(header.shape, order="F")


def _metaimage_offset(header: MetaImageHeader, source: Path) -> int:
    """Where the voxels start in ``source``: ``HeaderSize = -1`` puts them at its end."""
    return max(0, source.stat().st_size - header.file_nbytes) if header.data_offset < 0 else header.data_offset


def _check_metaimage_bytes(header: MetaImageHeader, source: Path, count: int) -> None:
    """``InputError`` when ``source`` holds fewer than the ``header.file_nbytes`` bytes of voxels it must."""
    if count < header.file_nbytes:
        shape = " x ".join(map(str, header.shape))
        share = f"its {header.file_nbytes:,} of the {shape}" if header.data_files[1:] else shape
        raise InputError(
            f"{source.name} holds {'an inflated ' if header.compressed else ''}{count:,} bytes of voxels, the header "
            f"declares {share} of {header.dtype.itemsize} bytes ({header.file_nbytes:,})"
        )


def _metaimage_image(path: Path, pixels: bool) -> Any:
    """A MetaImage file (``.mha``, or a ``.mhd`` header and the data file it names) as an in-memory NIfTI image in
    RAS+: its pixels with ``pixels``, else a stand-in of the declared shape that takes no memory."""
    import nibabel

    try:
        header = read_metaimage_header(path)
    except ValueError as error:
        raise InputError(str(error)) from None
    sources = header.data_files or (path,)
    missing = [source for source in sources if not source.is_file()]
    if missing:
        name = str(missing[0].relative_to(path.parent) if missing[0].is_relative_to(path.parent) else missing[0])
        if sources[1:]:
            raise InputError(
                f"{len(missing):,} of its {len(sources):,} data files (ElementDataFile) are not found, {name!r} first"
            )
        raise InputError(f"its data file {name!r} (ElementDataFile) is not found")
    if not header.compressed:  # checked from the header: the files must hold the voxels
        for source in sources:
            _check_metaimage_bytes(header, source, max(0, source.stat().st_size - _metaimage_offset(header, source)))
    if not pixels:
        data = np.broadcast_to(np.zeros((), np.float32), header.shape)
    else:
        data = _metaimage_voxels(header, path)
    return nibabel.Nifti1Image(data, _lps_affine(header.directions, header.spacing, header.origin))


def _nrrd_image(path: Path, pixels: bool) -> Any:
    """A NRRD file as an in-memory NIfTI image in RAS+: its pixels with ``pixels``, else a stand-in of the declared
    shape that takes no memory."""
    import nibabel
    import nrrd

    try:
        if pixels:
            data, header = _nrrd_read(path)  # Fortran index order: data[x, y, z], as in NIfTI
        else:
            header = nrrd.read_header(str(path))
            data = np.broadcast_to(np.zeros((), np.float32), tuple(int(side) for side in header["sizes"]))
    except InputError:
        raise
    except Exception as error:  # pynrrd raises several types for malformed headers and data
        raise InputError(f"not a readable NRRD volume ({type(error).__name__}: {error})") from error
    if data.dtype.kind not in "iuf":
        raise InputError(f"NRRD data of type {data.dtype} is not a grey-level volume")
    return nibabel.Nifti1Image(data, _nrrd_affine(header))


def _check_nifti_offset(path: Path) -> None:
    """``InputError`` when a NIfTI header puts its voxels more than ``MAX_NIFTI_OFFSET_MB`` into the file (vox_offset):
    nibabel reads every header extension before them into memory, so a .nii.gz of 261 KB whose extension held 256
    MiB of zeros took 269 MiB and 1.8 s before a voxel was read. Real extensions (a DICOM header, AFNI's) take KB."""
    try:
        with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb") as stream:
            head = stream.read(NIFTI2_HEADER)
    except (OSError, EOFError, zlib.error):
        return  # nibabel says what is wrong
    for order in "<>":
        size = int(np.frombuffer(head[:4], f"{order}i4")[0]) if len(head) >= 4 else 0
        if size == 348 and len(head) >= 112:  # NIfTI-1: vox_offset a float32 at byte 108
            offset = float(np.frombuffer(head[108:112], f"{order}f4")[0])
        elif size == NIFTI2_HEADER and len(head) >= 176:  # NIfTI-2: an int64 at byte 168
            offset = float(np.frombuffer(head[168:176], f"{order}i8")[0])
        else:
            continue
        if offset > MAX_NIFTI_OFFSET_MB * 2**20:
            raise InputError(
                f"its header puts the voxels {format_mib(offset)} MiB into the file (vox_offset: header extensions "
                f"before them), over the cap of {MAX_NIFTI_OFFSET_MB:g} MiB (MAX_NIFTI_OFFSET_MB)"
            )
        return


def _volume_image(path: Path, pixels: bool = False) -> Any:
    """The NIfTI, NRRD or MetaImage image as a 3-D volume (a 2-D image is one slice, trailing axes of length 1 are
    dropped), its declared size checked first; NIfTI pixels stay in the file until used, NRRD and MetaImage pixels
    are read with ``pixels``. ``InputError`` for anything else (a time series, CIFTI)."""
    import nibabel

    name = path.name.lower()
    in_memory = _nrrd_image if name.endswith(".nrrd") else None
    in_memory = _metaimage_image if name.endswith(METAIMAGE_SUFFIXES) else in_memory
    if in_memory is not None:
        image = in_memory(path, pixels=False)
    else:
        _check_nifti_offset(path)
        try:
            image = nibabel.load(str(path))
        except Exception as error:  # nibabel raises several types for corrupt or truncated headers
            raise InputError(f"not a readable NIfTI volume ({type(error).__name__}: {error})") from error
    if isinstance(image, nibabel.cifti2.Cifti2Image):
        raise InputError("a CIFTI-2 file (surface or connectivity data), not an image volume")
    if in_memory is None:
        _check_nifti_content(image)
    shape = tuple(int(side) for side in image.shape)
    while len(shape) > 3 and shape[-1] == 1:  # e.g. (x, y, z, 1) or (x, y, z, 1, 1): one volume
        shape = shape[:-1]
    shape = (*shape, 1) if len(shape) == 2 else shape  # one slice saved as a 2-D image
    if len(shape) != 3:
        raise InputError(f"expected a 3-D volume, got shape {tuple(image.shape)} (wrong dimensionality)")
    _check_volume_size(path, image, shape)
    if in_memory is not None and pixels:
        image = in_memory(path, pixels=True)
    if shape != image.shape:
        image = type(image)(image.dataobj.reshape(shape), image.affine, image.header)
    return image


def _check_nifti_content(image: Any) -> None:
    """``InputError`` when the NIfTI header says the volume is not grey levels (RGB, complex) or is a label map."""
    dtype = image.header.get_data_dtype()
    if dtype.kind not in "iuf":
        name = image.header.get_value_label("datatype")
        raise InputError(f"NIfTI data of type {name} is not a grey-level volume; {ONLY_HU}")
    if image.header.get_intent()[0] == "label":
        raise InputError(f"a label map (NIfTI intent 'label': a segmentation), not CT; {ONLY_HU}")


def not_hu_reason(volume: np.ndarray) -> str:
    """Why the values of a whole volume (NIfTI, NRRD, MetaImage) cannot be CT in HU, or ``""`` when they can: such a
    volume has no Modality to check, so a segmentation, an MR volume or already normalised data would otherwise be
    scored as CT."""
    step = 4 if min(volume.shape[:2]) >= 64 else 1  # every 16th voxel of a large slice tells CT's air: 1/16 the work
    sample = volume[::step, ::step]
    if np.count_nonzero(sample <= AIR_HU) >= MIN_AIR_SHARE * sample.size:
        return ""
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return ""  # every voxel NaN or Inf: each slice gives that reason
    air_share = float(np.count_nonzero(finite <= AIR_HU)) / finite.size
    if air_share >= MIN_AIR_SHARE:
        return ""
    lowest, highest = float(finite.min()), float(finite.max())
    if lowest == highest:
        return f"every voxel is {lowest:g}: an empty volume; {ONLY_HU}"
    if lowest >= 0 and highest <= MAX_LABEL and np.array_equal(finite, np.round(finite)):
        labels = int(np.count_nonzero(np.bincount(finite.astype(np.int64).ravel())))
        if labels > MAX_CLASSES:
            return (
                f"{labels} whole values from 0 to {highest:g}: an 8-bit grey-level image (MR, or CT already "
                f"windowed to grey levels), not HU; {ONLY_HU}"
            )
        return f"a label map (a segmentation: {labels} whole values from 0 to {highest:g}), not CT; {ONLY_HU}"
    if lowest >= 0 and highest <= 1:
        return (
            "values within [0, 1]: already windowed or normalised, not HU (save such slices as TIFF, which are "
            f"scored as rendered); {ONLY_HU}"
        )
    air = f"{air_share:.2%} of the voxels" if air_share else "no voxel"
    return (
        f"{air} at or below {AIR_HU:g} HU (lowest {lowest:g}): not CT in HU, which has air (about -1000 HU) around "
        f"the body and in lungs and bowel (an MR or PET volume, a crop inside the body, or CT saved without its "
        f"rescale intercept); {ONLY_HU}"
    )


def _check_volume_size(path: Path, image: Any, shape: tuple[int, ...]) -> None:
    """``InputError`` when an uncompressed NIfTI volume's declared voxels do not fit in its file, or (any volume: a
    compressed size says little) the volume as float32 exceeds ``MAX_VOLUME_MB`` (read at call time)."""
    declared = " x ".join(map(str, shape))
    if path.name.lower().endswith(".nii"):
        dtype = image.header.get_data_dtype()
        need = int(getattr(image.dataobj, "offset", 0)) + math.prod(shape) * dtype.itemsize
        if need > path.stat().st_size:
            raise InputError(
                f"declares a volume of {declared} {dtype} voxels ({need:,} bytes with the header), "
                f"but the file has {path.stat().st_size:,} bytes"
            )
    if math.prod(shape) * 4 > MAX_VOLUME_MB * 2**20:
        raise InputError(
            f"declared volume {declared} needs {format_mib(math.prod(shape) * 4)} MiB as float32, "
            f"over the cap of {MAX_VOLUME_MB:g} MiB per volume (MAX_VOLUME_MB)"
        )


def _volume_positions(path: Path) -> tuple[list[float], list[int]]:
    """Where each axial slice of the volume reoriented to RAS lies along the normal of its plane (mm, increasing
    towards the head, as a DICOM series' positions along the normal of ImageOrientationPatient [1, 0, 0, 0, 1, 0]),
    from the header alone (the slice index when the affine gives the planes no normal); and the slices' size."""
    import nibabel

    image = _volume_image(path)
    orientation = nibabel.io_orientation(image.affine)
    axes = orientation[:, 0]
    axial = next((axis for axis, target in enumerate(axes) if target == 2), 2)
    in_plane = [int(image.shape[axis]) for axis in range(3) if axis != axial]
    if min(in_plane) < MIN_SIDE:
        raise InputError(
            f"axial slices of {in_plane[0]} x {in_plane[1]} pixels are too small (at least {MIN_SIDE} x {MIN_SIDE})"
        )
    try:
        check_slice_size(in_plane)
    except DeclaredSizeError as error:
        raise InputError(str(error)) from None
    ras = image.affine @ nibabel.orientations.inv_ornt_aff(orientation, image.shape)
    normal = np.cross(ras[:3, 0], ras[:3, 1])  # of the slice plane: a sheared (gantry-tilted) volume steps aslant
    normal = normal * np.sign(normal @ ras[:3, 2])
    length = float(np.linalg.norm(normal))
    if not np.isfinite(length) or length == 0.0:  # also when the slice axis lies in the planes (sign 0)
        return [float(k) for k in range(int(image.shape[axial]))], in_plane
    normal /= length
    start, step = float(ras[:3, 3] @ normal), float(ras[:3, 2] @ normal)
    return [start + k * step for k in range(int(image.shape[axial]))], in_plane


def pixel_size_mm(path: str | Path, frame: int = 0) -> float | None:
    """The mean in-plane pixel size (mm) of a DICOM frame or of a volume's axial slices, from the header;
    None when it gives none."""
    import nibabel

    path = Path(path)
    if not _is_volume(path):
        return _dicom_pixel_mm(read_dicom_ct(path, header_only=True), frame)
    affine = _volume_image(path).affine
    axes = nibabel.io_orientation(affine)[:, 0]
    sizes = nibabel.affines.voxel_sizes(affine)
    return _mean_size([float(sizes[axis]) for axis, target in enumerate(axes) if target in (0, 1)])


def _dicom_pixel_mm(ds: Any, frame: int) -> float | None:
    """PixelSpacing's mean: the frame's, the shared functional groups' (enhanced CT), or the dataset's."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", [])
    groups = [
        per_frame[frame] if frame < len(per_frame) else None,
        (ds.get("SharedFunctionalGroupsSequence") or [None])[0],
    ]
    measures = [group.get("PixelMeasuresSequence") for group in groups if group is not None]
    spacing = next((items[0].get("PixelSpacing") for items in measures if items), None) or ds.get("PixelSpacing")
    return _mean_size([float(value) for value in spacing or []])


def _mean_size(sizes: list[float]) -> float | None:
    sizes = [size for size in sizes if math.isfinite(size) and size > 0]
    return float(np.mean(sizes)) if sizes else None


def _plain(value: Any) -> int | float | str:
    """A DICOM value as JSON writes it: IS as int, DS as float, anything else as its text on one line."""
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return " ".join(str(value).split())


def acquisition(path: str | Path, frame: int = 0) -> dict[str, Any]:
    """How a slice was acquired and reconstructed, as its header says: ``ACQUISITION_KEYWORDS`` that a DICOM file
    holds (numbers as numbers, several values as a list) and ``pixel_mm``; for a volume ``pixel_mm`` only,
    for a rendered slice nothing. Never raises: a file that cannot be read (any more) gives ``{}``."""
    path = Path(path)
    found: dict[str, Any] = {}
    try:
        if is_slice_image(path):
            return found
        if _is_volume(path):
            pixel_mm = pixel_size_mm(path, frame)
        else:
            ds = read_dicom_ct(path, header_only=True)
            for keyword in ACQUISITION_KEYWORDS:
                value = ds.get(keyword)
                values = [value] if isinstance(value, (str, int, float)) else list(value or [])
                values = [_plain(v) for v in values if str(v).strip()]
                if values:
                    found[keyword] = values[0] if len(values) == 1 else values
            pixel_mm = _dicom_pixel_mm(ds, frame)
    except Exception:  # the report never fails for a header: a vanished file, or one rewritten since it was scored
        return {}
    return {**found, "pixel_mm": pixel_mm} if pixel_mm is not None else found


def volume_hu(path: str, modified: float) -> np.ndarray:
    """The whole RAS volume in HU, kept for the next slices of the same file (one per process); ``InputError``
    when it cannot be read or is not CT in HU."""
    volume = read_volume(path, modified)
    if isinstance(volume, str):
        raise InputError(volume)
    return volume


@functools.lru_cache(maxsize=1)
def read_volume(path: str, modified: float) -> np.ndarray | str:
    """``volume_hu``'s volume, or the reason it cannot be scored: the reason is kept too, so the other slices
    of a refused volume do not read it again."""
    import nibabel

    try:
        image = _volume_image(Path(path), pixels=True)
        volume = np.asarray(nibabel.as_closest_canonical(image).get_fdata(dtype=np.float32))
    except InputError as error:
        return str(error)
    except Exception as error:  # truncated or corrupt data blocks
        return f"volume pixel data cannot be read ({type(error).__name__}: {error})"
    return not_hu_reason(volume) or volume


# --- both steps --------------------------------------------------------------------------------


def _index_file(path: Path) -> tuple[str, list[dict], str]:
    """(series name, per slice ``{"position": ...}`` and for DICOM the ordering keys of ``_frame_geometry``, warning)
    of one input, from its header; declared sizes are checked against the file and the caps before any pixel is read."""
    if not path.is_file():
        raise InputError("file does not exist")
    if _is_volume(path):
        positions, in_plane = _volume_positions(path)
        return str(path), [{"position": position} for position in positions], thumbnail_warning(*in_plane)
    if is_slice_image(path):
        try:
            rows, columns = check_image_header(path)
        except ImageReadError as error:
            raise InputError(error.reason) from None
        number = re.findall(r"[0-9]+", path.stem)  # 9.png before 10.png: slice images in their numbers' order
        image = {"position": 0.0, "_instance": int(number[-1]) if number else None, "_shape": (rows, columns)}
        folder = str(path.absolute().parent)  # a series of the folder's slice images; "." named where it is
        return folder, [{**image, "_rendered": True}], thumbnail_warning(rows, columns)
    ds = read_dicom_ct(path, header_only=True)
    frames = _frame_geometry(ds, frame_count(ds))
    stored = stored_pixels(ds, path)
    if stored is not None:
        for frame in frames:
            frame[STORED_PIXELS] = stored
    series = str(ds.get("SeriesInstanceUID", "")).strip()
    if not series:
        series = _series_without_uid(path, ds)
        for frame in frames:  # the series of its own it gets if its folder's files are not one series
            frame["_alone"] = f"{path.name} (no SeriesInstanceUID)"
    assumed = [ASSUMED_CT] if getattr(ds, "modality_assumed", False) else []
    assumed += [ASSUMED_MONOCHROME2] if getattr(ds, "photometric_assumed", False) else []
    assumed += [ASSUMED_HU] if stored_values_are_hu(ds) else []
    assumed += [thumbnail_warning(int(ds.Rows), int(ds.Columns))]
    return series, frames, "; ".join(filter(None, assumed))


def stored_pixels(ds: Any, path: Path) -> list[int] | None:
    """Where the uncompressed 16-bit pixels of a header read with them left in the file lie, and how they become HU,
    so that ``read_ct_slice`` takes a slice straight from its bytes instead of parsing the header a second time
    (which cost as long as everything else it does to a 512 x 512 slice): [offset, rows, columns, bits stored,
    signed, slope, intercept, and the file's size, modification time (ns) and inode]. None for pixels pydicom
    decodes (compressed, 8- or 32-bit, gzip-compressed files), another mapping to HU, or pixels read with the
    header (small slices)."""
    layout, rescale = native_layout(ds), shared_rescale(ds)
    if layout is None or rescale is None:
        return None
    element = ds.get_item("PixelData", keep_deferred=True)
    if getattr(element, "value", b"") is not None:  # read with the header, not left in the file
        return None
    rows, columns, frames, stored, signed = layout
    if getattr(element, "length", None) != 2 * rows * columns * frames:
        return None
    info = path.stat()
    return [int(element.value_tell), rows, columns, stored, signed, *rescale, *_file_identity(info)]


def _file_identity(info: os.stat_result) -> tuple[int, int, int]:
    return info.st_size, info.st_mtime_ns, info.st_ino


def _stored_hu(path: Path, frame: int, stored: list[int], compact: bool) -> np.ndarray | None:
    """The slice ``stored_pixels`` describes, in HU as ``frame_hu`` gives it; None when the file changed since it was
    indexed, or cannot be read (the full read says why)."""
    offset, rows, columns, bits, signed, slope, intercept, *identity = stored
    length = 2 * rows * columns
    try:
        if _file_identity(path.stat()) != tuple(identity):
            return None
        with open(path, "rb") as stream:
            stream.seek(offset + length * frame)
            data = stream.read(length)
    except OSError:
        return None
    if len(data) != length:
        return None
    return rescaled_hu(unpack_native(data, rows, columns, bits, signed), slope, intercept, compact)


def is_thumbnail(rows: int, columns: int) -> bool:
    """Whether a slice is under ``MIN_SCAN_SIDE`` pixels across its longer side: a test corpus's 16 x 16 stand-in,
    or an icon, rather than a scan."""
    return max(rows, columns) < MIN_SCAN_SIDE


def thumbnail_warning(rows: int, columns: int) -> str:
    """The warning a thumbnail (``is_thumbnail``) gets, "" for others: it is scaled up to the model's input and
    scored, but its score says little about a scan."""
    if not is_thumbnail(rows, columns):
        return ""
    return f"{rows} x {columns} px: a thumbnail, not a scan (under {MIN_SCAN_SIDE} px across), its score means little"


def _series_without_uid(path: Path, ds: Any) -> str:
    """The series of a DICOM file without SeriesInstanceUID (some anonymisers empty it): the files of one folder
    that agree on ``SERIES_ATTRIBUTES`` are one series, named after the folder and SeriesDescription with a digest
    of the folder's path and those values. ``order_series`` gives each file a series of its own again when two
    of them lie at the same position (two series that the removed UID told apart)."""
    shared = [str(path.parent)] + [str(ds.get(keyword, "")) for keyword in SERIES_ATTRIBUTES]
    digest = hashlib.sha1("\0".join(shared).encode(errors="surrogateescape")).hexdigest()[:8]
    description = str(ds.get("SeriesDescription", "")).strip()
    return f"{path.parent.name}{': ' + description if description else ''} (no SeriesInstanceUID, {digest})"


def _plane_name(orientation: tuple[float, ...] | None) -> str:
    """axial, coronal or sagittal by the slice normal's main axis (oblique when it is more than ~18 degrees off)."""
    normal = np.cross(orientation[:3], orientation[3:]) if orientation else np.array([0.0, 0.0, 1.0])
    axis = int(np.argmax(np.abs(normal)))
    return ("sagittal", "coronal", "axial")[axis] if abs(normal[axis]) > 0.95 else "oblique"


def _slice_order(item: dict) -> tuple:
    """Along the slice normal; ties and unknown positions by InstanceNumber, then file name and frame."""
    known, instance = item.get("_known", True), item.get("_instance")
    position = round(item["position"], 4) if known else 0.0
    return not known, position, instance is None, instance or 0, item["image"], item["frame"]


def _same_image(first: str, other: str) -> bool:
    """Whether two files that share a SOPInstanceUID hold the same image: the same bytes, or the same HU in every
    frame once decoded (a lossless re-encoding). A lossy copy, or another image under a reused UID (a simulated
    low-dose copy of a slice, say), is not the same; neither is a file that cannot be decoded."""
    if filecmp.cmp(first, other, shallow=False):
        return True
    try:
        datasets = [read_dicom_ct(Path(first)), read_dicom_ct(Path(other))]
        counts = {frame_count(ds) for ds in datasets}
        return len(counts) == 1 and all(
            np.array_equal(frame_hu(datasets[0], frame), frame_hu(datasets[1], frame)) for frame in range(counts.pop())
        )
    except Exception:  # an undecodable file is scored (and reported) on its own
        return False


def _add_warning(item: dict, warning: str) -> None:
    item["warning"] = "; ".join(filter(None, (item["warning"], warning)))


def _place_shared(items: list[dict], owner: Callable[[dict], str]) -> bool:
    """Whether two ``owner``s (folders, images) hold slices at the same known position and orientation."""
    owners: dict[tuple, str] = {}
    for item in items:
        if item.get("_known", False):
            place, this = (item.get("_orientation"), round(item["position"], 4)), owner(item)
            if owners.setdefault(place, this) != this:
                return True
    return False


def _folders_overlap(items: list[dict]) -> bool:
    """Whether two folders hold slices of one series at the same known position and orientation: two versions of
    it (full-dose and low-dose copies that kept the series UID), not one series spread over folders (a CD export)."""
    return _place_shared(items, lambda item: str(Path(item["image"]).parent))


def _split_unnamed(by_series: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """``by_series`` with each series grouped without a SeriesInstanceUID (``_series_without_uid``) whose images
    (SOPInstanceUIDs: copies of a file count once) share a position split into one series per file."""
    split: dict[str, list[dict]] = {}
    for series, group in by_series.items():
        if "_alone" in group[0] and _place_shared(group, lambda item: item.get("_sop") or item["image"]):
            for item in group:
                split.setdefault(item["_alone"], []).append(item)
        else:
            split[series] = group
    return split


def order_series(by_series: dict[str, list[dict]]) -> tuple[list[dict], list[dict]]:
    """Indexed items series by series, each sorted along its slice normal; ``{path, reason}`` for duplicates.

    A file whose SOPInstanceUID was seen in an earlier file is left out and reported when it is a copy (the same
    image, see ``_same_image``); another image under the same UID is scored with a warning, and its series split by
    folder (``<uid> (RxC <folder>)``: full-dose and low-dose folders of one series stay apart), as is a series whose
    folders hold slices at the same position (``_folders_overlap``). A series whose files
    differ in size or (rounded) orientation is split into one series per kind, named ``<uid> (RxC[ plane])``. The
    TIFF/PNG slices of a folder are one series (named by the folder; split by size as DICOM is), in the order of the
    last number in their names, then by name, at positions 0, 1, 2, ...
    """
    seen: dict[str, str] = {}
    same: dict[tuple[str, str], bool] = {}
    errors = ErrorList()
    items: list[dict] = []
    for series, group in _split_unnamed(by_series).items():
        kept: list[dict] = []
        reused = False  # a UID of this series names two different images
        for item in group:
            first = seen.setdefault(item.get("_sop") or item["image"], item["image"])
            if first != item["image"]:
                pair = (first, item["image"])
                if pair not in same:  # once per pair of files, not per frame
                    same[pair] = _same_image(*pair)
                if same[pair]:
                    errors.add(item["image"], f"duplicate of {first} (same SOPInstanceUID)")
                    continue
                _add_warning(item, f"same SOPInstanceUID as {first}, other pixels: scored as an image of its own")
                reused = True
            kept.append(item)
        reused = reused or _folders_overlap(kept)
        parts: dict[tuple, list[dict]] = {}
        for item in kept:
            folder = str(Path(item["image"]).parent) if reused else ""
            parts.setdefault((item.get("_shape", (0, 0)), item.get("_orientation"), folder), []).append(item)
        planes = len({orientation for _, orientation, _ in parts}) > 1
        folders = len({folder for _, _, folder in parts}) > 1
        labels = [
            " ".join([f"{shape[0]}x{shape[1]}"] + [_plane_name(plane)] * planes + [Path(folder).name] * folders)
            for shape, plane, folder in parts
        ]
        for number, (label, part) in enumerate(zip(labels, parts.values(), strict=True)):
            label += "" if labels.count(label) == 1 else f" #{number + 1}"
            name = f"{series} ({label})" if len(parts) > 1 else series
            ordered = sorted(part, key=_slice_order)
            for index, item in enumerate(ordered):
                if item.get("_rendered"):  # a folder's slice images lie one step apart, in their numbers' order
                    item["position"] = float(index)
            items.extend(
                {**{k: v for k, v in item.items() if not k.startswith("_")}, "series": name} for item in ordered
            )
    return items, errors


def index_inputs(
    paths: Iterable[str | Path], skip: str | Path | None = None, processes: int = 0
) -> tuple[list[dict], list[dict]]:
    """Slice items of every scorable input, grouped by series and sorted by position; ``{path, reason}`` for the rest.

    Only headers are read, so this is quick even for large folders; ``skip`` (the output folder) is not read. With
    ``processes`` (the reading processes a GPU run has) a folder of ``PARALLEL_INDEX_FILES`` files or more has its
    headers read by that many processes: on a GPU, indexing a long series otherwise takes longer than scoring it.
    """
    files, errors = find_files(paths, skip)
    return ordered_items(file_items(files, errors, processes), errors)


def file_items(
    files: list[Path], errors: ErrorList, processes: int = 0, pool: Executor | None = None
) -> Iterator[list[dict]]:
    """Each scorable file's slice items, in file order, as soon as its header is read (by ``processes`` processes
    for ``PARALLEL_INDEX_FILES`` files or more: ``pool``'s, or forked for this call); the files that are not scored
    are added to ``errors``. The items are not yet grouped into series or sorted: ``ordered_items`` does that once
    every file is indexed."""
    for path, outcome in zip(files, _index_all(files, processes, pool), strict=True):
        if isinstance(outcome, str):
            logger.warning("not scored: %s: %s", path, outcome)
            errors.add(str(path), outcome)
            continue
        series, positions, warning = outcome
        if not positions:  # e.g. a NIfTI whose slice axis has length 0: nothing to score, and it must say so
            errors.add(str(path), "no slices: the header declares an empty slice axis")
            continue
        yield [
            {"image": str(path), "frame": frame, "series": series, **geometry, "error": "", "warning": warning}
            for frame, geometry in enumerate(positions)
        ]


def ordered_items(indexed: Iterable[list[dict]], errors: ErrorList) -> tuple[list[dict], list[dict]]:
    """The items of ``file_items`` grouped by series and sorted by position (``order_series``), and ``errors`` with
    the duplicates added."""
    by_series: dict[str, list[dict]] = {}
    for items in indexed:
        by_series.setdefault(items[0]["series"], []).extend(items)
    items, duplicates = order_series(by_series)
    return items, errors + duplicates


def slice_item(item: dict) -> dict:
    """An indexed item as the readers take it, without the ordering keys (``_sop``, ``_orientation``, ...) that
    ``order_series`` uses and removes."""
    return {key: value for key, value in item.items() if not key.startswith("_")}


def _index_outcome(path: Path) -> tuple[str, list[dict], str] | str:
    """``_index_file``'s result, or the reason the file is not scored: one odd file never stops the others."""
    try:
        return _index_file(path)
    except Exception as error:
        return str(error) if isinstance(error, InputError) else f"unreadable ({type(error).__name__}: {error})"


def _index_all(
    files: list[Path], processes: int, pool: Executor | None = None
) -> Iterator[tuple[str, list[dict], str] | str]:
    """``_index_outcome`` of each file, in order, each as soon as it is read: here, or by ``pool`` or ``processes``
    processes forked for this call for many files (fork shares what this process has imported, so they start in
    milliseconds); here again for the rest if a process dies."""
    forks = "fork" in multiprocessing.get_all_start_methods()
    if processes < 2 or len(files) < PARALLEL_INDEX_FILES or (pool is None and not forks):
        yield from map(_index_outcome, files)
        return
    own = pool is None
    executor = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("fork")) if pool is None else pool
    done = 0
    try:
        for outcome in executor.map(_index_outcome, files, chunksize=INDEX_CHUNK):
            yield outcome
            done += 1
    except BrokenProcessPool:
        logger.warning("an indexing process died; reading the other %d headers in this process", len(files) - done)
        yield from map(_index_outcome, files[done:])
    finally:  # also when the reader of these outcomes stops early: the headers not yet read are not read
        if own:
            executor.shutdown(cancel_futures=True)


def _finite_2d(pixels: np.ndarray, where: str = "") -> np.ndarray:
    """The pixels if they are one finite 2-D slice; ``where`` names the slice of a multi-slice file."""
    if pixels.ndim != 2:
        raise InputError(f"{where}pixel data has shape {pixels.shape}, not a 2-D slice (wrong dimensionality)")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():  # integers are finite
        raise InputError(f"{where}pixel data contains NaN or Inf")
    return pixels


def read_ct_slice(
    path: str | Path,
    frame: int = 0,
    channels: int = 1,
    compact: bool = False,
    stored: list[int] | None = None,
    slice_intercept: float | None = None,
) -> tuple[np.ndarray, bool]:
    """One slice before windowing, and whether it is in HU: ((channels, H, W) HU, True) for CT (DICOM, NIfTI,
    rescaled and through any Modality LUT by pydicom; the one channel repeated, so that a batch mixing CT with
    rendered slices stacks), ((channels, H, W) in [0, 1], False) for rendered TIFF/PNG. float32, except with
    ``compact`` DICOM HU that are whole numbers within int16 by construction, which come as int16. ``stored``: the
    item's ``stored_pixels``, read straight from the file when it has not changed since it was indexed.
    ``slice_intercept``: TIFF/PNG slices hold CT numbers, HU = stored value + ``slice_intercept`` (as DICOM's
    RescaleIntercept: -32768 for DeepLesion's PNGs, 0 for HU as they are), not rendered grey levels.

    Raises ``InputError`` with the reason when the pixels cannot be used.
    """
    path = Path(path)
    hu = _stored_hu(path, frame, stored, compact) if stored else None
    if hu is not None:
        return to_channels(hu, channels), True
    if is_slice_image(path):
        try:
            if slice_intercept is None:
                return to_channels(read_slice(path), channels), False
            return to_channels(read_slice(path, stored_values=True) + np.float32(slice_intercept), channels), True
        except ImageReadError as error:
            raise InputError(error.reason) from error
    if _is_volume(path):
        volume = volume_hu(str(path), path.stat().st_mtime)
        if not 0 <= frame < volume.shape[2]:
            raise InputError(f"slice {frame} is outside the volume's {volume.shape[2]} slices")
        hu = np.ascontiguousarray(volume[:, :, frame].T[::-1, ::-1])  # as DICOM shows it: anterior up, right left
        where = f"slice {frame}: "
    else:
        ds = read_dicom_ct(path)
        try:
            hu = frame_hu(ds, frame, compact)
        except BaseException as error:  # decoders raise many types; a Rust decoder's panic is a BaseException
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
            reason = " ".join(str(error).split())[:200]
            raise InputError(f"pixel data cannot be decoded ({type(error).__name__}: {reason})") from None
        where = f"frame {frame}: " if frame_count(ds) > 1 else ""
    pixels = hu if hu.dtype == np.int16 else hu.astype(np.float32, copy=False)  # int16 only when compact
    return to_channels(_finite_2d(pixels, where), channels), True


def read_scored_slice(
    path: str | Path, frame: int = 0, window: Any = HU_WINDOW, channels: int = 1, slice_intercept: float | None = None
) -> np.ndarray:
    """One slice as the network sees it before resizing: (channels, H, W) float32 in [0, 1].

    CT goes from HU through ``window`` (one ``[low, high]`` or one per channel), as ``WindowHUd`` does in the
    configs; TIFF/PNG are taken as rendered, or as CT numbers with ``slice_intercept`` (``read_ct_slice``). Raises
    ``InputError`` with the reason when the pixels cannot be used.
    """
    windows = check_windows(window)
    pixels, hu = read_ct_slice(path, frame, channels, slice_intercept=slice_intercept)
    return window_channels(torch.from_numpy(pixels), windows, channels).numpy() if hu else pixels


class LoadCTSliced(MapTransform):
    """Replace each key's path with the slice ``frame`` of that file as a channel-first ``MetaTensor``: HU for CT
    (DICOM, NIfTI), with ``data[hu_key]`` set so that ``scripts.transforms.WindowHUd`` windows it next; a rendered
    TIFF/PNG slice as it is, with ``channels`` channels.

    ``compact_hu`` keeps integer DICOM HU as int16 (``read_ct_slice``): half the bytes from reader processes to
    the batch, converted to float32 where the batch is windowed (the inference config; training windows each slice
    as it is cached and keeps float32). ``slice_intercept`` (a number, or None: rendered) reads TIFF/PNG slices as
    CT numbers, HU = stored value + intercept, windowed as CT is.

    With ``error_key`` set, a slice that cannot be read becomes a small zero placeholder and its
    reason goes to ``data[error_key]`` (items already carrying an error are passed through the
    same way), so a DataLoader batch survives one bad file; without it, ``InputError`` is raised.
    """

    def __init__(
        self,
        keys: KeysCollection,
        channels: int = 1,
        frame_key: str = "frame",
        error_key: str | None = "error",
        hu_key: str = "hu",
        compact_hu: bool = False,
        slice_intercept: Any = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.compact_hu = as_bool(compact_hu, "compact_hu")
        self.slice_intercept = optional_intercept(slice_intercept)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels
        self.frame_key = frame_key
        self.error_key = error_key
        self.hu_key = hu_key
        self._last_logged: tuple[str, str] = ("", "")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        frame = int(d.get(self.frame_key, 0))
        stored = d.pop(STORED_PIXELS, None)  # where index_inputs found the pixels in the file; not for the batch
        hu = False
        for key in self.key_iterator(d):
            path = str(d[key])
            error = d.get(self.error_key, "") if self.error_key else ""
            pixels = None
            if not error:
                try:
                    pixels, hu = read_ct_slice(
                        path, frame, self.channels, self.compact_hu, stored, self.slice_intercept
                    )
                except Exception as caught:  # one odd file never stops the batch
                    if self.error_key is None:
                        raise InputError(f"{path}: {caught}") from caught
                    error = str(caught) if isinstance(caught, InputError) else f"{type(caught).__name__}: {caught}"
                    if (path, error) != self._last_logged:  # a refused volume's reason once, not once per slice
                        logger.warning("not scored: %s [slice %d]: %s", path, frame, error)
                        self._last_logged = (path, error)
            if pixels is None:
                pixels = np.zeros((self.channels, PLACEHOLDER_SIZE, PLACEHOLDER_SIZE), dtype=np.float32)
            d[key] = MetaTensor(torch.from_numpy(pixels), meta={"filename_or_obj": path})
            if self.error_key:
                d[self.error_key] = error
        d[self.hu_key] = hu
        return d


def inference_items(dataset_dir: str | Path, output_dir: str | Path | None = None, processes: int = 0) -> list[dict]:
    """Slice items for the bundle's inference config: every input under ``dataset_dir`` (``output_dir`` left out),
    indexed by ``processes`` processes where there are many (``index_inputs``).

    Inputs that cannot be scored come along as items with their ``error`` set, so the
    prediction writer lists them in ``errors.json`` next to the scores of the others. A missing
    or empty folder is such an item too, not an exception: building the workflow (which
    ``monai.bundle.load`` does to reach ``network_def``) must not need the data; the run then
    writes ``errors.json`` and stops with the reason, as no slice was scored.
    """
    root = Path(dataset_dir)
    if not root.is_dir():
        reason = "folder does not exist" if not root.exists() else "not a folder"
        return [_error_item(str(root), reason)]
    items, errors = index_inputs([root], skip=output_dir, processes=processes)
    if not items and not errors:
        errors = [{"path": str(root), "reason": "no scorable CT or slice files found"}]
    return items + [_error_item(error["path"], error["reason"]) for error in errors]


def _error_item(path: str, reason: str) -> dict:
    return {"image": path, "frame": 0, "series": "", "position": 0.0, "error": reason, "warning": ""}
