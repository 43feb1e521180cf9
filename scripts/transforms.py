"""Reading 2-D slices into tensors, as a MONAI transform that a config can swap out.

TIFF/PNG slices are taken as already rendered: float data (the LDCTIQA form, [0, 1]) as is,
integer data scaled by its type's range. Grey images become one channel; RGB images become
one channel (luma) or stay three, as the network asks.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from PIL import Image
from scripts.ct_io import HU_WINDOW
from scripts.decoders import Readable, check_jpeg_scans, codestream_shape
from scripts.options import check_windows, optional_size

SLICE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
FLOAT_SLACK = 0.1  # float slices are windowed to [0, 1]; overshoot from resampling or rounding is tolerated
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
JPEG_COMPRESSIONS = frozenset({7, 99, 33003, 33004, 33005, 33007, 34712, 34892})  # TIFF's JPEG and JPEG 2000 codes
SEGMENT_HEAD = 4096  # bytes of a compressed tile or strip read for its codestream's frame header
NARROW_SHARE = 1 / 8  # a 16-bit or wider slice whose values span less of its type's range holds CT numbers
MAX_SLICE_MB = 64.0  # MiB per decoded slice as float32 (4096 x 4096): larger declared sizes are refused unread


class ImageReadError(ValueError):
    """An image that cannot be used, with the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(path, reason)
        self.path = str(path)
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class DeclaredSizeError(ValueError):
    """A header that declares more pixels than its file can hold, or more than the cap per slice."""


def format_mib(size: float) -> str:
    """``size`` bytes in MiB: whole MiB with thousands separators, two significant digits below 10."""
    mib = size / 2**20
    return f"{mib:,.0f}" if mib >= 10 else f"{mib:.2g}"


def check_slice_size(shape: Sequence[int], max_slice_mb: float | None = None) -> None:
    """``DeclaredSizeError`` naming the declared ``shape`` when its pixels as float32 exceed the cap per slice.

    ``max_slice_mb`` defaults to this module's ``MAX_SLICE_MB``, read at call time (so it can be set once).
    """
    limit = MAX_SLICE_MB if max_slice_mb is None else float(max_slice_mb)
    need = math.prod(int(side) for side in shape) * 4
    if need > limit * 2**20:
        declared = " x ".join(str(int(side)) for side in shape)
        raise DeclaredSizeError(
            f"declared size {declared} needs {format_mib(need)} MiB as float32, "
            f"over the cap of {limit:g} MiB per slice (MAX_SLICE_MB)"
        )


def _tiff_page(tif: tifffile.TiffFile) -> tifffile.TiffPage:
    """The slice's page, checked from its header: a slice file holds one page, whose uncompressed strips lie inside
    the file. Only the first two page headers are read: tifffile's series view walks every page, and a corrupt
    page chain can make that walk endless (found by fuzzing)."""
    page = tif.pages.first
    try:
        more = tif.pages[1] is not None
    except (IndexError, tifffile.TiffFileError):
        more = False
    if more:
        raise DeclaredSizeError("the TIFF holds several pages (a stack): expected one 2-D grey or RGB slice")
    if page.compression == 1 and page.dataoffsets:
        end = max(offset + count for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True))
        if end > tif.filehandle.size:
            raise DeclaredSizeError(
                f"declared size {' x '.join(map(str, page.shape))} (uncompressed) needs the file to reach byte "
                f"{end:,}, but it has {tif.filehandle.size:,} bytes"
            )
    return page


