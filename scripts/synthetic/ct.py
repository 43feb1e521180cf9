"""Synthetic low-dose CT slices with simulated radiologists' scores, in the LDCTIQA layouts.

A stand-in for the LDCTIQA data (which users download themselves) that installs offline, for the
demo and the tests. Slices look like a scanner's at 512 x 512 (the default ``size``): the quantum
noise is made at the native pixel grid with the texture of filtered back-projection (FBP). Each
slice goes through four steps, batched in torch:

1. Anatomy, at ``size`` px over a reconstruction field of view (FOV) drawn per slice from 300-480 mm
   (pixels of 0.59-0.94 mm at 512 px, recorded as ``pixel_mm``), with a body width (left-right)
   drawn from 250-420 mm and at most 92 % of the FOV. Half the slices are analytic abdomens (or, one
   in four, lower thoraces) of ellipses with realistic HU (air -1000, lung -850, fat -100, muscle
   45, liver 60, contrast vessels 40-250, bone 650-700, lesions) whose axes follow the drawn width
   (front-back depth 0.65-0.85 of it); the other half are the 4 real CT slices of ``SOURCE_FILES``:
   ``CT_small.dcm`` (pydicom; a 128 px crop around a thoracic spine), ``693_UNCI.dcm`` (a head) and
   the two frames of ``eCT_Supplemental.dcm`` (brains, completed with a skull) from pydicom-data,
   clipped to [-1000, 3000] HU and smoothed once (total-variation denoising, then a 0.7 px Gaussian)
   so that their own scanner noise is gone before new noise is added. Each is rotated, flipped,
   shifted, elastically deformed and given small lesions; a head is zoomed to the drawn width, the
   crop is magnified to cover an elliptical body of that width. ``CHECK_FILES`` (three other real
   slices of these packages: an abdomen, a head, a neck) are kept for a separate check on real data
   and never used here.
2. Reconstruction kernel ``k``: ``smooth`` (Hann window with cutoff 0.35 cycles/pixel), ``standard``
   (Hann window to Nyquist) or ``sharp`` (ramp boosted at mid frequencies, ``1 + 0.4 sin(2 pi f)``,
   rolled off over 0.27-0.5 cycles/pixel), drawn 25/50/25 % (option ``kernels``, ``kernel_weights``).
   Its window ``W_k(f)`` is the kernel's MTF: the noise-free anatomy is filtered by it (FFT), so a
   sharp kernel sharpens edges (with an overshoot beside them) as it raises the high-frequency noise.
   The noise power spectrum peaks at about 0.11, 0.15 and 0.29 cycles/pixel and the noise is about
   0.6, 1 and 2.8 times the standard kernel's.
3. Noise, simulated directly in the image (FBP is linear: reconstruction = noise-free image + FBP of
   the projection noise). The line integrals ``p`` of ``mu = MU_WATER (1 + HU / 1000)`` (0.02/mm)
   are computed on a 128 px copy (anti-aliased; parallel beam, ``full_views(128)`` views). The
   post-log variance of a ray is ``exp(p) / I0 + e**2 exp(2 p) / I0**2`` (Poisson plus electronic
   noise, ``e`` = 4 counts), with ``I0 = dose * I0_FULL * dt * aec`` photons per view and detector bin
   of width ``dt`` mm (``I0_FULL`` = 1.5e6 per mm; noise falls with pixel size as ``dt**-1.5``) and an
   automatic exposure control ``aec = exp(0.5 * MU_WATER * (WED - 280 mm))`` (WED: the slice's
   water-equivalent diameter), which half compensates a patient's size as scanners do. The noise
   variance of a pixel is ``(pi / V)**2 sum_theta var(theta, x cos + y sin) sum_n h_k[n]**2 / dt**2``
   (``V`` views used, ``h_k`` the kernel's discrete ramp filter); its sum over the views is a
   back-projection of the variance sinogram at 128 px, upsampled to ``size``. The texture is white
   Gaussian noise shaped in 2-D Fourier space by ``sqrt(NPS)`` with ``NPS(f, phi) = |f| W_k(|f|)**2
   a(phi)`` below Nyquist, ``a(phi)`` the relative variance of the view at angle ``phi`` (mean over
   the body's rays; the noise runs along the body's long axis), at unit variance, times the local
   noise level. ``I0_FULL`` is set so that routine dose (1) on a typical adult abdomen (330 x 250 mm,
   0.7 mm pixels, standard kernel) gives about 12 HU in soft tissue (8 HU for a 250 mm wide body, 12 HU
   for a 420 mm one at its larger pixels); doses are drawn log-uniformly over ``DOSE_RANGE`` (routine
   1 down to ultra-low 1/40); quarter dose doubles the noise (ratio 2.01), electronic noise adds 9 %
   at 1/40. Outside the scanner's circle the slice is air without noise. The noise
   level is that of the reconstruction at ``max(size, 512)`` px with ``full_views(max(size, 512))``
   views over the same FOV: a smaller ``size`` (tests) stands for the 512 px slice and its scores.
4. Streaks from sparse views: half the slices use every view of a full scan (528 at 512 px), the
   others every 2nd, 3rd, 4th, 6th or 8th (``views`` records ``full_views(size) // step``). Their
   aliasing streaks, FBP(sparse clean sinogram) - FBP(full clean sinogram) with the slice's kernel,
   are computed at ``min(size, 256)`` px and upsampled (bicubic); the noise uses ``V / step`` views
   (fewer photons, so more noise).

Score, on LDCTIQA's scale (0 bad .. 4 excellent), with routine-dose clinical slices as the best
case: ``noise_hu`` is the std of the slice's noise image and ``streak_hu`` the RMS of its streak
image, both over the body (HU above -300). The latent quality is
``q = clip(4.3 - log2(d / 10 HU), 0, 4)`` with ``d = sqrt(noise_hu**2 + (1.5 streak_hu)**2)``: 12 HU
(routine dose, standard kernel, typical abdomen) gives 4.0, each doubling of ``d`` costs one point
(25 HU 3.0, 49 HU 2.0, 98 HU 1.0, 197 HU and more 0). Five raters, each with a fixed bias
~ N(0, 0.15) and a fresh error ~ N(0, 0.5) per slice, give integer ratings
``clip(rint(q + bias + error), 0, 4)``; the score is their mean (a multiple of 0.2), as in LDCTIQA's
training set. Each record also holds the slice's ``kernel`` and ``pixel_mm``. The default 600 slices
(seed 0) score 2.15 +- 1.17 on average, spread over the whole range (routine-dose standard-kernel
slices 3.4-4, sharp-kernel slices 1.2 on average: their noise is higher).

Everything is drawn from numpy generators and a ``torch.Generator`` seeded with ``seed``: the same
seed gives the same files and labels. The generator runs torch on one thread (where cores are shared
with other processes, two threads waiting on each other cost more than they give): 650 slices at 512 px
take about 20 s (files included; about 2 GB of memory), 32 slices at 64 px half a second.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.fft
import tifffile
import torch
import torch.nn.functional as F
from scipy import ndimage
from scripts.ct_io import ArrayT, frames_hu, window_hu
from scripts.output_dir import write_json_atomic

logger = logging.getLogger(__name__)

MU_WATER = 0.02  # linear attenuation of water at about 70 keV, 1/mm
SOURCE_FILES = ("CT_small.dcm", "693_UNCI.dcm", "eCT_Supplemental.dcm")  # 4 slices: the generator's anatomy
CHECK_FILES = ("explicit_VR-UN.dcm", "J2K_pixelrep_mismatch.dcm", "bad_sequence.dcm")  # real-data check only
ECT_PIXEL_MM = 0.388672  # pixel spacing of eCT_Supplemental.dcm
SOURCE_TV_WEIGHT, SOURCE_SIGMA = 0.03, 0.7  # smoothing of the sources: TV weight (per 1000 HU), Gaussian px
FOV_MM = 358.4  # the default field of view: 0.7 mm pixels at 512 px
FOV_RANGE = (300.0, 480.0)  # reconstruction field of view per slice, mm
BODY_WIDTH_RANGE = (250.0, 420.0)  # body width (left-right) per slice, mm
BODY_FILL = 0.92  # the body's width is at most this fraction of the FOV
SCANNER_RADIUS = 0.97  # the scanner's circle, in FOV half-widths: air outside
NOMINAL_SIZE = 512  # the noise level is that of a reconstruction at max(size, 512) px
NOISE_GRID = 128  # line integrals for the noise level and its direction, px
STREAK_GRID = 256  # sparse-view streaks, px
KERNELS = ("smooth", "standard", "sharp")
KERNEL_WEIGHTS = (0.25, 0.5, 0.25)
SHARP_TAPER = 0.27  # the sharp kernel rolls off from here to Nyquist (cycles/pixel)
I0_FULL = 1.5e6  # photons per view and mm of detector at routine dose (528 views), typical abdomen
ELECTRONIC_NOISE = 4.0  # sd of the electronic noise per reading, photons
AEC_STRENGTH, WED_REF_MM = 0.5, 280.0  # exposure control: I0 * exp(s * MU_WATER * (WED - WED_REF))
DOSE_RANGE = (1 / 40, 1.0)  # fraction of the routine dose, drawn log-uniformly
VIEW_STEPS = (1, 2, 3, 4, 6, 8)  # keep every step-th view of a full scan
VIEW_WEIGHTS = (0.5, 0.1, 0.1, 0.1, 0.1, 0.1)
QUALITY_TOP, QUALITY_SLOPE, QUALITY_REF_HU, STREAK_WEIGHT = 4.3, 1.0, 10.0, 1.5
BODY_HU = -300.0  # body pixels for the noise and streak measures
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


def _denoise(hu: np.ndarray) -> np.ndarray:
    """A real slice without its own scanner noise: edge-preserving TV denoising, then a light Gaussian."""
    from skimage.restoration import denoise_tv_chambolle

    smooth = denoise_tv_chambolle(hu.astype(np.float64) / 1000.0, weight=SOURCE_TV_WEIGHT) * 1000.0
    denoised: np.ndarray = ndimage.gaussian_filter(smooth, SOURCE_SIGMA)
    return denoised


def source_paths() -> list[Path]:
    """The files of ``SOURCE_FILES`` found (pydicom ships ``CT_small.dcm``; the others need pydicom-data)."""
    from pydicom.data import get_testdata_file

    if set(SOURCE_FILES) & set(CHECK_FILES):
        raise RuntimeError("the real-data check files must not be used as sources")
    paths = []
    for name in SOURCE_FILES:
        path = get_testdata_file(name, download=False)
        if path is None:
            logger.warning("%s not found (install pydicom-data): synthetic CT uses fewer real slices", name)
            continue
        paths.append(Path(path))
    return paths


@functools.lru_cache(maxsize=1)
def load_sources() -> tuple[np.ndarray, ...]:
    """The real CT slices that install offline (``SOURCE_FILES``), in HU clipped to [-1000, 3000] and
    smoothed (their own noise removed); read once per process. Missing files are skipped with a warning
    (the analytic phantoms still work)."""
    import pydicom

    slices = []
    for path in source_paths():
        for hu in frames_hu(pydicom.dcmread(path)):
            hu = np.clip(hu, -1000, 3000)
            if path.name.startswith("eCT"):
                hu = _complete_head(hu, ECT_PIXEL_MM)
            slices.append(np.clip(_denoise(hu), -1000, 3000).astype(np.float32))
    return tuple(slices)


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


def _ellipse(
    rng: np.random.Generator, centre: Sequence[float], axes: Sequence[float] | np.ndarray, hu: float
) -> list[float]:
    """One ellipse row (cx, cy, ax, ay, angle, hu), jittered a little."""
    (dx, dy), (sx, sy) = rng.normal(0.0, 0.02, 2), rng.uniform(0.85, 1.15, 2)
    return [centre[0] + dx, centre[1] + dy, axes[0] * sx, axes[1] * sy, rng.uniform(-0.4, 0.4), hu]


def _phantom_ellipses(rng: np.random.Generator, half_width: float, mm: float, count: int = 32) -> np.ndarray:
    """An abdomen (or, one time in four, a lower thorax) as ellipses painted in order, in FOV units [-1, 1].

    ``half_width`` is the body's half width in FOV units and ``mm`` one millimetre in FOV units.
    Returns ``(count, 6)`` rows (cx, cy, ax, ay, angle, hu); unused rows have zero axes.
    """
    cx, cy = rng.uniform(-0.03, 0.03, 2)
    ax = half_width
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
        for _ in range(int(rng.integers(2, 7))):  # bowel: gas, fluid, wall, fat
            hu = rng.choice([-1000.0, 15.0, 35.0, -100.0])
            rows.append(_ellipse(rng, at(*rng.uniform([-0.1, -0.5], [0.5, 0.2])), rng.uniform(7, 25, 2) * mm, hu))
    for _ in range(int(rng.integers(0, 4))):  # lesions, hypo- or hyper-dense, 4-12 mm radius
        rows.append(_ellipse(rng, at(*rng.uniform(-0.4, 0.3, 2)), rng.uniform(4, 12, 2) * mm, rng.normal(40, 40)))
    vessel_hu = rng.uniform(40, 250)
    rows.append(_ellipse(rng, at(0.06, 0.3), (11 * mm, 11 * mm), vessel_hu))  # aorta
    rows.append(_ellipse(rng, at(-0.12, 0.28), (12 * mm, 9 * mm), vessel_hu * 0.8))  # vena cava
    rows.append([*at(0.0, 0.84), 0.15 * ax, 0.06 * ay, tilt, 650.0])  # posterior vertebral arch
    rows.append([*at(0.0, 0.6), 0.12 * ax, 0.13 * ay, tilt, 700.0])  # vertebral body, cortex
    rows.append([*at(0.0, 0.6), 0.09 * ax, 0.1 * ay, tilt, rng.normal(220, 30)])  # cancellous bone
    rows.append([*at(0.0, 0.78), 8 * mm, 7 * mm, 0.0, 20.0])  # spinal canal
    for angle in rng.uniform(0.3, 2.8, int(rng.integers(0, 7))):  # ribs, near the muscle wall
        rx, ry = math.cos(angle) * (1 - fat - wall / 2), math.sin(angle) * (1 - fat - wall / 2)
        rows.append([*at(rx, ry), 6 * mm, 5 * mm, 0.0, 600.0])
    table = np.zeros((count, 6))
    table[: min(count, len(rows))] = np.asarray(rows[:count], dtype=float)
    return table


def _lesion_ellipses(rng: np.random.Generator, half_width: float, mm: float, count: int = 4) -> np.ndarray:
    """A few small random inserts (3-11 mm radius) for a real slice, as :func:`_phantom_ellipses` rows."""
    table = np.zeros((count, 6))
    for row in range(int(rng.integers(1, count + 1))):
        table[row, :2] = rng.uniform(-0.5, 0.5, 2) * half_width
        table[row, 2:5] = [*rng.uniform(3, 11, 2) * mm, rng.uniform(0, math.pi)]
        table[row, 5] = rng.choice([-100.0, 10.0, 80.0, 200.0, 600.0])
    return table


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel centres in FOV units [-1, 1] (x across, y down), as (size, size) tensors."""
    c = torch.from_numpy(_pixel_centres(size)).float()
    return c[None, :].expand(size, size), c[:, None].expand(size, size)


