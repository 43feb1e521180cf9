"""Reading 2-D slices into tensors, as a MONAI transform that a config can swap out.

TIFF/PNG slices are taken as already rendered: float data (the LDCTIQA form, [0, 1]) as is,
integer data scaled by its type's range. Grey images become one channel; RGB images become
one channel (luma) or stay three, as the network asks.
"""

from __future__ import annotations

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

from scripts.options import optional_size

SLICE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")
FLOAT_SLACK = 0.1  # float slices are windowed to [0, 1]; overshoot from resampling or rounding is tolerated
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImageReadError(ValueError):
    """An image that cannot be used, with the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


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


def read_slice(path: str | Path) -> np.ndarray:
    """Read one 2-D slice as float32, (H, W) for grey or (H, W, 3) for colour.

    Raises ``ImageReadError`` naming the file for missing, unreadable, non-2-D or non-finite data.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file does not exist")
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            pixels = tifffile.imread(path)
        else:
            with Image.open(path) as image:
                if image.mode in ("P", "PA", "LA", "RGBA", "CMYK", "YCbCr", "HSV", "1"):
                    image = image.convert("RGB" if image.mode not in ("LA", "1") else "L")
                pixels = np.asarray(image)
    except Exception as error:  # each image library raises its own types
        raise ImageReadError(path, f"unreadable image ({type(error).__name__}: {error})") from error
    pixels = np.squeeze(pixels)
    if pixels.ndim == 3 and pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[-1] == 3)):
        raise ImageReadError(path, f"expected a 2-D grey or RGB slice, got array shape {pixels.shape}")
    if min(pixels.shape[:2]) < 8:
        raise ImageReadError(path, f"image too small ({pixels.shape[0]}x{pixels.shape[1]})")
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
    return np.repeat(pixels[None], channels, axis=0)


class LoadSliced(MapTransform):
    """Replace each key's file path with a channel-first float32 ``MetaTensor`` of the slice.

    The source path stays in the tensor's meta as ``filename_or_obj``, as with MONAI's
    ``LoadImaged``, so writers can name the file.
    """

    def __init__(self, keys: KeysCollection, channels: int = 1, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.channels = channels

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            pixels = to_channels(read_slice(path), self.channels)
            d[key] = MetaTensor(torch.from_numpy(pixels), meta={"filename_or_obj": str(path)})
        return d


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
