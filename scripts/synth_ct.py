"""Synthetic low-dose CT slices with simulated radiologists' scores, in the LDCTIQA layouts.

A stand-in for the LDCTIQA data (which users download themselves) that installs offline, for the
demo and the tests. Each slice goes through three steps, batched in torch:

1. Anatomy. Either a real CT slice that ships with pydicom (``CT_small.dcm``, a thorax crop) or
   with pydicom-data (``693_UNCI.dcm``, a head; the two frames of ``eCT_Supplemental.dcm``, a
   brain completed with a skull), converted to HU and randomly rotated, flipped, zoomed, shifted,
   elastically deformed and given a few small lesions; or an analytic abdomen (or lower thorax)
   of ellipses with realistic HU: air -1000, lung -850, fat -100, soft tissue 40, liver 60,
   contrast vessels 150-250, bone 700. No two slices are alike.
2. Scan. HU -> linear attenuation ``mu = MU_WATER * (1 + HU / 1000)`` at a pixel size of
   ``0.7 mm * 512 / size``; parallel-beam projection over ``views`` angles in [0, pi); photon
   counts ``I ~ Poisson(I0 * exp(-p)) + N(0, electronic noise)``; ``-log(I / I0)``; filtered
   back-projection (Hann-windowed ramp); back to HU; the LDCTIQA window [-1000, 400] HU -> [0, 1].
   The tube output I0 (per view and detector bin) is drawn log-uniformly over ``dose_range`` (a
   fraction of the full dose); the view count is a full scan's (:func:`full_views`, about one per
   detector bin) divided by a step drawn from ``view_steps``: fewer views give streaks and, at the
   same I0 per view, also fewer photons, so more noise.
3. Score: the degradation actually present in the slice is measured against noise-free scans:
   ``noise`` = std in HU of (reconstruction - noise-free reconstruction at the same views) and
   ``streaks`` = RMS in HU of (noise-free reconstruction at these views - noise-free
   reconstruction at full views), both inside the body. The latent quality is
   ``q = clip(4.3 - log2(d / 8 HU), 0, 4)`` with the combined degradation
   ``d = sqrt(noise**2 + (1.5 * streaks)**2)`` (d = 10 HU gives 4, 20 HU 3, 40 HU 2, 80 HU 1,
   160 HU and more 0): it falls with lower dose and with fewer views. Five raters, each with a
   fixed bias ~ N(0, 0.15) and a fresh error ~ N(0, 0.5) per slice, give integer ratings
   ``clip(rint(q + bias + error), 0, 4)``; the score is their mean (a multiple of 0.2), as in
   LDCTIQA's training set.

The default spread (dose 1/30 to 1, half the slices at full views, the rest at 1/2 to 1/8)
gives scores over the whole 0..4 range, and a small CNN learns them (PLCC and SROCC about 0.95 on
held-out slices at 128 px after a few epochs). Everything is drawn from numpy generators and a
``torch.Generator`` seeded with ``seed``: the same seed gives the same files and labels.
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch
import torch.nn.functional as F
from scipy import ndimage

from scripts.ct_io import frames_hu, window_hu
from scripts.data import write_json_atomic

logger = logging.getLogger(__name__)

MU_WATER = 0.02  # linear attenuation of water at about 70 keV, 1/mm
PIXEL_MM_512 = 0.7  # pixel size of a 512 px slice, mm
SOURCE_FILES = ("CT_small.dcm", "693_UNCI.dcm", "eCT_Supplemental.dcm")
I0_FULL_256 = 2.0e5  # photons per view and detector bin at full dose and 256 px (scales with size)
ELECTRONIC_NOISE = 5.0  # sd of the additive Gaussian noise on the counts at 256 px (scales with size, as I0)
ECT_PIXEL_MM = 0.388672  # pixel spacing of eCT_Supplemental.dcm
DOSE_RANGE = (1 / 30, 1.0)  # fraction of the full tube output, drawn log-uniformly
VIEW_STEPS = (1, 2, 3, 4, 6, 8)  # keep every step-th view of a full scan
VIEW_WEIGHTS = (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)
QUALITY_TOP, QUALITY_SLOPE, QUALITY_REF_HU, STREAK_WEIGHT = 4.3, 1.0, 8.0, 1.5
RATERS, RATER_BIAS_SD, RATER_NOISE_SD = 5, 0.15, 0.5
BATCH = 32  # slices simulated together
STREAMS = ("plan", "anatomy", "raters")  # independent random streams of one seed

# ---------------------------------------------------------------- sources


def _complete_head(hu: np.ndarray, pixel_mm: float) -> np.ndarray:
    """A skull-stripped brain (eCT_Supplemental) made a head: holes to CSF, a 6 mm skull and a 4 mm scalp."""
    brain = ndimage.binary_fill_holes(hu > -500)
    hu = np.where(brain & (hu < -500), 10.0, hu)
    distance = ndimage.distance_transform_edt(~brain) * pixel_mm
    hu = np.where((distance > 0) & (distance <= 6), 800.0, hu)
    return np.where((distance > 6) & (distance <= 10), 30.0, hu).astype(np.float32)


@functools.lru_cache(maxsize=1)
def load_sources() -> tuple[np.ndarray, ...]:
    """The real CT slices that install offline, in HU clipped to [-1000, 3000]; read once per process.

    ``CT_small.dcm`` ships with pydicom; the others need the pydicom-data package and are skipped,
    with a warning, where it is missing (the analytic phantoms still work).
    """
    import pydicom
    from pydicom.data import get_testdata_file

    slices = []
    for name in SOURCE_FILES:
        path = get_testdata_file(name, download=False)
        if path is None:
            logger.warning("%s not found (install pydicom-data): synthetic CT uses fewer real slices", name)
            continue
        for hu in frames_hu(pydicom.dcmread(path)):
            slices.append(np.clip(_complete_head(hu, ECT_PIXEL_MM) if name.startswith("eCT") else hu, -1000, 3000))
    return tuple(s.astype(np.float32) for s in slices)


def _placement(hu: np.ndarray) -> tuple[float, float, float]:
    """Where a slice's tissue sits, in FOV units: its centroid (x, y) and the largest distance from it,
    or (0, 0, inf) for a crop whose tissue reaches the image border (no outline of its own)."""
    tissue = hu > -500
    if tissue[[0, -1], :].mean() > 0.01 or tissue[:, [0, -1]].mean() > 0.01:
        return 0.0, 0.0, math.inf
    centre = _pixel_centres(len(hu))
    y, x = centre[np.nonzero(tissue)[0]], centre[np.nonzero(tissue)[1]]
    cx, cy = x.mean(), y.mean()
    return float(cx), float(cy), float(np.sqrt((x - cx) ** 2 + (y - cy) ** 2).max())


@functools.lru_cache(maxsize=4)
def _source_stack(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sources resized (anti-aliased) to ``size`` as HU + 1000, so that zero padding is air:
    (S, 1, size, size); and their placements (S, 3), as :func:`_placement`."""
    sources = load_sources()
    resized = [
        F.interpolate(torch.from_numpy(s + 1000.0)[None, None], size=(size, size), mode="bilinear", antialias=True)
        for s in sources
    ]
    stack = torch.cat(resized) if resized else torch.zeros(0, 1, size, size)
    return stack, torch.tensor([_placement(s) for s in sources], dtype=torch.float32).reshape(-1, 3)