def _check_tiff_codestreams(tif: tifffile.TiffFile, page: tifffile.TiffPage) -> None:
    """``DeclaredSizeError`` when a JPEG or JPEG 2000 tile or strip declares more rows, columns or samples per pixel
    than the tile or strip holds, or a JPEG one holds more scans than ``scan_limit`` allows.

    Its decoder allocates what the codestream declares: a 64 x 64 slice whose JPEG strip declared 60000 x 60000
    took 18 s and 4.2 GiB to read. Only the head of a JPEG 2000 segment is read."""
    if page.compression not in JPEG_COMPRESSIONS or not page.dataoffsets:
        return
    tiled, samples = bool(page.is_tiled), int(page.samplesperpixel)
    if tiled:
        rows, columns = int(page.tilelength), int(page.tilewidth)
    else:
        rows, columns = min(int(page.rowsperstrip or page.imagelength), int(page.imagelength)), int(page.imagewidth)
    for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
        tif.filehandle.seek(offset)
        head = tif.filehandle.read(min(count, SEGMENT_HEAD))
        shape = codestream_shape(head)
        if shape is not None and (shape[0] > rows or shape[1] > columns or shape[2] > samples):
            raise DeclaredSizeError(
                f"a compressed {'tile' if tiled else 'strip'} declares {shape[0]} x {shape[1]} x {shape[2]} samples, "
                f"more than its {rows} x {columns} x {samples}: the file is damaged"
            )
        if head[:2] == b"\xff\xd8":
            tif.filehandle.seek(offset)
            _check_scans(tif.filehandle, count)


def _check_scans(stream: Readable, size: int = -1) -> None:
    """``check_jpeg_scans``, raising ``DeclaredSizeError``."""
    try:
        check_jpeg_scans(stream, size)
    except ValueError as error:
        raise DeclaredSizeError(str(error)) from None


def _decode(path: Path, max_slice_mb: float | None = None, header_only: bool = False) -> np.ndarray | tuple[int, int]:
    """An image file's pixels (its (rows, columns) with ``header_only``), refused before decoding when its header
    declares too much; ``ImageReadError`` with the reason."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                page = _tiff_page(tif)
                check_slice_size(page.shape, max_slice_mb)
                if header_only:
                    return int(page.imagelength), int(page.imagewidth)
                _check_tiff_codestreams(tif, page)
                return page.asarray()
        with Image.open(path) as image:
            check_slice_size((image.height, image.width, len(image.getbands())), max_slice_mb)
            if header_only:
                return image.height, image.width
            if image.format in ("JPEG", "MPO"):
                with path.open("rb") as stream:
                    _check_scans(stream)
            if image.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "HSV", "1"):
                return np.asarray(image.convert("RGB" if image.mode not in ("LA", "1") else "L"))
            return np.asarray(image)
    except DeclaredSizeError as error:
        raise ImageReadError(path, str(error)) from None
    except Exception as error:  # each image library raises its own types
        raise ImageReadError(path, f"unreadable image ({type(error).__name__}: {error})") from error


def check_image_header(path: str | Path, max_slice_mb: float | None = None) -> tuple[int, int]:
    """The (rows, columns) a TIFF/PNG file's header declares; ``ImageReadError`` when it cannot be read or declares
    more than the cap per slice."""
    shape = _decode(Path(path), max_slice_mb, header_only=True)
    assert isinstance(shape, tuple)
    return shape


def _scale_to_unit(pixels: np.ndarray) -> np.ndarray:
    """Integers by their type's range, bool as 0/1, floats unchanged; always float32."""
    if pixels.dtype == bool:
        return pixels.astype(np.float32)
    if np.issubdtype(pixels.dtype, np.integer):
        info = np.iinfo(pixels.dtype)
        return ((pixels.astype(np.float64) - info.min) / (info.max - info.min)).astype(np.float32)
    if np.issubdtype(pixels.dtype, np.floating):
        return pixels.astype(np.float32)
    raise ValueError(f"unsupported pixel type {pixels.dtype}")


def _stored_ct_reason(pixels: np.ndarray) -> str:
    """Why integer grey ``pixels`` are CT numbers as stored rather than a rendered slice, or ``""``: values below 0
    (no image format stores grey below 0), or 16 bits or more whose values span under ``NARROW_SHARE`` of their
    type's range above 255 (HU + 1024, or DeepLesion's HU + 32768; an 8-bit rendering kept in 16 bits stays)."""
    if not np.issubdtype(pixels.dtype, np.integer) or pixels.dtype == np.uint8:  # uint8: rendered grey or colour
        return ""
    low, high = int(pixels.min()), int(pixels.max())
    info = np.iinfo(pixels.dtype)
    if low < 0:
        return f"{pixels.dtype} pixels span [{low}, {high}]: CT numbers (HU), not a rendered slice"
    share = (high - low) / (int(info.max) - int(info.min))
    if pixels.ndim == 2 and pixels.dtype.itemsize >= 2 and high > 255 and share < NARROW_SHARE:
        return (
            f"{pixels.dtype} pixels span [{low}, {high}], {share:.1%} of their type's range: CT numbers as stored "
            "(HU plus an offset), not a rendered slice"
        )
    return ""