def _paint(hu: torch.Tensor, ellipses: torch.Tensor, tissue_only: bool = False) -> torch.Tensor:
    """Paint ellipses (B, K, 6) over HU images (B, N, N) in order, edges anti-aliased over about a pixel.

    Each ellipse touches only its own bounding box in its own slice, and ``1 - r**2`` (about
    ``2 (1 - r)`` at the edge) stands in for the distance: cheap at 512 px.
    """
    size = hu.shape[-1]
    centre_np = _pixel_centres(size)
    centre = torch.from_numpy(centre_np).float()
    hu = hu.clone()
    with _one_thread():  # many small blocks: threads cost more than they give
        for b, rows in enumerate(ellipses.double().numpy()):
            _paint_slice(hu[b], rows, centre, centre_np, tissue_only)
    return hu


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Torch on one thread for a while (its thread pool's waits cost more than they give where cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _paint_slice(
    hu: torch.Tensor, rows: np.ndarray, centre: torch.Tensor, centre_np: np.ndarray, tissue_only: bool
) -> None:
    """Paint one slice's ellipse rows over its HU image (N, N), in place."""
    size = hu.shape[-1]
    for cx, cy, ax, ay, angle, value in rows:
        if ax <= 0:
            continue
        ax, ay = max(ax, 1e-3), max(ay, 1e-3)
        cos, sin = math.cos(angle), math.sin(angle)
        reach_x = math.sqrt((ax * cos) ** 2 + (ay * sin) ** 2) + 2.0 / size
        reach_y = math.sqrt((ax * sin) ** 2 + (ay * cos) ** 2) + 2.0 / size
        c0, c1 = np.searchsorted(centre_np, [cx - reach_x, cx + reach_x])
        r0, r1 = np.searchsorted(centre_np, [cy - reach_y, cy + reach_y])
        if c1 <= c0 or r1 <= r0:
            continue
        sharp = min(ax, ay) * size / 4
        xx = (cos**2 / ax**2 + sin**2 / ay**2) * sharp
        yy = (sin**2 / ax**2 + cos**2 / ay**2) * sharp
        xy = 2 * cos * sin * (1 / ax**2 - 1 / ay**2) * sharp
        dx, dy = centre[c0:c1] - cx, centre[r0:r1] - cy
        weight = (sharp + 0.5 - xx * dx**2)[None, :] - (yy * dy**2)[:, None] - (xy * dy)[:, None] * dx[None, :]
        weight.clamp_(0.0, 1.0)
        block = hu[r0:r1, c0:c1]
        if tissue_only:
            weight.mul_(block > -300)
        block.add_(weight * (value - block))