# ---------------------------------------------------------------- anatomy


def _ellipse(rng: np.random.Generator, centre: Sequence[float], axes: Sequence[float], hu: float) -> list[float]:
    """One ellipse row (cx, cy, ax, ay, angle, hu), jittered a little."""
    (dx, dy), (sx, sy) = rng.normal(0.0, 0.02, 2), rng.uniform(0.85, 1.15, 2)
    return [centre[0] + dx, centre[1] + dy, axes[0] * sx, axes[1] * sy, rng.uniform(-0.4, 0.4), hu]


def _phantom_ellipses(rng: np.random.Generator, count: int = 32) -> np.ndarray:
    """An abdomen (or, one time in four, a lower thorax) as ellipses painted in order, in FOV units [-1, 1].

    Returns ``(count, 6)`` rows (cx, cy, ax, ay, angle, hu); unused rows have zero axes.
    """
    cx, cy = rng.uniform(-0.05, 0.05, 2)
    ax = rng.uniform(0.6, 0.88)
    ay = ax * rng.uniform(0.65, 0.85)
    tilt = rng.uniform(-0.1, 0.1)
    fat, wall = rng.uniform(0.03, 0.14), rng.uniform(0.04, 0.07)
    rows = [
        [cx, cy, ax, ay, tilt, rng.normal(-100, 8)],  # subcutaneous fat
        [cx, cy, ax * (1 - fat), ay * (1 - fat), tilt, rng.normal(45, 5)],  # muscle wall
        [cx, cy, ax * (1 - fat - wall), ay * (1 - fat - wall), tilt, rng.normal(-90, 10)],  # visceral fat
    ]

    def at(rx: float, ry: float) -> tuple[float, float]:  # body-relative position -> FOV units
        x, y = rx * ax, ry * ay
        return cx + x * math.cos(tilt) - y * math.sin(tilt), cy + x * math.sin(tilt) + y * math.cos(tilt)

    if rng.random() < 0.25:  # lower thorax: lungs and heart
        rows += [
            _ellipse(rng, at(side * 0.42, -0.05), (0.36 * ax, 0.55 * ay), rng.normal(-850, 30)) for side in (-1, 1)
        ]
        rows.append(_ellipse(rng, at(0.08, -0.15), (0.3 * ax, 0.35 * ay), rng.normal(40, 5)))
    else:  # abdomen: liver, spleen, kidneys, bowel
        rows.append(_ellipse(rng, at(-0.35, -0.1), (0.42 * ax, 0.5 * ay), rng.normal(60, 6)))
        rows.append(_ellipse(rng, at(0.5, -0.15), (0.16 * ax, 0.24 * ay), rng.normal(50, 5)))
        kidney_hu = rng.choice([30.0, 150.0])
        rows += [_ellipse(rng, at(side * 0.3, 0.35), (0.11 * ax, 0.16 * ay), kidney_hu) for side in (-1, 1)]
        for _ in range(int(rng.integers(2, 7))):
            hu = rng.choice([-1000.0, 15.0, 35.0, -100.0])
            rows.append(_ellipse(rng, at(*rng.uniform([-0.1, -0.5], [0.5, 0.2])), rng.uniform(0.04, 0.14, 2), hu))
    for _ in range(int(rng.integers(0, 4))):  # lesions, hypo- or hyper-dense
        rows.append(_ellipse(rng, at(*rng.uniform(-0.4, 0.3, 2)), rng.uniform(0.02, 0.06, 2), rng.normal(40, 40)))
    vessel_hu = rng.uniform(40, 250)
    rows.append(_ellipse(rng, at(0.06, 0.3), (0.045, 0.045), vessel_hu))  # aorta
    rows.append(_ellipse(rng, at(-0.12, 0.28), (0.05, 0.04), vessel_hu * 0.8))  # vena cava
    rows.append([*at(0.0, 0.84), 0.15 * ax, 0.06 * ay, tilt, 650.0])  # posterior vertebral arch
    rows.append([*at(0.0, 0.6), 0.12 * ax, 0.13 * ay, tilt, 700.0])  # vertebral body, cortex
    rows.append([*at(0.0, 0.6), 0.09 * ax, 0.1 * ay, tilt, rng.normal(220, 30)])  # cancellous bone
    rows.append([*at(0.0, 0.78), 0.035, 0.03, 0.0, 20.0])  # spinal canal
    for angle in rng.uniform(0.3, 2.8, int(rng.integers(0, 7))):  # ribs, near the muscle wall
        rx, ry = math.cos(angle) * (1 - fat - wall / 2), math.sin(angle) * (1 - fat - wall / 2)
        rows.append([*at(rx, ry), 0.025, 0.02, 0.0, 600.0])
    table = np.zeros((count, 6))
    table[: min(count, len(rows))] = np.asarray(rows[:count], dtype=float)
    return table