def read_slice(path: str | Path, max_slice_mb: float | None = None, stored_values: bool = False) -> np.ndarray:
    """Read one 2-D slice as float32, (H, W) for grey or (H, W, 3) for colour: rendered, in [0, 1]; or with
    ``stored_values`` a grey slice's values as stored (CT numbers, which ``stored_values`` says it holds).

    Raises ``ImageReadError`` naming the file for missing, unreadable, non-2-D or non-finite data, a rendered slice
    that holds CT numbers or a colour one said to, and (before decoding) for a declared size over ``max_slice_mb``
    (default ``MAX_SLICE_MB``).
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file does not exist")
    decoded = _decode(path, max_slice_mb)
    assert isinstance(decoded, np.ndarray)  # a shape only for header_only
    pixels = np.squeeze(decoded)
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise ImageReadError(path, f"expected a 2-D grey or RGB slice, got array shape {pixels.shape}")
    if min(pixels.shape[:2]) < 8:
        raise ImageReadError(path, f"image too small ({pixels.shape[0]}x{pixels.shape[1]})")
    if stored_values:
        if pixels.ndim != 2:
            raise ImageReadError(path, "a colour slice, said to hold CT numbers (slice_intercept): it cannot")
        if not np.issubdtype(pixels.dtype, np.number) or pixels.dtype.kind == "c":
            raise ImageReadError(path, f"unsupported pixel type {pixels.dtype}")
        stored = pixels.astype(np.float32)
        if not np.isfinite(stored).all():
            raise ImageReadError(path, "pixels contain NaN or Inf")
        if pixels.dtype == np.uint8 or float(stored.max() - stored.min()) <= 1:
            raise ImageReadError(
                path,
                f"{pixels.dtype} pixels span [{stored.min():.4g}, {stored.max():.4g}]: a rendered slice, not CT "
                "numbers as slice_intercept says (score rendered slices without it)",
            )
        return stored
    reason = _stored_ct_reason(pixels)
    if reason:
        raise ImageReadError(
            path,
            f"{reason}; give the offset with --slice_intercept (HU = value + intercept: -1024 for HU + 1024, "
            "-32768 for DeepLesion's PNGs), or give raw CT as DICOM or NIfTI, or window it to [0, 1] first",
        )
    try:
        pixels = _scale_to_unit(pixels)
    except ValueError as error:
        raise ImageReadError(path, str(error)) from error
    if not np.isfinite(pixels).all():
        raise ImageReadError(path, "pixels contain NaN or Inf")
    low, high = float(pixels.min()), float(pixels.max())
    if low < -FLOAT_SLACK or high > 1 + FLOAT_SLACK:
        raise ImageReadError(
            path,
            f"float pixels span [{low:.4g}, {high:.4g}], not [0, 1]: not windowed (give raw CT as DICOM or NIfTI, "
            "which are windowed from HU)",
        )
    return pixels


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """(H, W) or (H, W, 3) -> channel-first (channels, H, W): RGB to luma, or grey replicated."""
    if pixels.ndim == 3:
        if channels == 3:
            return np.ascontiguousarray(pixels.transpose(2, 0, 1))
        pixels = pixels @ LUMA
    return pixels[None] if channels == 1 else np.repeat(pixels[None], channels, axis=0)


class ResizeSliced(MapTransform):
    """Resize channel-first slices to ``spatial_size``: bilinear, with PyTorch's anti-aliasing.

    Downscaling (512 -> 256) averages over each output pixel's footprint, as PIL does, about ten
    times faster than MONAI's Gaussian pre-filter with bilinear ``Resized``; on a CPU that time is
    taken from the network. Slices already at the size pass through untouched, and so does every
    slice when the size is None (profiles that read crops at the slice's own pixel grid). The source
    file stays in the meta.
    """

    def __init__(
        self, keys: KeysCollection, spatial_size: Sequence[int | None] | None, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        sizes = [optional_size(size, "image_size") for size in ([] if spatial_size is None else spatial_size)]
        self.spatial_size = tuple(size for size in sizes if size is not None) or None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            if self.spatial_size is None or tuple(image.shape[-2:]) == self.spatial_size:
                continue
            pixels = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            resized = torch.nn.functional.interpolate(
                pixels[None].float(), size=self.spatial_size, mode="bilinear", antialias=True, align_corners=False
            )[0]
            d[key] = MetaTensor(resized, meta=dict(image.meta)) if isinstance(image, MetaTensor) else resized
        return d


class ScoreToTensord(MapTransform):
    """Turn each key's number into a float32 tensor of shape (1,), the form the losses and metrics take."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = torch.as_tensor(d[key], dtype=torch.float32).reshape(1)
        return d


def recorded_windows(settings: dict[str, Any]) -> list[tuple[float, float]]:
    """The HU window(s) a model was trained with, from its settings (``model.json``); [-1000, 400] when not recorded."""
    return check_windows(settings.get("window") or HU_WINDOW)


def window_channels(
    hu: torch.Tensor, windows: Sequence[tuple[float, float]], channels: int, dim: int = 0
) -> torch.Tensor:
    """(1 or more, H, W) HU -> (channels, H, W) in [0, 1] (or along ``dim`` of a batch: (B, C, H, W) with ``dim``
    1): the first channel through each window, one channel per window, or one window's channel repeated.

    Each window is MONAI's ``ScaleIntensityRange(a_min=low, a_max=high, b_min=0, b_max=1, clip=True)`` to the bit
    (``(hu - low) / (high - low)``, clipped; MONAI's scaling by 1 and shift by 0 change nothing), computed in one
    temporary instead of MONAI's four: on a CPU those full-size temporaries cost more than the resize.
    """
    first = hu.narrow(dim, 0, 1)
    scaled = [first.sub(low).div_(high - low).clamp_(0.0, 1.0).to(torch.float32) for low, high in windows]
    stacked = torch.cat(scaled, dim=dim) if len(scaled) > 1 else scaled[0]
    if stacked.shape[dim] == 1 and channels > 1:
        stacked = torch.cat([stacked] * channels, dim=dim)
    return stacked


class WindowHUd(MapTransform):
    """CT in HU -> the display window(s), [0, 1]: the config's ``window`` id, one window or one per channel.

    The numbers are MONAI's ``ScaleIntensityRange`` (``a_min``, ``a_max`` = the window, ``b_min`` 0, ``b_max`` 1,
    clipped). It is a transform of ours, not ``ScaleIntensityRanged`` in the config, for two reasons MONAI's cannot
    express: a dataset may mix CT (HU) with slices rendered already (TIFF/PNG, windowed by whoever made them), and
    only the items the loader marked as HU (``data[hu_key]``) may be windowed; and several windows become channels.
    """

    def __init__(
        self,
        keys: KeysCollection,
        window: Any = HU_WINDOW,
        channels: int = 1,
        hu_key: str = "hu",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.windows = check_windows(window)
        if len(self.windows) > 1 and len(self.windows) != channels:
            raise ValueError(
                f"{len(self.windows)} windows give {len(self.windows)} channels, but in_channels is {channels}"
            )
        self.channels = channels
        self.hu_key = hu_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if not d.get(self.hu_key):
            return d  # rendered slices and unreadable placeholders pass as they are
        for key in self.key_iterator(d):
            d[key] = window_channels(d[key], self.windows, self.channels)
        d[self.hu_key] = False
        return d


class BatchPreprocess:
    """Window, resize and min-max normalisation of a whole batch on the network's device: the inference config's
    ``prepare_batch`` step, so that DataLoader workers only read and decode (CT in HU, rendered slices as they are).

    The numbers are those of the per-slice ``WindowHUd``, ``ResizeSliced`` and ``ScaleIntensityd(minv=0, maxv=1)``
    (within float rounding): the same MONAI ``ScaleIntensityRange`` per window, the same anti-aliased bilinear
    resize, each slice scaled by its own minimum and maximum (a constant slice becomes zeros). Slices of different
    sizes (padded to one by ``pad_collate``, which records each one's own) are cut back and processed in groups of
    one size; without ``image_size`` (crop profiles) they are then padded with air at the bottom and right again.
    """

    def __init__(self, window: Any = HU_WINDOW, channels: int = 1, image_size: Any = None) -> None:
        self.windows = check_windows(window)
        self.channels = channels
        size = optional_size(image_size, "image_size")
        self.spatial_size = None if size is None else (size, size)

    def __call__(self, images: torch.Tensor, hu: Any, shapes: Any = None) -> torch.Tensor:
        """(B, C, H, W) float32 in [0, 1] from a batch as read, each slice's "in HU" flag (``hu``: a bool tensor or
        sequence) and, for a batch padded to one size (``scripts.patches.pad_collate``), each slice's own (H, W)."""
        slices = list(images.unbind(0))
        if shapes is not None:
            sizes = shapes.tolist() if isinstance(shapes, torch.Tensor) else shapes
            slices = [
                image[..., : int(height), : int(width)] for image, (height, width) in zip(slices, sizes, strict=True)
            ]
        flags = [bool(flag) for flag in (hu.tolist() if isinstance(hu, torch.Tensor) else hu)]
        groups: dict[tuple[tuple[int, ...], bool], list[int]] = {}
        for index, (image, flag) in enumerate(zip(slices, flags, strict=True)):
            groups.setdefault((tuple(image.shape), flag), []).append(index)
        if len(groups) == 1 and tuple(slices[0].shape) == tuple(images.shape[1:]):  # the usual batch: no copies
            return self._process(_plain(images).float(), flags[0])
        out: list[torch.Tensor] = [images] * len(slices)
        for (_, flag), indices in groups.items():
            batch = self._process(torch.stack([_plain(slices[index]) for index in indices]).float(), flag)
            for position, index in enumerate(indices):
                out[index] = batch[position]
        height = max(image.shape[-2] for image in out)
        width = max(image.shape[-1] for image in out)
        padded = [
            torch.nn.functional.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2])) for image in out
        ]
        return torch.stack(padded)

    def _process(self, batch: torch.Tensor, hu: bool) -> torch.Tensor:
        """One group of slices of one size: window (HU only), resize, then each slice scaled to [0, 1]."""
        return self.normalise(self.resize(self.window(batch) if hu else batch))

    def window(self, batch: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) HU through the window(s), one channel per window."""
        return window_channels(batch, self.windows, self.channels, dim=1)

    def resize(self, batch: torch.Tensor) -> torch.Tensor:
        """To ``image_size`` (anti-aliased bilinear, as ``ResizeSliced``); as it is without one or already there."""
        if self.spatial_size is None or tuple(batch.shape[-2:]) == self.spatial_size:
            return batch
        return torch.nn.functional.interpolate(
            batch, size=self.spatial_size, mode="bilinear", antialias=True, align_corners=False
        )

    @staticmethod
    def normalise(batch: torch.Tensor) -> torch.Tensor:
        """Each slice scaled by its own minimum and maximum to [0, 1]; a constant slice becomes zeros."""
        low = batch.amin(dim=(1, 2, 3), keepdim=True)
        span = batch.amax(dim=(1, 2, 3), keepdim=True) - low
        return (batch - low).div_(torch.where(span > 0, span, 1.0))  # a constant slice: 0 / 1


def _plain(image: torch.Tensor) -> torch.Tensor:
    return image.as_tensor() if isinstance(image, MetaTensor) else image
