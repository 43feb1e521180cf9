"""A synthetic KADID-10k: distorted crops of the natural photographs that ship with scikit-image.

Phase 1 of TFKT learns image quality from KADID-10k (81 photographs x 25 distortions x 5 levels,
each rated 1..5 by crowd workers). Users download KADID themselves; this module writes a small
stand-in with the same layout and the same distortion numbering, offline, for demos and tests:

- ``images/Ixx.png``: references, RGB crops (random position and scale, random mirror) of the
  colour photographs bundled in the scikit-image wheel (``skimage/data``; files read directly,
  nothing is downloaded). Grey photographs are left out: colour distortions would be no-ops on them.
- ``images/Ixx_yy_zz.png``: reference ``xx``, distortion ``yy`` (KADID's numbers 01..25), level ``zz``.
- ``dmos.csv``: ``dist_img,ref_img,dmos,var``; ``dmos`` is a mean opinion score in [1, 5], higher is better.

MOS rule (full-reference, so the score depends on the content, not only on type and level):

1. ``s`` = SSIM (as ``skimage.metrics.structural_similarity``, 7x7 window) between the luminances
   (BT.601 luma) of the reference and the distorted image; ``e`` = mean CIEDE2000 colour
   difference (``skimage.color.deltaE_ciede2000``) between the CIELAB images at half resolution
   (2 x 2 pixels averaged in linear light: the eye resolves colour coarsely), so that colour and
   brightness changes that SSIM barely sees still count.
2. Impairment ``d = (1 - s) + e / E_SCALE`` (``E_SCALE = 100``: a mean colour difference of 10
   weighs as much as an SSIM drop of 0.1).
3. Objective MOS ``q = 1 + 4 * exp(-(d / D_SCALE) ** D_POWER)`` (``D_SCALE = 0.3``,
   ``D_POWER = 1.15``): 5 for an identical image, falling monotonically towards 1 (SSIM 0.9
   alone gives about 4, SSIM 0.5 about 1.6); the constants were chosen so that the 25 types x 5
   levels spread over most of 1..5 (level means from about 4.3 down to about 1.9).
4. ``RATERS`` simulated raters give integer ratings ``clip(round(q + N(0, RATER_SD)), 1, 5)``;
   ``dmos`` is their mean and ``var`` their variance (ddof=1), as in KADID's ACR protocol.

API: ``write_natural_dataset(output_dir, n_refs, size, seed)``; ``DISTORTIONS`` (KADID number ->
name and function); ``distort``, ``similarity``, ``objective_mos`` and ``simulate_ratings`` for
the single steps.

Every random choice (crops, distortion noise, ratings) comes from ``numpy.random.Generator``s
spawned from ``seed``, one per reference, so the same seed writes identical files.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import numpy as np
import skimage
from PIL import Image
from scipy import ndimage
from skimage.color import deltaE_ciede2000

# colour photographs bundled in the scikit-image wheel (skimage/data), read without pooch
PHOTOGRAPHS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "ihc.png",
    "motorcycle_left.png",
    "retina.jpg",
    "rocket.jpg",
)
LEVELS = 5
E_SCALE = 100.0
D_SCALE = 0.3
D_POWER = 1.15
RATERS = 15
RATER_SD = 0.7
MIN_CROP_FRACTION = 0.3
MIN_CROP_CONTRAST = 0.08
CROP_TRIES = 12

Distortion = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


class DistortionType(NamedTuple):
    """One KADID distortion: its name and ``apply(image, level, rng)`` on float RGB in [0, 1]."""

    name: str
    apply: Distortion


# ---------------------------------------------------------------- colour spaces (float RGB in [0, 1])

_LUMA = np.array([0.299, 0.587, 0.114])
_RGB_TO_XYZ = np.array([[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]])
_WHITE = np.array([0.95047, 1.0, 1.08883])
_RGB_TO_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def _srgb_to_linear(rgb: np.ndarray) -> np.ndarray:
    return np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)


# the sRGB decoding of the 256 uint8 values: a table look-up is ~10x faster than the power law
_LINEAR_OF_UINT8 = _srgb_to_linear(np.arange(256) / 255.0).astype(np.float32)


def _linear_to_lab(linear: np.ndarray) -> np.ndarray:
    xyz = linear @ (_RGB_TO_XYZ.T / _WHITE).astype(linear.dtype)
    f = np.cbrt(xyz)
    small = xyz <= 0.008856
    f[small] = 7.787 * xyz[small] + 16.0 / 116.0
    return np.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]), 200.0 * (f[..., 1] - f[..., 2])], -1)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB (D65) -> CIELAB, from float RGB in [0, 1] or uint8; a lean ``skimage.color.rgb2lab``."""
    return _linear_to_lab(_LINEAR_OF_UINT8[rgb] if rgb.dtype == np.uint8 else _srgb_to_linear(rgb))


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB -> sRGB (D65), clipped to [0, 1]; the inverse of ``rgb_to_lab``."""
    fy = (lab[..., 0] + 16.0) / 116.0
    f = np.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], -1)
    xyz = np.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787) * _WHITE.astype(lab.dtype)
    linear = np.clip(xyz @ np.linalg.inv(_RGB_TO_XYZ).T.astype(lab.dtype), 0.0, 1.0)
    return np.where(linear > 0.0031308, 1.055 * linear ** (1 / 2.4) - 0.055, 12.92 * linear)


# ---------------------------------------------------------------- the distortions (KADID numbering)


def _pick(values: tuple[float, ...], level: int) -> float:
    return values[level - 1]


def _gaussian_blur(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    sigma = _pick((0.5, 1.0, 1.6, 2.4, 3.5), level)
    return ndimage.gaussian_filter(image, (sigma, sigma, 0))


def _lens_blur(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Convolution with a uniform disk (an out-of-focus lens)."""
    radius = int(_pick((1, 2, 3, 4, 6), level))
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    disk = (yy**2 + xx**2 <= radius**2 + radius * 0.5).astype(np.float64)
    return ndimage.convolve(image, (disk / disk.sum())[..., None], mode="reflect")