def _smooth_field(
    rng: np.random.Generator, batch: int, channels: int, size: int, knots: int, sd: float
) -> torch.Tensor:
    """A smooth random field (B, C, size, size): Gaussian knots on a coarse grid, upsampled bicubically."""
    coarse = torch.from_numpy(rng.normal(0.0, sd, (batch, channels, knots, knots)).astype(np.float32))
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=True)


def _warped_sources(
    rng: np.random.Generator, source: np.ndarray, size: int, half_width: np.ndarray, mm: np.ndarray
) -> torch.Tensor:
    """Real slices ``source`` (indices) rotated, flipped, shifted and elastically deformed: (B, N, N) HU.

    ``half_width`` (B,) is the body's half width and ``mm`` (B,) a millimetre, in FOV units. A slice with
    its own outline (a head) is centred and zoomed to it; a crop (CT_small) is magnified to cover an
    elliptical body of that width (depth 0.65-0.85 of it), air outside.
    """
    batch = len(source)
    stack, placement = _source_stack(size)
    cx, cy, extent = placement[torch.from_numpy(source)].unbind(-1)
    angle, flip, cover, aspect, shift_x, shift_y = (
        torch.from_numpy(values).float()
        for values in (
            rng.uniform(0, 2 * math.pi, batch),
            rng.choice([-1.0, 1.0], batch),
            rng.uniform(1.0, 1.25, batch),
            rng.uniform(0.65, 0.85, batch),
            *rng.uniform(-0.03, 0.03, (2, batch)),
        )
    )
    width = torch.from_numpy(np.asarray(half_width)).float()
    outlined = torch.isfinite(extent)
    zoom = torch.where(outlined, width / torch.where(outlined, extent, 1.0), (width + 0.05) * cover)
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # output (x, y) reads the source at A (x, y) + t; the tissue centroid lands on the shift
    a11, a12, a21, a22 = cos * flip, -sin, sin * flip, cos
    t1, t2 = cx - a11 * shift_x - a12 * shift_y, cy - a21 * shift_x - a22 * shift_y
    # the sampling grid on a coarse lattice through the first and last pixel centres (exact for the affine
    # part), plus a smooth elastic displacement, upsampled bilinearly: far cheaper than at full size
    knots = min(size, 65)
    u = torch.linspace(float(_pixel_centres(size)[0]), float(_pixel_centres(size)[-1]), knots)
    ux, uy = u[None, None, :], u[None, :, None]
    coarse = torch.stack(
        [
            a11[:, None, None] * ux + a12[:, None, None] * uy + t1[:, None, None],
            a21[:, None, None] * ux + a22[:, None, None] * uy + t2[:, None, None],
        ],
        1,
    )
    strength = torch.from_numpy(rng.uniform(0, 0.03, (batch, 1, 1, 1))).float()
    coarse = coarse + _smooth_field(rng, batch, 2, knots, 5, 1.0) * strength
    grid = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=True).permute(0, 2, 3, 1)
    hu = F.grid_sample(stack[torch.from_numpy(source)], grid, align_corners=False)[:, 0] - 1000.0
    x, y = _grid(size)
    body_x, body_y = width[:, None, None], (width * aspect)[:, None, None]
    inside = outlined[:, None, None] | ((x / body_x) ** 2 + (y / body_y) ** 2 <= 1)
    hu = torch.where(inside, hu, torch.full_like(hu, -1000.0))
    lesions = np.stack([_lesion_ellipses(rng, float(w), float(m)) for w, m in zip(half_width, mm, strict=True)])
    return _paint(hu, torch.from_numpy(lesions).float(), tissue_only=True)