def _lesion_ellipses(rng: np.random.Generator, count: int = 4) -> np.ndarray:
    """A few small random inserts for a real slice, as :func:`_phantom_ellipses` rows (unused rows zero)."""
    table = np.zeros((count, 6))
    for row in range(int(rng.integers(1, count + 1))):
        table[row] = [*rng.uniform(-0.45, 0.45, 2), *rng.uniform(0.015, 0.06, 2), rng.uniform(0, math.pi), 0.0]
        table[row, 5] = rng.choice([-100.0, 10.0, 80.0, 200.0, 600.0])
    return table


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres in FOV units [-1, 1] (x across, y down), as (size, size) tensors."""
    c = (torch.arange(size, dtype=torch.float32) * 2 + 1) / size - 1
    return c[None, :].expand(size, size), c[:, None].expand(size, size)


def _paint(hu: torch.Tensor, ellipses: torch.Tensor, tissue_only: bool = False) -> torch.Tensor:
    """Paint ellipses (B, K, 6) over HU images (B, N, N) in order, edges anti-aliased over about a pixel.

    Cheap enough for hundreds of slices: each ellipse's quadratic form is separable except for one
    outer product, and ``1 - r**2`` (about ``2 (1 - r)`` at the edge) stands in for the distance.
    """
    size = hu.shape[-1]
    centre = torch.from_numpy(_pixel_centres(size)).float()
    cx, cy, ax, ay, angle, value = ellipses.float().unbind(-1)
    active = ax > 0
    cx = torch.where(active, cx, torch.full_like(cx, 100.0))  # unused rows: far outside the image
    ax, ay = ax.clamp_min(1e-3), ay.clamp_min(1e-3)
    cos, sin = torch.cos(angle), torch.sin(angle)
    sharp = torch.minimum(ax, ay) * size / 4
    xx = (cos**2 / ax**2 + sin**2 / ay**2) * sharp
    yy = (sin**2 / ax**2 + cos**2 / ay**2) * sharp
    xy = 2 * cos * sin * (1 / ax**2 - 1 / ay**2) * sharp
    extent = torch.maximum(ax, ay) + 2.0 / size
    hu = hu.clone()
    for k in range(ellipses.shape[1]):
        on = active[:, k]
        if not on.any():
            continue
        # only the rows and columns that some slice's ellipse k can reach
        (r0, r1), (c0, c1) = (_span(centre, c[on, k], extent[on, k]) for c in (cy, cx))
        dx, dy = centre[c0:c1] - cx[:, k, None], centre[r0:r1] - cy[:, k, None]  # (B, n) across and down
        across = (sharp[:, k, None] + 0.5 - xx[:, k, None] * dx**2)[:, None, :]
        down = (yy[:, k, None] * dy**2)[:, :, None]
        weight = (across - down).sub_((xy[:, k, None] * dy)[:, :, None] * dx[:, None, :]).clamp_(0.0, 1.0)
        block = hu[:, r0:r1, c0:c1]
        if tissue_only:
            weight.mul_(block > -300)
        block.lerp_(value[:, k, None, None].expand_as(block), weight)
    return hu


def _span(centre: torch.Tensor, middle: torch.Tensor, extent: torch.Tensor) -> tuple[int, int]:
    """The index range of pixel centres within ``extent`` of any of the ``middle`` positions."""
    low, high = (middle - extent).min(), (middle + extent).max()
    return int(torch.searchsorted(centre, low)), int(torch.searchsorted(centre, high, right=True))


def _smooth_field(
    rng: np.random.Generator, batch: int, channels: int, size: int, knots: int, sd: float
) -> torch.Tensor:
    """A smooth random field (B, C, size, size): Gaussian knots on a coarse grid, upsampled bicubically."""
    coarse = torch.from_numpy(rng.normal(0.0, sd, (batch, channels, knots, knots)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)


def _warped_sources(rng: np.random.Generator, source: np.ndarray, size: int) -> torch.Tensor:
    """Real slices ``source`` (indices) rotated, flipped, zoomed, shifted and elastically deformed: (B, N, N) HU.

    A slice with its own outline (a head) is centred and zoomed to a radius of 0.55-0.9 of the field;
    a crop (CT_small) is zoomed 0.75-1.15 and cut to an elliptical body, air outside.
    """
    batch = len(source)
    stack, placement = _source_stack(size)
    cx, cy, extent = placement[torch.from_numpy(source)].unbind(-1)
    angle, flip, radius, zoom, shift_x, shift_y, axis_x, axis_y = (
        torch.from_numpy(values).float()
        for values in (
            rng.uniform(0, 2 * math.pi, batch),
            rng.choice([-1.0, 1.0], batch),
            rng.uniform(0.55, 0.9, batch),
            rng.uniform(0.75, 1.15, batch),
            *rng.uniform(-0.06, 0.06, (2, batch)),
            *rng.uniform(0.6, 0.95, (2, batch)),
        )
    )
    outlined = torch.isfinite(extent)
    zoom = torch.where(outlined, radius / torch.where(outlined, extent, 1.0), zoom)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # output (x, y) reads the source at A (x, y) + t; the tissue centroid lands on the shift
    a11, a12, a21, a22 = cos * flip, -sin, sin * flip, cos
    t1, t2 = cx - a11 * shift_x - a12 * shift_y, cy - a21 * shift_x - a22 * shift_y
    theta = torch.stack([torch.stack([a11, a12, t1], -1), torch.stack([a21, a22, t2], -1)], 1)
    grid = F.affine_grid(theta, [batch, 1, size, size], align_corners=False)
    strength = torch.from_numpy(rng.uniform(0, 0.03, (batch, 1, 1, 1))).float()
    grid = grid + (_smooth_field(rng, batch, 2, size, 5, 1.0) * strength).permute(0, 2, 3, 1)
    hu = F.grid_sample(stack[torch.from_numpy(source)], grid, align_corners=False)[:, 0] - 1000.0
    # a crop's body outline stays inside the rotated source square
    scale = torch.where(outlined, 2.0, zoom.clamp(max=1.0))[:, None, None]
    x, y = _grid(size)
    inside = (x / (axis_x[:, None, None] * scale)) ** 2 + (y / (axis_y[:, None, None] * scale)) ** 2 <= 1
    hu = torch.where(inside, hu, torch.full_like(hu, -1000.0))
    lesions = torch.from_numpy(np.stack([_lesion_ellipses(rng) for _ in range(batch)])).float()
    return _paint(hu, lesions, tissue_only=True)


def _phantoms(rng: np.random.Generator, batch: int, size: int) -> torch.Tensor:
    """Analytic abdomens/thoraces (B, N, N) in HU, with a faint smooth texture in the tissue."""
    ellipses = torch.from_numpy(np.stack([_phantom_ellipses(rng) for _ in range(batch)])).float()
    hu = _paint(torch.full((batch, size, size), -1000.0), ellipses)
    texture = _smooth_field(rng, batch, 1, size, 16, 8.0)[:, 0]
    return hu + texture * (hu > -300)


def make_anatomy(rng: np.random.Generator, source: np.ndarray, size: int) -> torch.Tensor:
    """Noise-free slices (B, N, N) in HU inside the scanner's circle: ``source`` -1 for a phantom, else a real slice."""
    hu = torch.full((len(source), size, size), -1000.0)
    real = source >= 0
    if real.any():
        hu[torch.from_numpy(real)] = _warped_sources(rng, source[real], size)
    if (~real).any():
        hu[torch.from_numpy(~real)] = _phantoms(rng, int((~real).sum()), size)
    x, y = _grid(size)
    return torch.where(x**2 + y**2 < 0.97**2, hu, torch.full_like(hu, -1000.0)).clamp(-1000.0, 3000.0)


