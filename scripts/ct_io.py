"""CT pixels in Hounsfield units, and the window that brings them to the LDCTIQA scale.

LDCTIQA's slices are CT windowed to [-1000, 400] HU and scaled to [0, 1]; a model trained on them
must see raw CT (DICOM, NIfTI) the same way. DICOM frames go to HU with their rescale slope and
intercept, read from the dataset itself or, for enhanced (multi-frame) CT, from its functional
groups.
"""

from __future__ import annotations

from typing import Any, TypeVar

import numpy as np
import torch

HU_WINDOW = (-1000.0, 400.0)

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)


def window_hu(hu: ArrayT, low: float = HU_WINDOW[0], high: float = HU_WINDOW[1]) -> ArrayT:
    """The LDCTIQA display window: HU in [low, high] -> [0, 1], clipped (works on arrays and tensors)."""
    scaled = (hu - low) / (high - low)
    return scaled.clamp(0.0, 1.0) if isinstance(scaled, torch.Tensor) else np.clip(scaled, 0.0, 1.0)


def rescale(ds: Any, frame: int = 0) -> tuple[float, float]:
    """Slope and intercept to HU: the dataset's own, else the frame's or the shared functional groups' (enhanced CT)."""
    if "RescaleSlope" in ds:
        return float(ds.RescaleSlope), float(ds.get("RescaleIntercept", 0.0))
    groups = [*ds.get("PerFrameFunctionalGroupsSequence", [])[frame : frame + 1]]
    groups += ds.get("SharedFunctionalGroupsSequence", [])[:1]
    for group in groups:
        if "PixelValueTransformationSequence" in group:
            item = group.PixelValueTransformationSequence[0]
            return float(item.RescaleSlope), float(item.RescaleIntercept)
    return 1.0, 0.0


def frames_hu(ds: Any) -> list[np.ndarray]:
    """Every frame of a CT dataset, in HU (one for a classic slice, several for enhanced CT)."""
    pixels = ds.pixel_array.astype(np.float32)
    frames = pixels if pixels.ndim == 3 else pixels[None]
    return [frame * slope + intercept for i, frame in enumerate(frames) for slope, intercept in [rescale(ds, i)]]