def _motion_blur(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Convolution with a line of random direction."""
    length = int(_pick((3, 5, 8, 12, 17), level))
    angle = rng.uniform(0.0, np.pi)
    half = length // 2
    steps = np.linspace(-length / 2, length / 2, 4 * length)
    rows = np.clip(np.rint(half + steps * np.sin(angle)).astype(int), 0, 2 * half)
    cols = np.clip(np.rint(half + steps * np.cos(angle)).astype(int), 0, 2 * half)
    kernel = np.zeros((2 * half + 1, 2 * half + 1))
    np.add.at(kernel, (rows, cols), 1.0)
    return ndimage.convolve(image, (kernel / kernel.sum())[..., None], mode="reflect")


def _color_diffusion(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Blur of the chroma (a*, b*) only: colours bleed over edges."""
    sigma = _pick((3.0, 6.0, 10.0, 15.0, 22.0), level)
    lab = rgb_to_lab(image)
    lab[..., 1:] = ndimage.gaussian_filter(lab[..., 1:], (sigma, sigma, 0), truncate=3.0)
    return lab_to_rgb(lab)


def _color_shift(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """The green channel is shifted in a random direction (misregistered colour planes)."""
    distance = _pick((1.0, 2.0, 3.5, 5.5, 8.0), level)
    angle = rng.uniform(0.0, 2 * np.pi)
    shifted = image.copy()
    offset = (distance * np.sin(angle), distance * np.cos(angle))
    shifted[..., 1] = ndimage.shift(image[..., 1], offset, order=1, mode="nearest")
    return shifted


def _color_quantization(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """A palette of few colours (Pillow's fast octree, no dithering)."""
    colours = int(_pick((128, 64, 32, 16, 8), level))
    palette = _to_pil(image).quantize(colours, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    return _from_pil(palette.convert("RGB"))


def _color_saturation_hsv(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Desaturation in HSV: saturation scaled down, value (the largest channel) kept, hue unchanged."""
    value = image.max(-1, keepdims=True)
    return value - (value - image) * _pick((0.6, 0.4, 0.25, 0.1, 0.0), level)


def _color_saturation_lab(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Over-saturation in CIELAB (chroma a*, b* scaled up, lightness kept)."""
    lab = rgb_to_lab(image)
    lab[..., 1:] *= _pick((1.5, 2.0, 2.7, 3.6, 5.0), level)
    return lab_to_rgb(lab)


def _encode(image: np.ndarray, **options: Any) -> np.ndarray:
    """Round trip through a lossy Pillow encoder."""
    buffer = io.BytesIO()
    _to_pil(image).save(buffer, **options)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return _from_pil(decoded.convert("RGB"))


def _jpeg2000(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    rate = _pick((10, 20, 40, 70, 120), level)
    return _encode(image, format="JPEG2000", quality_mode="rates", quality_layers=[rate], irreversible=True)


def _jpeg(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    return _encode(image, format="JPEG", quality=int(_pick((45, 28, 16, 9, 4), level)))


def _white_noise(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    sd = _pick((0.02, 0.04, 0.065, 0.1, 0.15), level)
    return image + rng.normal(0.0, sd, image.shape)


def _white_noise_color(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """White noise in YCbCr: strong in the chroma components, weak in luma."""
    sd = _pick((0.03, 0.06, 0.1, 0.15, 0.22), level)
    ycbcr = image @ _RGB_TO_YCBCR.T + rng.normal(0.0, 1.0, image.shape) * np.array([sd / 4, sd, sd])
    return ycbcr @ np.linalg.inv(_RGB_TO_YCBCR).T


def _impulse_noise(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper on each colour sample."""
    density = _pick((0.005, 0.015, 0.035, 0.07, 0.12), level)
    draws = rng.random(image.shape)
    noisy = image.copy()
    noisy[draws < density / 2] = 0.0
    noisy[(draws >= density / 2) & (draws < density)] = 1.0
    return noisy


def _multiplicative_noise(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Speckle: noise proportional to the signal."""
    sd = _pick((0.04, 0.08, 0.14, 0.22, 0.35), level)
    return image * (1.0 + rng.normal(0.0, sd, image.shape))


def _denoise(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """White noise removed by a Gaussian denoiser tuned to its level: residual blotches plus lost texture."""
    sd = _pick((0.02, 0.04, 0.07, 0.11, 0.16), level)
    sigma = 0.5 + 6.0 * sd
    return ndimage.gaussian_filter(image + rng.normal(0.0, sd, image.shape), (sigma, sigma, 0))


def _lightness_gamma(image: np.ndarray, gamma: float) -> np.ndarray:
    lab = rgb_to_lab(image)
    lab[..., 0] = 100.0 * np.clip(lab[..., 0] / 100.0, 0.0, 1.0) ** gamma
    return lab_to_rgb(lab)


def _brighten(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """A non-linear lift of CIELAB lightness (gamma below 1)."""
    return _lightness_gamma(image, 1.0 / _pick((1.25, 1.55, 1.95, 2.5, 3.3), level))


def _darken(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """A non-linear drop of CIELAB lightness (gamma above 1)."""
    return _lightness_gamma(image, _pick((1.25, 1.55, 1.95, 2.5, 3.3), level))


def _mean_shift(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """A constant added to every sample, up or down at random."""
    return image + rng.choice((-1.0, 1.0)) * _pick((0.05, 0.1, 0.16, 0.23, 0.32), level)


def _jitter(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Every pixel is replaced by a randomly displaced neighbour."""
    sd = _pick((0.35, 0.6, 1.0, 1.6, 2.5), level)
    height, width = image.shape[:2]
    rows = np.arange(height)[:, None] + np.rint(rng.normal(0.0, sd, (height, width))).astype(int)
    cols = np.arange(width)[None, :] + np.rint(rng.normal(0.0, sd, (height, width))).astype(int)
    return image[np.clip(rows, 0, height - 1), np.clip(cols, 0, width - 1)]


def _count(coverage: float, side: int, image: np.ndarray) -> int:
    """How many ``side`` x ``side`` squares cover ``coverage`` of the image (at least 1), at any image size."""
    return max(1, round(coverage * image.shape[0] * image.shape[1] / side**2))


def _squares(image: np.ndarray, side: int, coverage: float, rng: np.random.Generator) -> Iterator[tuple[int, int]]:
    """Top-left corners of random ``side`` x ``side`` squares covering about ``coverage`` of the image."""
    height, width = image.shape[:2]
    for _ in range(_count(coverage, side, image)):
        yield int(rng.integers(0, height - side)), int(rng.integers(0, width - side))


def _non_eccentricity_patch(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Small patches copied onto nearby positions."""
    height, width = image.shape[:2]
    side = max(3, min(height, width) // 12)
    damaged = image.copy()
    for row, col in _squares(image, side, _pick((0.03, 0.08, 0.16, 0.27, 0.42), level), rng):
        to_row = int(np.clip(row + rng.integers(-3 * side, 3 * side + 1), 0, height - side))
        to_col = int(np.clip(col + rng.integers(-3 * side, 3 * side + 1), 0, width - side))
        damaged[to_row : to_row + side, to_col : to_col + side] = image[row : row + side, col : col + side]
    return damaged


def _pixelate(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Box down-sampling then nearest-neighbour up-sampling: visible square blocks."""
    factor = _pick((2.0, 3.0, 4.0, 5.0, 7.0), level)
    height, width = image.shape[:2]
    small = _to_pil(image).resize((max(1, round(width / factor)), max(1, round(height / factor))), Image.Resampling.BOX)
    return _from_pil(small.resize((width, height), Image.Resampling.NEAREST))


def _quantization(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Few uniform levels per colour channel (posterisation)."""
    steps = _pick((20, 11, 7, 5, 3), level) - 1
    return np.rint(image * steps) / steps


def _color_block(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Solid squares of random colours pasted at random positions."""
    side = max(3, min(image.shape[:2]) // 10)
    blocked = image.copy()
    for row, col in _squares(image, side, _pick((0.02, 0.05, 0.1, 0.17, 0.27), level), rng):
        blocked[row : row + side, col : col + side] = rng.random(3)
    return blocked


def _high_sharpen(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Unsharp masking with a large gain: halos and amplified texture."""
    amount = _pick((0.5, 1.2, 2.2, 3.6, 6.0), level)
    return image + amount * (image - ndimage.gaussian_filter(image, (1.5, 1.5, 0)))


def _contrast_change(image: np.ndarray, level: int, rng: np.random.Generator) -> np.ndarray:
    """Contrast reduced towards the mean grey."""
    factor = _pick((0.75, 0.58, 0.42, 0.28, 0.16), level)
    mean = image.mean()
    return mean + (image - mean) * factor


DISTORTIONS: Mapping[int, DistortionType] = MappingProxyType(
    {
        1: DistortionType("gaussian blur", _gaussian_blur),
        2: DistortionType("lens blur", _lens_blur),
        3: DistortionType("motion blur", _motion_blur),
        4: DistortionType("color diffusion", _color_diffusion),
        5: DistortionType("color shift", _color_shift),
        6: DistortionType("color quantization", _color_quantization),
        7: DistortionType("color saturation 1 (HSV)", _color_saturation_hsv),
        8: DistortionType("color saturation 2 (LAB)", _color_saturation_lab),
        9: DistortionType("JPEG2000", _jpeg2000),
        10: DistortionType("JPEG", _jpeg),
        11: DistortionType("white noise", _white_noise),
        12: DistortionType("white noise in color component", _white_noise_color),
        13: DistortionType("impulse noise", _impulse_noise),
        14: DistortionType("multiplicative noise", _multiplicative_noise),
        15: DistortionType("denoise", _denoise),
        16: DistortionType("brighten", _brighten),
        17: DistortionType("darken", _darken),
        18: DistortionType("mean shift", _mean_shift),
        19: DistortionType("jitter", _jitter),
        20: DistortionType("non-eccentricity patch", _non_eccentricity_patch),
        21: DistortionType("pixelate", _pixelate),
        22: DistortionType("quantization", _quantization),
        23: DistortionType("color block", _color_block),
        24: DistortionType("high sharpen", _high_sharpen),
        25: DistortionType("contrast change", _contrast_change),
    }
)


def distort(image: np.ndarray, kind: int, level: int, rng: np.random.Generator) -> np.ndarray:
    """Distortion ``kind`` (KADID's number) at ``level`` 1..5 of a uint8 RGB image, as uint8 RGB."""
    if not 1 <= level <= LEVELS:
        raise ValueError(f"level must be 1..{LEVELS}, got {level}")
    return _to_uint8(DISTORTIONS[kind].apply(image.astype(np.float32) / np.float32(255.0), level, rng))


# ---------------------------------------------------------------- the MOS rule


class Appearance(NamedTuple):
    """What the MOS rule compares: luma in [0, 1], and CIELAB at half resolution (colour is seen coarsely)."""

    luma: np.ndarray
    lab: np.ndarray


def appearance(image: np.ndarray) -> Appearance:
    """The ``Appearance`` of a uint8 RGB image; colour is averaged over 2 x 2 pixels in linear light."""
    height, width = (image.shape[0] // 2) * 2, (image.shape[1] // 2) * 2
    linear = _LINEAR_OF_UINT8[image[:height, :width]]
    pooled = (linear[0::2, 0::2] + linear[1::2, 0::2] + linear[0::2, 1::2] + linear[1::2, 1::2]) * 0.25
    return Appearance(image @ (_LUMA / 255.0).astype(np.float32), _linear_to_lab(pooled))


def ssim(x: np.ndarray, y: np.ndarray, window: int = 7) -> float:
    """Mean SSIM of two 2-D images in [0, 1], in float32 for speed.

    The same as ``skimage.metrics.structural_similarity(x, y, data_range=1)``: 7 x 7 uniform window,
    sample covariances, K1 = 0.01, K2 = 0.03, the border half-window left out of the mean.
    """

    def local_mean(z: np.ndarray) -> np.ndarray:
        return ndimage.uniform_filter(z, window)

    x, y = x.astype(np.float32), y.astype(np.float32)
    unbias = window**2 / (window**2 - 1)
    mean_x, mean_y = local_mean(x), local_mean(y)
    var_x = unbias * (local_mean(x * x) - mean_x**2)
    var_y = unbias * (local_mean(y * y) - mean_y**2)
    cov = unbias * (local_mean(x * y) - mean_x * mean_y)
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2))
    border = window // 2
    return float(index[border:-border, border:-border].mean(dtype=np.float64))


def similarity(reference: np.ndarray | Appearance, distorted: np.ndarray | Appearance) -> tuple[float, float]:
    """(luma SSIM, mean CIEDE2000 colour difference at half resolution) of two uint8 RGB images."""
    ref = reference if isinstance(reference, Appearance) else appearance(reference)
    dist = distorted if isinstance(distorted, Appearance) else appearance(distorted)
    return ssim(ref.luma, dist.luma), float(deltaE_ciede2000(ref.lab, dist.lab).mean())


def objective_mos(ssim: float, delta_e: float) -> float:
    """Noise-free MOS in [1, 5] from the two similarities; 5 for an undistorted image (see module docstring)."""
    impairment = max(0.0, 1.0 - ssim) + delta_e / E_SCALE
    return 1.0 + 4.0 * float(np.exp(-((impairment / D_SCALE) ** D_POWER)))


def simulate_ratings(quality: float, rng: np.random.Generator, raters: int = RATERS) -> tuple[float, float]:
    """(mean, variance) of ``raters`` noisy integer ratings 1..5 of an image of MOS ``quality``."""
    ratings = np.clip(np.rint(quality + rng.normal(0.0, RATER_SD, raters)), 1, 5)
    return float(ratings.mean()), float(ratings.var(ddof=1))


# ---------------------------------------------------------------- references and the writer


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(_to_uint8(image))


def _from_pil(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    return np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def load_photograph(name: str) -> Image.Image:
    """One of ``PHOTOGRAPHS``, read from the scikit-image package folder (never downloaded)."""
    with Image.open(Path(skimage.__file__).parent / "data" / name) as photo:
        return photo.convert("RGB")


def random_crop(photo: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``size`` x ``size`` uint8 RGB crop at a random position and scale, mirrored half the time.

    Flat crops (luma standard deviation below ``MIN_CROP_CONTRAST``, e.g. the retina's black
    border) are redrawn; the most contrasted of ``CROP_TRIES`` draws is kept.
    """
    width, height = photo.size
    best, best_contrast = None, -1.0
    for _ in range(CROP_TRIES):
        side = int(rng.uniform(MIN_CROP_FRACTION, 1.0) * min(width, height))
        left, top = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        crop = photo.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(crop)
        contrast = float((pixels / 255.0 @ _LUMA).std())
        if contrast > best_contrast:
            best, best_contrast = pixels, contrast
        if contrast >= MIN_CROP_CONTRAST:
            break
    assert best is not None  # CROP_TRIES >= 1 draws, and the first always beats -1
    return best


def _write_csv_atomic(path: Path, rows: Iterable[dict]) -> None:
    """dmos.csv through a temporary file in the same folder, so readers never see half a file."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False, newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=["dist_img", "ref_img", "dmos", "var"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(stream.name, path)


def _write_reference_set(
    image_dir: Path, index: int, photo: Image.Image, size: int, kinds: Iterable[int], rng: np.random.Generator
) -> list[dict]:
    """Reference ``index`` and its distortions as PNGs; the dmos.csv rows of the distortions."""
    reference = random_crop(photo, size, rng)
    ref_name = f"I{index:02d}.png"
    Image.fromarray(reference).save(image_dir / ref_name, compress_level=1)
    seen = appearance(reference)
    rows = []
    for kind in kinds:
        for level in range(1, LEVELS + 1):
            distorted = distort(reference, kind, level, rng)
            name = f"I{index:02d}_{kind:02d}_{level:02d}.png"
            Image.fromarray(distorted).save(image_dir / name, compress_level=1)
            mean, variance = simulate_ratings(objective_mos(*similarity(seen, distorted)), rng)
            rows.append({"dist_img": name, "ref_img": ref_name, "dmos": f"{mean:.4f}", "var": f"{variance:.4f}"})
    return rows


def write_natural_dataset(
    output_dir: str | Path,
    n_refs: int = 12,
    size: int = 128,
    seed: int = 0,
    kinds: Iterable[int] | None = None,
    workers: int | None = None,
) -> Path:
    """Write a KADID-10k-layout dataset of ``n_refs`` references x distortion ``kinds`` x 5 levels.

    ``kinds`` are KADID distortion numbers (default: all of ``DISTORTIONS``). References cycle
    through the photographs in a seeded order. ``workers`` threads (default: one per CPU) write
    references side by side; numpy, SciPy and Pillow release the GIL in their heavy loops, and
    every reference has its own random generator, so the files do not depend on ``workers``.
    Returns ``Path(output_dir)``.
    """
    if not 1 <= n_refs <= 99:
        raise ValueError(f"n_refs must be 1..99 (two-digit KADID names), got {n_refs}")
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    kinds = sorted(DISTORTIONS if kinds is None else set(kinds))
    unknown = set(kinds) - set(DISTORTIONS)
    if unknown:
        raise ValueError(f"unknown distortion number(s) {sorted(unknown)}; known: {sorted(DISTORTIONS)}")
    root = Path(output_dir)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    order_seed, *reference_seeds = np.random.SeedSequence(seed).spawn(n_refs + 1)
    order = np.random.default_rng(order_seed).permutation(len(PHOTOGRAPHS))
    names = [PHOTOGRAPHS[order[index % len(PHOTOGRAPHS)]] for index in range(n_refs)]
    photos = {name: load_photograph(name) for name in set(names)}

    def write_one(index: int) -> list[dict]:
        rng = np.random.default_rng(reference_seeds[index])
        return _write_reference_set(image_dir, index + 1, photos[names[index]], size, kinds, rng)

    with ThreadPoolExecutor(max(1, min(workers or os.cpu_count() or 1, n_refs))) as pool:
        rows = [row for reference_rows in pool.map(write_one, range(n_refs)) for row in reference_rows]
    _write_csv_atomic(root / "dmos.csv", rows)
    return root
