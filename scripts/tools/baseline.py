"""A no-learning baseline: the inverse of the noise level measured in flat regions of a slice.

Low-dose CT quality is driven mostly by noise, so a noise estimate is the natural yardstick a
learned model has to beat (the LDCTIQA organisers' "simple SNR baseline" scored 2.40 on the
test set). The noise standard deviation is read from the high-pass residual (the slice minus its
3 x 3 median) in the flattest tissue blocks, where anatomy contributes least.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from scipy import ndimage
from scripts.transforms import read_slice

BLOCK = 8
TISSUE_THRESHOLD = 0.3  # in the [-1000, 400] HU window, air and lung lie below, soft tissue near 0.76
FLATTEST_FRACTION = 0.25


def flat_region_noise(pixels: np.ndarray, block: int = BLOCK) -> float:
    """Noise standard deviation of a 2-D slice in [0, 1], from its flattest tissue blocks."""
    image = np.asarray(pixels, dtype=np.float64)
    residual = image - ndimage.median_filter(image, size=3)
    rows, cols = (image.shape[0] // block) * block, (image.shape[1] // block) * block

    def blocks(array: np.ndarray) -> np.ndarray:
        return array[:rows, :cols].reshape(rows // block, block, cols // block, block).swapaxes(1, 2)

    block_std = blocks(residual).std(axis=(2, 3)).ravel()
    tissue = blocks(image).mean(axis=(2, 3)).ravel() > TISSUE_THRESHOLD
    candidates = block_std[tissue] if tissue.sum() >= 4 else block_std
    flattest = np.sort(candidates)[: max(1, int(len(candidates) * FLATTEST_FRACTION))]
    # a 3 x 3 median residual keeps about 0.82 of white noise's standard deviation
    return float(np.median(flattest) / 0.82)


def baseline_score(pixels: np.ndarray) -> float:
    """Higher is better: the inverse of the flat-region noise level."""
    return 1.0 / (flat_region_noise(pixels) + 1e-4)


def baseline_scores(paths: Iterable[str | Path]) -> list[float]:
    """The baseline score of each slice file (TIFF/PNG, read as the bundle reads them)."""
    scores = []
    for path in paths:
        pixels = read_slice(path)
        scores.append(baseline_score(pixels if pixels.ndim == 2 else pixels.mean(axis=-1)))
    return scores