# ---------------------------------------------------------------- scanner


def pixel_mm(size: int) -> float:
    """Pixel (and detector bin) size in mm: a 358 mm field of view whatever ``size``."""
    return PIXEL_MM_512 * 512 / size


def full_views(size: int) -> int:
    """Views of a full scan at ``size`` px: about one per detector bin, a multiple of 24 so that the
    view steps 1, 2, 3, 4, 6 and 8 divide it (pi/2 per bin would avoid all aliasing; noise hides the rest)."""
    return 24 * math.ceil(size / 24)


def _angles(views: int) -> np.ndarray:
    return np.arange(views) * (math.pi / views)


def _pixel_centres(size: int) -> np.ndarray:
    return (np.arange(size) * 2 + 1) / size - 1


def _csr(rows: np.ndarray, columns: np.ndarray, values: np.ndarray, shape: tuple[int, int]) -> torch.Tensor:
    """A torch sparse CSR matrix from numpy arrays (int32 indices: half the memory of int64)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        tensors = (torch.from_numpy(a.ravel()) for a in (rows, columns, values))
        return torch.sparse_csr_tensor(*tensors, size=shape)


def _taps(position: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation at fractional indices ``position`` into ``size`` samples: the two neighbours
    (clipped into range) and their weights (zero outside), on a new last axis of 2."""
    first = np.floor(position)
    weight = (position - first).astype(np.float32)
    index = np.stack([first, first + 1], -1)
    weights = np.stack([1 - weight, weight], -1)
    weights[(index < 0) | (index > size - 1)] = 0.0
    return np.clip(index, 0, size - 1).astype(np.int32), weights