def _phantoms(rng: np.random.Generator, half_width: np.ndarray, mm: np.ndarray, size: int) -> torch.Tensor:
    """Analytic abdomens/thoraces (B, N, N) in HU, with a faint smooth texture in the tissue."""
    tables = [_phantom_ellipses(rng, float(w), float(m)) for w, m in zip(half_width, mm, strict=True)]
    hu = _paint(torch.full((len(tables), size, size), -1000.0), torch.from_numpy(np.stack(tables)).float())
    texture = _smooth_field(rng, len(tables), 1, size, 16, 8.0)[:, 0]
    return hu + texture * (hu > -300)


def make_anatomy(
    rng: np.random.Generator,
    source: np.ndarray,
    size: int,
    fov_mm: np.ndarray | None = None,
    width_mm: np.ndarray | None = None,
) -> torch.Tensor:
    """Noise-free slices (B, N, N) in HU inside the scanner's circle: ``source`` -1 for a phantom, else a real slice.

    ``fov_mm`` (B,) is each slice's field of view (default ``FOV_MM``) and ``width_mm`` (B,) its body
    width (default drawn from ``BODY_WIDTH_RANGE``, at most ``BODY_FILL`` of the FOV).
    """
    source = np.asarray(source)
    fov = np.full(len(source), FOV_MM) if fov_mm is None else np.asarray(fov_mm, dtype=float)
    if width_mm is None:
        width_mm = rng.uniform(*BODY_WIDTH_RANGE, len(source))
    half_width = np.minimum(np.asarray(width_mm, dtype=float), BODY_FILL * fov) / fov
    hu = torch.full((len(source), size, size), -1000.0)
    real = source >= 0
    if real.any():
        hu[torch.from_numpy(real)] = _warped_sources(rng, source[real], size, half_width[real], 2.0 / fov[real])
    if (~real).any():
        hu[torch.from_numpy(~real)] = _phantoms(rng, half_width[~real], 2.0 / fov[~real], size)
    x, y = _grid(size)
    return torch.where(x**2 + y**2 < SCANNER_RADIUS**2, hu, torch.full_like(hu, -1000.0)).clamp(-1000.0, 3000.0)


# ---------------------------------------------------------------- projector and FBP


def pixel_mm(size: int, fov_mm: float = FOV_MM) -> float:
    """Pixel (and detector bin) size in mm of a ``size`` px reconstruction over ``fov_mm`` (default 358.4 mm)."""
    return fov_mm / size


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
        row_starts, column_indices, entries = (torch.from_numpy(a.ravel()) for a in (rows, columns, values))
        return torch.sparse_csr_tensor(row_starts, column_indices, entries, size=shape)


def _taps(position: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Linear interpolation at fractional indices ``position`` into ``size`` samples: the two neighbours
    (clipped into range) and their weights (zero outside), on a new last axis of 2."""
    first = np.floor(position)
    weight = (position - first).astype(np.float32)
    index = np.stack([first, first + 1], -1)
    weights = np.stack([1 - weight, weight], -1)
    weights[(index < 0) | (index > size - 1)] = 0.0
    return np.clip(index, 0, size - 1).astype(np.int32), weights


@functools.lru_cache(maxsize=3)
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


def project(mu: torch.Tensor, pixel: float | None = None) -> torch.Tensor:
    """Parallel-beam line integrals (B, views, N) of a full scan of attenuation images (B, N, N) in 1/mm,
    for pixels of ``pixel`` mm (default :func:`pixel_mm`)."""
    size = mu.shape[-1]
    pixel = pixel_mm(size) if pixel is None else pixel
    return _apply(_projector(size), mu).reshape(len(mu), full_views(size), size) * pixel


def kernel_window(kernel: str, frequency: torch.Tensor) -> torch.Tensor:
    """A reconstruction kernel's window ``W_k`` (its MTF) at frequencies in cycles per pixel; zero beyond
    Nyquist (0.5). ``smooth``: Hann, cutoff 0.35; ``standard``: Hann to Nyquist; ``sharp``:
    ``1 + 0.4 sin(2 pi f)``, tapered to zero (cosine) over 0.27-0.5."""
    f = frequency.abs().double()
    if kernel == "smooth":
        window = torch.where(f < 0.35, 0.5 + 0.5 * torch.cos(math.pi * f.clamp(max=0.35) / 0.35), 0.0)
    elif kernel == "standard":
        window = 0.5 + 0.5 * torch.cos(2 * math.pi * f.clamp(max=0.5))
    elif kernel == "sharp":
        taper = 0.5 + 0.5 * torch.cos(math.pi * ((f - SHARP_TAPER) / (0.5 - SHARP_TAPER)).clamp(0.0, 1.0))
        window = (1 + 0.4 * torch.sin(2 * math.pi * f)) * taper
    else:
        raise ValueError(f"unknown kernel {kernel!r}: expected one of {KERNELS}")
    return torch.where(f <= 0.5, window, 0.0)


@functools.lru_cache(maxsize=8)
def noise_gain(kernel: str) -> float:
    """``sum_n h_k[n]**2`` of the kernel's discrete ramp filter (by Parseval, ``2 int_0^0.5 f**2 W_k**2 df``)."""
    f = (torch.arange(20000, dtype=torch.float64) + 0.5) / 40000
    return float(2 * (f**2 * kernel_window(kernel, f) ** 2).mean() * 0.5)


@functools.lru_cache(maxsize=8)
def _ramp(bins: int) -> torch.Tensor:
    """The ramp filter's frequency response for ``bins`` detector bins, zero-padded to avoid wrap-around.

    Built from the band-limited spatial ramp (Ram-Lak: 1/4 at 0, -1/(pi n)^2 at odd n), which keeps the
    DC term right.
    """
    padded = 2 ** math.ceil(math.log2(2 * bins))
    n = torch.cat([torch.arange(0, padded // 2 + 1), torch.arange(-(padded // 2) + 1, 0)]).double()
    kernel = torch.where(n % 2 == 1, -1.0 / (math.pi * n) ** 2, torch.zeros_like(n))
    kernel[0] = 0.25
    response: torch.Tensor = torch.fft.rfft(kernel).real
    return response


@functools.lru_cache(maxsize=16)
def _filter_response(bins: int, kernel: str | None, scale: float = 1.0) -> torch.Tensor:
    """The ramp times a kernel's window (None: the bare ramp) for ``bins`` bins; ``scale`` converts cycles per
    detector bin to cycles per pixel of the image whose kernel it is."""
    response = _ramp(bins)
    if kernel is not None:
        padded = 2 * (len(response) - 1)
        response = response * kernel_window(kernel, torch.fft.rfftfreq(padded, dtype=torch.float64) * scale)
    return response.float()


def _filter(sinogram: torch.Tensor, response: torch.Tensor) -> torch.Tensor:
    """Projections (B, V, D) filtered along the detector by a response (F,) or (B, 1, F), zero-padded."""
    bins = sinogram.shape[-1]
    padded = 2 * (response.shape[-1] - 1)
    spectrum = torch.fft.rfft(sinogram, n=padded, dim=-1) * response
    filtered: torch.Tensor = torch.fft.irfft(spectrum, n=padded, dim=-1)[..., :bins]
    return filtered


def filter_sinogram(sinogram: torch.Tensor, hann: bool = True, kernel: str | None = None) -> torch.Tensor:
    """Ramp-filtered projections (B, V, D), per mm (default pixels); ``hann`` is the standard kernel,
    ``kernel`` names another (see :func:`kernel_window`)."""
    bins = sinogram.shape[-1]
    kernel = kernel or ("standard" if hann else None)
    return _filter(sinogram, _filter_response(bins, kernel)) / pixel_mm(bins)


def fbp(sinogram: torch.Tensor, hann: bool = True, stride: int = 1, kernel: str | None = None) -> torch.Tensor:
    """Filtered back-projection of (B, V, D) line integrals over [0, pi), V dividing a full scan's views:
    attenuation images (B, D, D), or on every ``stride``-th pixel each way. ``hann`` uses the standard
    kernel (Hann-windowed ramp), else the bare ramp; ``kernel`` names one."""
    batch, views, size = sinogram.shape
    if full_views(size) % views:
        raise ValueError(f"{views} views do not divide the {full_views(size)} views of a full scan")
    matrix = _backprojector(size, full_views(size) // views, stride)
    image = _apply(matrix, filter_sinogram(sinogram, hann, kernel)) * (math.pi / views)
    side = len(range(0, size, stride))
    return image.reshape(batch, side, side)


def hu_to_mu(hu: ArrayT) -> ArrayT:
    """Linear attenuation (1/mm) of HU, air (-1000 HU and below) as zero (tensors or arrays)."""
    mu = MU_WATER * (1.0 + hu / 1000.0)
    return mu.clamp_min(0.0) if isinstance(mu, torch.Tensor) else np.maximum(mu, 0.0)


def mu_to_hu(mu: ArrayT) -> ArrayT:
    """HU of linear attenuation (1/mm)."""
    return (mu / MU_WATER - 1.0) * 1000.0


# ---------------------------------------------------------------- scanner: kernel, noise, streaks


def _resize(images: torch.Tensor, side: int, mode: str = "bilinear") -> torch.Tensor:
    """Images (B, N, N) resized to (B, side, side): anti-aliased when shrinking."""
    if images.shape[-1] == side:
        return images
    shrink = side < images.shape[-1]
    resized = F.interpolate(images[:, None], size=(side, side), mode=mode, antialias=shrink, align_corners=False)
    return resized[:, 0]


@functools.lru_cache(maxsize=4)
def _fourier_grid(size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rfft2 grid of a ``size`` px image: radial frequency (cycles/pixel), direction in [0, pi) and
    each column's multiplicity in the full spectrum (for variances)."""
    fy = torch.fft.fftfreq(size, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(size, dtype=torch.float64)[None, :]
    radius = torch.sqrt(fx**2 + fy**2)
    direction = torch.remainder(torch.atan2(fy.expand_as(radius), fx.expand_as(radius)), math.pi)
    multiplicity = torch.full((fx.shape[-1],), 2.0, dtype=torch.float64)
    multiplicity[0] = 1.0
    if size % 2 == 0:
        multiplicity[-1] = 1.0
    return radius, direction, multiplicity


@functools.lru_cache(maxsize=8)
def _kernel_grids(size: int, kernel: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A kernel's MTF ``W_k(|f|)`` and radial noise power ``|f| W_k(|f|)**2`` on the rfft2 grid of ``size`` px."""
    radius = _fourier_grid(size)[0]
    window = kernel_window(kernel, radius)
    return window.float(), (radius * window**2).float()


@functools.lru_cache(maxsize=4)
def _direction_taps(size: int, views: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear interpolation of a per-view quantity (period pi, ``views`` views) at the rfft2 grid's directions."""
    position = _fourier_grid(size)[1] / (math.pi / views)
    lower = torch.floor(position)
    return lower.long() % views, (lower.long() + 1) % views, (position - lower).float()


def _rfft2(images: torch.Tensor) -> torch.Tensor:
    """rfft2 of real images (B, N, N) (scipy's pocketfft: faster than torch's here)."""
    return torch.from_numpy(scipy.fft.rfft2(images.contiguous().numpy(), workers=torch.get_num_threads()))


def _irfft2(spectrum: torch.Tensor, size: int, norm: str = "backward") -> torch.Tensor:
    """Real images (B, size, size) of rfft2 spectra."""
    image = scipy.fft.irfft2(spectrum.numpy(), s=(size, size), norm=norm, workers=torch.get_num_threads())
    return torch.from_numpy(image)


def apply_kernel(hu: torch.Tensor, kernels: Sequence[str]) -> torch.Tensor:
    """Noise-free slices (B, N, N) as reconstructed with each slice's kernel: filtered by its MTF (FFT)."""
    size = hu.shape[-1]
    spectrum = _rfft2(hu)
    spectrum *= torch.stack([_kernel_grids(size, k)[0] for k in kernels])
    return _irfft2(spectrum, size)


def _view_weights(step: np.ndarray, views: int) -> torch.Tensor:
    """Per slice and view (B, V, 1): FBP(views kept) - FBP(all views) as weights of a full back-projection,
    ``step`` for a kept view and 0 otherwise, minus 1."""
    step_t = torch.from_numpy(np.asarray(step, dtype=np.int64))[:, None]
    kept = (torch.arange(views)[None, :] % step_t) == 0
    return (kept.float() * step_t.float() - 1.0)[..., None]


def sparse_view_streaks(hu: torch.Tensor, step: np.ndarray, kernels: Sequence[str]) -> torch.Tensor:
    """The aliasing streaks in HU (B, N, N) of scans of slices (B, N, N) in HU that keep every ``step``-th
    view: FBP(sparse) - FBP(full) of the noise-free sinograms with each slice's kernel, at ``min(N, 256)``
    px, upsampled bicubically."""
    size = hu.shape[-1]
    side = min(size, STREAK_GRID)
    views = full_views(side)
    if views % math.lcm(*(int(s) for s in step)):
        raise ValueError(f"view steps {sorted(set(step))} must divide the {views} views of a full scan")
    sinogram = _apply(_projector(side), hu_to_mu(_resize(hu, side))).reshape(len(hu), views, side)  # per pixel
    response = torch.stack([_filter_response(side, k, side / size) for k in kernels])[:, None]
    filtered = _filter(sinogram, response) * _view_weights(step, views)
    streaks = _apply(_backprojector(side, 1, 1), filtered).reshape(len(hu), side, side) * (math.pi / views)
    return _resize(streaks * (1000.0 / MU_WATER), size, "bicubic")


def photons(dose: np.ndarray, fov_mm: np.ndarray, size: int, wed_mm: torch.Tensor) -> torch.Tensor:
    """Unattenuated photons per view and detector bin (B,) of the reconstruction at ``max(size, 512)`` px:
    ``dose * I0_FULL * bin width``, times the exposure control for a water-equivalent diameter ``wed_mm``."""
    bin_mm = torch.from_numpy(np.asarray(fov_mm, dtype=np.float32)) / max(size, NOMINAL_SIZE)
    control = torch.exp(AEC_STRENGTH * MU_WATER * (wed_mm - WED_REF_MM))
    return torch.from_numpy(np.asarray(dose, dtype=np.float32)) * I0_FULL * bin_mm * control


def noise_level(
    hu: torch.Tensor, dose: np.ndarray, step: np.ndarray, kernels: Sequence[str], fov_mm: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FBP noise of scans of slices (B, N, N) in HU: the local noise sd in HU (B, M, M) at
    ``M = min(N, 128)`` px and the relative projection-noise variance per view (B, full_views(M)),
    mean 1 (see the module docstring)."""
    size = hu.shape[-1]
    side = min(size, NOISE_GRID)
    low = hu_to_mu(_resize(hu, side))
    fov = torch.from_numpy(np.asarray(fov_mm, dtype=np.float32))
    pixel = (fov / side)[:, None, None]
    line = _apply(_projector(side), low).reshape(len(hu), full_views(side), side) * pixel
    wed = 2 * torch.sqrt((low / MU_WATER).sum((1, 2)) * pixel[:, 0, 0] ** 2 / math.pi)
    i0 = photons(dose, fov_mm, size, wed)[:, None, None]
    transmission = torch.exp(-line)
    variance = 1.0 / (i0 * transmission) + (ELECTRONIC_NOISE / (i0 * transmission)) ** 2
    total = _apply(_backprojector(side, 1, 1), variance).reshape(len(hu), side, side)  # sum over the views
    nominal = max(size, NOMINAL_SIZE)
    views = torch.from_numpy(full_views(nominal) / np.asarray(step, dtype=np.float32))[:, None, None]
    gain = torch.tensor([noise_gain(k) for k in kernels], dtype=torch.float32)[:, None, None]
    bin_mm = (fov / nominal)[:, None, None]
    sd_mu = torch.sqrt(math.pi**2 / (views * full_views(side)) * total * gain / bin_mm**2)
    body = (line > 0.05).float()  # rays through at least 2.5 mm of water
    per_view = torch.where(body.sum(-1) > 0, (variance * body).sum(-1) / body.sum(-1).clamp_min(1.0), variance.mean(-1))
    return sd_mu * (1000.0 / MU_WATER), per_view / per_view.mean(-1, keepdim=True)


def noise_texture(
    anisotropy: torch.Tensor, kernels: Sequence[str], size: int, generator: torch.Generator
) -> torch.Tensor:
    """Unit-variance FBP noise (B, size, size): white Gaussian noise shaped by ``sqrt(NPS)``,
    ``NPS(f, phi) = |f| W_k(|f|)**2 a(phi)`` below Nyquist, ``a`` (B, V) per view over [0, pi)."""
    lower, upper, frac = _direction_taps(size, anisotropy.shape[-1])
    direction = anisotropy[:, lower] * (1 - frac) + anisotropy[:, upper] * frac
    power = torch.stack([_kernel_grids(size, k)[1] for k in kernels]) * direction
    _, _, multiplicity = _fourier_grid(size)
    power = power / ((power * multiplicity.float()).sum((1, 2), keepdim=True) / size**2).clamp_min(1e-12)
    # white noise drawn in Fourier space (unit complex variance; "ortho" keeps it unit in the image)
    white = torch.randn((*power.shape, 2), generator=generator)
    white *= torch.sqrt(power * 0.5)[..., None]
    return _irfft2(torch.view_as_complex(white), size, norm="ortho")


def scanner_noise(
    hu: torch.Tensor,
    dose: np.ndarray,
    step: np.ndarray,
    kernels: Sequence[str],
    fov_mm: np.ndarray,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The quantum noise in HU (B, N, N) of scans of noise-free slices (B, N, N) in HU, and the relative
    noise variance per view (B, V) that orients its texture."""
    size = hu.shape[-1]
    sd_hu, anisotropy = noise_level(hu, dose, step, kernels, fov_mm)
    texture = noise_texture(anisotropy, kernels, size, generator)
    return texture * _resize(sd_hu, size), anisotropy


def _body_rms(difference_hu: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
    """RMS (B,) of HU differences (B, H, W) over the body (B, H, W)."""
    return torch.sqrt((difference_hu**2 * body).sum((1, 2)) / body.sum((1, 2)).clamp_min(1.0))


def scan(
    hu: torch.Tensor,
    dose: np.ndarray,
    step: np.ndarray,
    kernels: Sequence[str],
    fov_mm: np.ndarray,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Low-dose scans of noise-free slices (B, N, N) in HU: the reconstructions in HU and, per slice, the
    noise std and streak RMS in HU over the body (see the module docstring). ``dose`` (B,) is the fraction
    of the routine dose, ``step`` (B,) keeps every step-th view, ``kernels`` names each slice's kernel. Outside
    the scanner's circle the reconstructions are air (-1000 HU), without noise, as a scanner pads them."""
    step = np.asarray(step)
    recon = apply_kernel(hu, kernels)
    noise, _ = scanner_noise(hu, dose, step, kernels, fov_mm, generator)
    body = (hu > BODY_HU).float()
    noise_hu, streak_hu = _body_rms(noise, body), torch.zeros(len(hu))
    recon += noise
    sparse = np.flatnonzero(step > 1)
    if len(sparse):
        members = torch.from_numpy(sparse)
        streaks = sparse_view_streaks(hu[members], step[sparse], [kernels[int(i)] for i in sparse])
        streak_hu[members] = _body_rms(streaks, body[members])
        recon[members] += streaks
    x, y = _grid(hu.shape[-1])
    return torch.where(x**2 + y**2 < SCANNER_RADIUS**2, recon, -1000.0), noise_hu, streak_hu


# ---------------------------------------------------------------- measure, rate, write


def latent_quality(noise_hu: np.ndarray, streak_hu: np.ndarray) -> np.ndarray:
    """Quality 0..4 from the measured noise and streak levels (HU): lower for more of either."""
    degradation = np.sqrt(np.asarray(noise_hu) ** 2 + (STREAK_WEIGHT * np.asarray(streak_hu)) ** 2)
    return np.clip(QUALITY_TOP - QUALITY_SLOPE * np.log2(np.maximum(degradation, 1e-3) / QUALITY_REF_HU), 0.0, 4.0)


def rate(quality: np.ndarray, rng: np.random.Generator, raters: int = RATERS) -> np.ndarray:
    """Mean of ``raters`` integer ratings 0..4, each rater with a fixed bias and a fresh error per slice."""
    bias = rng.normal(0.0, RATER_BIAS_SD, raters)
    error = rng.normal(0.0, RATER_NOISE_SD, (len(quality), raters))
    ratings = np.clip(np.rint(np.asarray(quality)[:, None] + bias + error), 0, 4)
    mean_rating: np.ndarray = np.round(ratings.mean(1), 1)
    return mean_rating


def _fov_and_width(
    plan: np.random.Generator, n: int, fov_range: Sequence[float], width_range: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per slice a body width (mm) and a field of view (mm) that holds it (width at most ``BODY_FILL`` of it)."""
    width = plan.uniform(width_range[0], width_range[1], n)
    lowest = np.clip(width / BODY_FILL, fov_range[0], fov_range[1])
    fov = lowest + plan.random(n) * (fov_range[1] - lowest)
    return fov, np.minimum(width, BODY_FILL * fov)


def simulate_batches(
    n: int,
    size: int = 512,
    seed: int = 0,
    *,
    dose_range: tuple[float, float] = DOSE_RANGE,
    view_steps: Sequence[int] = VIEW_STEPS,
    view_weights: Sequence[float] | None = VIEW_WEIGHTS,
    kernels: Sequence[str] = KERNELS,
    kernel_weights: Sequence[float] | None = KERNEL_WEIGHTS,
    fov_range: tuple[float, float] = FOV_RANGE,
    body_width_range: tuple[float, float] = BODY_WIDTH_RANGE,
    phantom_fraction: float = 0.5,
    batch: int = BATCH,
) -> Iterator[dict[str, np.ndarray]]:
    """Yield the slices batch by batch: dicts of ``index``, ``image`` (windowed, float32 numpy), ``hu``
    (noise-free truth), ``recon_hu`` (the reconstruction in HU),
    ``dose``, ``views``, ``kernel`` (names), ``pixel_mm``, ``noise_hu`` and ``streak_hu``.

    The plan (source, dose, views, kernel, field of view and body width per slice) is drawn first, so a
    slice does not depend on ``batch`` except through the order of the random draws.
    """
    plan, anatomy = _stream(seed, "plan"), _stream(seed, "anatomy")
    generator = torch.Generator().manual_seed(seed)
    real = len(_source_stack(size)[0])
    if full_views(size) % math.lcm(*view_steps):
        raise ValueError(f"view steps {tuple(view_steps)} must divide the {full_views(size)} views of a full scan")
    for name in kernels:
        kernel_window(name, torch.zeros(1))  # unknown names fail here
    weights = None if view_weights is None else np.asarray(view_weights, dtype=float) / np.sum(view_weights)
    source = np.where((plan.random(n) < phantom_fraction) | (real == 0), -1, plan.integers(0, max(real, 1), n))
    dose = np.exp(plan.uniform(math.log(dose_range[0]), math.log(dose_range[1]), n))
    step = plan.choice(np.asarray(view_steps), n, p=weights)
    k_weights = None if kernel_weights is None else np.asarray(kernel_weights, dtype=float) / np.sum(kernel_weights)
    kernel = np.asarray(kernels)[plan.choice(len(kernels), n, p=k_weights)]
    fov, width = _fov_and_width(plan, n, fov_range, body_width_range)
    for start in range(0, n, batch):
        part = np.arange(start, min(n, start + batch))
        with _one_thread():  # on a shared 2-core machine, one thread per process is faster than two
            hu = make_anatomy(anatomy, source[part], size, fov[part], width[part])
            recon, noise_hu, streak_hu = scan(hu, dose[part], step[part], list(kernel[part]), fov[part], generator)
            image = window_hu(recon).numpy().astype(np.float32)
        yield {
            "index": part,
            "image": image,
            "hu": hu.numpy(),
            "recon_hu": recon.numpy(),
            "dose": dose[part],
            "views": full_views(size) // step[part],
            "kernel": kernel[part],
            "pixel_mm": fov[part] / size,
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


def synthesize_slices(n: int, size: int = 512, seed: int = 0, **options: Any) -> dict[str, np.ndarray]:
    """All slices in memory, in index order: ``image`` (n, size, size) in [0, 1], ``score`` (n,) and the
    per-slice ``dose``, ``views``, ``kernel``, ``pixel_mm``, ``noise_hu``, ``streak_hu`` and ``quality``.
    Options as :func:`simulate_batches`."""
    parts = list(simulate_batches(n, size, seed, **options))
    order = np.argsort(np.concatenate([p["index"] for p in parts]))
    keys = ("image", "dose", "views", "kernel", "pixel_mm", "noise_hu", "streak_hu")
    out = {key: np.concatenate([p[key] for p in parts])[order] for key in keys}
    out["quality"], out["score"] = _scores(out["noise_hu"], out["streak_hu"], seed)
    return out


def write_ct_dataset(
    output_dir: str | Path, n: int = 600, size: int = 512, seed: int = 0, layout: str = "train", **options: Any
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


def write_scored_ct_dataset(
    output_dir: str | Path, patients: int = 8, slices: int = 4, size: int = 64, seed: int = 0, **options: Any
) -> Path:
    """A reader study in the scored-CT layout: ``patients`` scans of ``slices`` simulated low-dose slices each,
    even-numbered patients as DICOM series folders (``p00/``, uint16 with a rescale to HU), odd ones as NIfTI
    volumes (``p01.nii.gz``), scored slice by slice in ``labels.csv`` and the same rows in ``labels.json``
    (``path``, ``slice``, ``score``, ``patient``, ``sd``). Returns the labels.csv path. Options as
    :func:`simulate_batches`."""
    import nibabel
    from scripts.ct_io import write_dicom_slice

    root = Path(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    n = patients * slices
    recon, noise_hu, streak_hu = np.zeros((n, size, size), np.float32), np.zeros(n), np.zeros(n)
    for part in simulate_batches(n, size, seed, **options):
        recon[part["index"]], noise_hu[part["index"]] = part["recon_hu"], part["noise_hu"]
        streak_hu[part["index"]] = part["streak_hu"]
    _, scores = _scores(noise_hu, streak_hu, seed)
    spread = _stream(seed, "raters").uniform(0.2, 0.6, n)
    rows = []
    for patient in range(patients):
        volume = recon[patient * slices : (patient + 1) * slices]
        name = f"p{patient:02d}"
        if patient % 2 == 0:
            series = f"1.2.826.0.1.3680043.8.498.{seed}.{patient + 1}"
            for k, hu in enumerate(volume):
                write_dicom_slice(root / name / f"{k:03d}.dcm", hu, series, position=2.0 * k)
            path = name
        else:  # (x, y, z) towards the patient's right, front and head: the slice as DICOM shows it, in RAS
            data = np.ascontiguousarray(volume[:, ::-1, ::-1].transpose(2, 1, 0))
            nibabel.save(nibabel.Nifti1Image(data, np.diag([0.7, 0.7, 2.0, 1.0])), root / f"{name}.nii.gz")
            path = f"{name}.nii.gz"
        for k in range(slices):
            index = patient * slices + k
            rows.append({"path": path, "slice": k, "score": round(float(scores[index]), 4), "patient": name,
                         "sd": round(float(spread[index]), 4)})  # fmt: skip
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(str(row[key]) for key in header) for row in rows]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    write_json_atomic(root / "labels.json", rows)
    return root / "labels.csv"