@functools.lru_cache(maxsize=2)
def _projector(size: int) -> torch.Tensor:
    """Joseph's ray-driven projector of a full scan as a sparse CSR matrix (views * size, size * size).

    Each ray (one per view and detector bin, a pixel apart) crosses the image row by row (or
    column by column where it runs closer to horizontal), reading two pixels by linear
    interpolation, weighted by the path length per step (in pixels). One sparse matrix product
    then projects a whole batch, far faster than rotating images.
    """
    views, centre = full_views(size), _pixel_centres(size)
    columns = np.empty((views, size, size, 2), np.int32)  # (view, bin, step along the ray, tap)
    values = np.empty((views, size, size, 2), np.float32)
    steps = np.arange(size)[None, :, None]
    for view, angle in enumerate(_angles(views)):
        cos, sin = math.cos(angle), math.sin(angle)
        steep = abs(cos) >= abs(sin)  # the ray (-sin, cos) crosses every row once
        major, minor = (cos, sin) if steep else (sin, cos)
        position = ((centre[:, None] - centre[None, :] * minor) / major + 1) * size / 2 - 0.5
        index, weights = _taps(position, size)
        columns[view] = steps * size + index if steep else steps + index * size
        values[view] = weights / abs(major)
    rows = np.arange(0, values.size + 1, 2 * size, dtype=np.int32)
    return _csr(rows, columns, values, (views * size, size * size))


@functools.lru_cache(maxsize=4)
def _backprojector(size: int, step: int, stride: int, chunk: int = 24) -> torch.Tensor:
    """Pixel-driven back-projection of every ``step``-th view of a full scan onto every ``stride``-th pixel
    (each way), as a sparse CSR matrix (points, views // step * size): each pixel reads each view at its
    detector position ``x cos + y sin`` by linear interpolation."""
    angles = _angles(full_views(size))[::step]
    centre = _pixel_centres(size)[::stride]
    x, y = (t.reshape(-1, 1).astype(np.float32) for t in np.meshgrid(centre, centre))
    columns = np.empty((len(x), len(angles), 2), np.int32)  # (point, view, tap)
    values = np.empty((len(x), len(angles), 2), np.float32)
    for start in range(0, len(angles), chunk):
        part = slice(start, start + chunk)
        cos, sin = np.cos(angles[part]).astype(np.float32), np.sin(angles[part]).astype(np.float32)
        index, values[:, part] = _taps((cos * x + sin * y + 1) * (size / 2) - 0.5, size)
        columns[:, part] = np.arange(len(angles))[part, None] * size + index
    rows = np.arange(0, values.size + 1, 2 * len(angles), dtype=np.int32)
    return _csr(rows, columns, values, (len(x), len(angles) * size))


def _apply(matrix: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """``matrix @ item`` for every item of a batch (B, ...), flattened: (B, rows)."""
    return (matrix @ batch.reshape(len(batch), -1).T.contiguous()).T


def project(mu: torch.Tensor) -> torch.Tensor:
    """Parallel-beam line integrals (B, views, N) of a full scan of attenuation images (B, N, N) in 1/mm."""
    size = mu.shape[-1]
    return _apply(_projector(size), mu).reshape(len(mu), full_views(size), size) * pixel_mm(size)


@functools.lru_cache(maxsize=8)
def _ramp(bins: int, hann: bool) -> torch.Tensor:
    """The ramp filter's frequency response for ``bins`` detector bins, zero-padded to avoid wrap-around.

    Built from the band-limited spatial ramp (Ram-Lak: 1/4 at 0, -1/(pi n)^2 at odd n), which keeps the
    DC term right; optionally times a Hann window, softening the noise as a soft-tissue kernel does.
    """
    padded = 2 ** math.ceil(math.log2(2 * bins))
    n = torch.cat([torch.arange(0, padded // 2 + 1), torch.arange(-(padded // 2) + 1, 0)]).double()
    kernel = torch.where(n % 2 == 1, -1.0 / (math.pi * n) ** 2, torch.zeros_like(n))
    kernel[0] = 0.25
    response = torch.fft.rfft(kernel).real
    if hann:
        response = response * (0.5 + 0.5 * torch.cos(2 * math.pi * torch.fft.rfftfreq(padded, dtype=torch.float64)))
    return response.float()


def filter_sinogram(sinogram: torch.Tensor, hann: bool = True) -> torch.Tensor:
    """Ramp-filtered projections (B, V, D), per mm (the FFT runs along the detector)."""
    bins = sinogram.shape[-1]
    response = _ramp(bins, hann)
    padded = 2 * (len(response) - 1)
    spectrum = torch.fft.rfft(sinogram, n=padded, dim=-1) * response
    return torch.fft.irfft(spectrum, n=padded, dim=-1)[..., :bins] / pixel_mm(bins)


def fbp(sinogram: torch.Tensor, hann: bool = True, stride: int = 1) -> torch.Tensor:
    """Filtered back-projection of (B, V, D) line integrals over [0, pi), V dividing a full scan's views:
    attenuation images (B, D, D), or on every ``stride``-th pixel each way."""
    batch, views, size = sinogram.shape
    if full_views(size) % views:
        raise ValueError(f"{views} views do not divide the {full_views(size)} views of a full scan")
    matrix = _backprojector(size, full_views(size) // views, stride)
    image = _apply(matrix, filter_sinogram(sinogram, hann)) * (math.pi / views)
    side = len(range(0, size, stride))
    return image.reshape(batch, side, side)


def hu_to_mu(hu: torch.Tensor) -> torch.Tensor:
    """Linear attenuation (1/mm) of HU, air (-1000 HU and below) as zero."""
    return (MU_WATER * (1.0 + hu / 1000.0)).clamp_min(0.0)


def mu_to_hu(mu: torch.Tensor) -> torch.Tensor:
    """HU of linear attenuation (1/mm)."""
    return (mu / MU_WATER - 1.0) * 1000.0


def noisy_sinogram(sinogram: torch.Tensor, i0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Line integrals after photon counting: ``-log(I / I0)`` with ``I ~ Poisson(I0 exp(-p)) + N(0, e)``.

    ``i0`` (B,) is the unattenuated count per view and bin; the electronic noise ``e`` scales with
    the bin size. Counts are floored at one photon (photon starvation gives the usual dark streaks).
    """
    i0 = i0.reshape(-1, 1, 1)
    counts = torch.poisson(i0 * torch.exp(-sinogram), generator=generator)
    noise = torch.randn(sinogram.shape, generator=generator) * (ELECTRONIC_NOISE * sinogram.shape[-1] / 256)
    return -torch.log((counts + noise).clamp_min(1.0) / i0)


# ---------------------------------------------------------------- scan, measure, rate, write


def _body_rms(difference_hu: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """RMS (B,) of HU differences (B, H, W) over the body (B, H, W)."""
    return torch.sqrt((difference_hu**2 * body).sum((1, 2)) / body.sum((1, 2)).clamp_min(1.0))


def scan(
    hu: torch.Tensor, dose: np.ndarray, step: np.ndarray, generator: torch.Generator, hann: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Low-dose scans of noise-free slices (B, N, N) in HU: the reconstructions in HU and, per slice,
    the measured noise and streak levels in HU (see the module docstring).

    ``dose`` (B,) is the fraction of the full tube output, ``step`` (B,) keeps every step-th view of a
    full scan. The noise and streaks are measured on every 4th pixel each way (body only): a sixteenth
    of the cost of a full reconstruction, and a close estimate of the RMS.
    """
    size = hu.shape[-1]
    sinogram = project(hu_to_mu(hu))
    i0 = torch.from_numpy(np.asarray(dose, dtype=np.float32)) * (I0_FULL_256 * size / 256)
    body = (hu[:, ::4, ::4] > -300).float()
    recon = torch.empty_like(hu)
    noise_hu, streak_hu = torch.zeros(len(hu)), torch.zeros(len(hu))
    for value in np.unique(step):
        members = torch.from_numpy(np.flatnonzero(step == value))
        full = sinogram[members]
        sparse = full[:, :: int(value)]
        noisy = noisy_sinogram(sparse, i0[members], generator)
        recon[members] = mu_to_hu(fbp(noisy, hann))
        noise = fbp(noisy - sparse, hann, stride=4) * (1000 / MU_WATER)
        noise_hu[members] = _body_rms(noise, body[members])
        if value > 1:
            streaks = (fbp(sparse, hann, stride=4) - fbp(full, hann, stride=4)) * (1000 / MU_WATER)
            streak_hu[members] = _body_rms(streaks, body[members])
    return recon, noise_hu, streak_hu


def latent_quality(noise_hu: np.ndarray, streak_hu: np.ndarray) -> np.ndarray:
    """Quality 0..4 from the measured noise and streak levels (HU): lower for more of either."""
    degradation = np.sqrt(np.asarray(noise_hu) ** 2 + (STREAK_WEIGHT * np.asarray(streak_hu)) ** 2)
    return np.clip(QUALITY_TOP - QUALITY_SLOPE * np.log2(np.maximum(degradation, 1e-3) / QUALITY_REF_HU), 0.0, 4.0)


def rate(quality: np.ndarray, rng: np.random.Generator, raters: int = RATERS) -> np.ndarray:
    """Mean of ``raters`` integer ratings 0..4, each rater with a fixed bias and a fresh error per slice."""
    bias = rng.normal(0.0, RATER_BIAS_SD, raters)
    error = rng.normal(0.0, RATER_NOISE_SD, (len(quality), raters))
    ratings = np.clip(np.rint(np.asarray(quality)[:, None] + bias + error), 0, 4)
    return np.round(ratings.mean(1), 1)


def simulate_batches(
    n: int,
    size: int = 256,
    seed: int = 0,
    *,
    dose_range: tuple[float, float] = DOSE_RANGE,
    view_steps: Sequence[int] = VIEW_STEPS,
    view_weights: Sequence[float] | None = VIEW_WEIGHTS,
    phantom_fraction: float = 0.5,
    hann: bool = True,
    batch: int = BATCH,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield the slices batch by batch: dicts of ``index``, ``image`` (windowed, float32 numpy), ``hu``
    (noise-free truth), ``dose``, ``views``, ``noise_hu`` and ``streak_hu``.

    The plan (source, dose, views per slice) is drawn first, so a slice does not depend on ``batch``
    except through the order of the random draws.
    """
    plan, anatomy = _stream(seed, "plan"), _stream(seed, "anatomy")
    generator = torch.Generator().manual_seed(seed)
    real = len(_source_stack(size)[0])
    if full_views(size) % math.lcm(*view_steps):
        raise ValueError(f"view steps {tuple(view_steps)} must divide the {full_views(size)} views of a full scan")
    weights = None if view_weights is None else np.asarray(view_weights, dtype=float) / np.sum(view_weights)
    source = np.where((plan.random(n) < phantom_fraction) | (real == 0), -1, plan.integers(0, max(real, 1), n))
    dose = np.exp(plan.uniform(math.log(dose_range[0]), math.log(dose_range[1]), n))
    step = plan.choice(np.asarray(view_steps), n, p=weights)
    order = np.argsort(step, kind="stable")  # batches of one view count share a back-projector
    for start in range(0, n, batch):
        part = order[start : start + batch]
        hu = make_anatomy(anatomy, source[part], size)
        recon, noise_hu, streak_hu = scan(hu, dose[part], step[part], generator, hann)
        yield {
            "index": part,
            "image": window_hu(recon).numpy().astype(np.float32),
            "hu": hu.numpy(),
            "dose": dose[part],
            "views": full_views(size) // step[part],
            "noise_hu": noise_hu.numpy(),
            "streak_hu": streak_hu.numpy(),
        }


def _stream(seed: int, name: str) -> np.random.Generator:
    """One of the independent random streams of ``seed`` (see ``STREAMS``)."""
    return np.random.default_rng(np.random.SeedSequence(seed).spawn(len(STREAMS))[STREAMS.index(name)])


def _scores(noise_hu: np.ndarray, streak_hu: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Latent quality and the raters' mean scores, the raters drawn from their own stream of ``seed``."""
    quality = latent_quality(noise_hu, streak_hu)
    return quality, rate(quality, _stream(seed, "raters"))


def synthesize_slices(n: int, size: int = 256, seed: int = 0, **options: Any) -> dict[str, np.ndarray]:
    """All slices in memory, in index order: ``image`` (n, size, size) in [0, 1], ``score`` (n,) and the
    per-slice ``dose``, ``views``, ``noise_hu``, ``streak_hu`` and ``quality``. Options as
    :func:`simulate_batches`."""
    parts = list(simulate_batches(n, size, seed, **options))
    order = np.argsort(np.concatenate([p["index"] for p in parts]))
    keys = ("image", "dose", "views", "noise_hu", "streak_hu")
    out = {key: np.concatenate([p[key] for p in parts])[order] for key in keys}
    out["quality"], out["score"] = _scores(out["noise_hu"], out["streak_hu"], seed)
    return out


def write_ct_dataset(
    output_dir: str | Path, n: int = 600, size: int = 256, seed: int = 0, layout: str = "train", **options: Any
) -> Path:
    """Write ``n`` synthetic slices in the LDCTIQA layout and return ``Path(output_dir)``.

    ``layout="train"``: ``image/NNNN.tif`` + ``train.json``; ``layout="test"``: ``images/testNNN.tiff``
    + ``test.json``. Each label file is a flat map ``{"0000.tif": 2.8, ...}`` of scores 0..4, written
    atomically after all images. Options as :func:`simulate_batches`.
    """
    if layout not in ("train", "test"):
        raise ValueError(f"layout must be 'train' or 'test', got {layout!r}")
    root = Path(output_dir)
    image_dir = root / ("image" if layout == "train" else "images")
    image_dir.mkdir(parents=True, exist_ok=True)
    names = [f"{i:04d}.tif" if layout == "train" else f"test{i:03d}.tiff" for i in range(n)]
    noise_hu, streak_hu = np.zeros(n), np.zeros(n)
    for part in simulate_batches(n, size, seed, **options):
        for index, image in zip(part["index"], part["image"], strict=True):
            tifffile.imwrite(image_dir / names[index], image)
        noise_hu[part["index"]], streak_hu[part["index"]] = part["noise_hu"], part["streak_hu"]
    _, scores = _scores(noise_hu, streak_hu, seed)
    write_json_atomic(root / f"{layout}.json", {name: float(score) for name, score in zip(names, scores, strict=True)})
    return root
