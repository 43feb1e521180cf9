"""A real-data check outside training: does a model rank REAL CT slices by dose?

The model is trained on simulated CT; this check takes real CT slices that training never sees
(shipped offline by pydicom / pydicom-data), lowers their dose in the projection domain and asks
whether the scores fall with the dose. Per real slice:

1. HU clipped to [-1000, 3000] (padding outside the field of view is -2000 or lower), optionally
   resampled to ``size`` px with the pixel size scaled to match; attenuation
   ``mu = 0.02 (1 + HU / 1000)`` per mm.
2. A full parallel-beam scan of ``V`` views over [0, 180): line integrals ``p = radon(mu) * pixel_mm``;
   photon counts ``I ~ Poisson(I0 dose exp(-p))`` plus Gaussian electronic noise;
   ``p' = -log(max(I, 1) / (I0 dose))``; filtered back-projection (Hann filter) back to HU. ``I0`` per
   detector bin is proportional to the bin width, set so that full dose gives routine noise (about 10
   to 15 HU in the soft tissue of an adult abdomen at 0.7 mm pixels). ``V`` is the size rounded to a
   multiple of 16 (512 at 512 px): 1.4 x size would sample angles better, but the simulation
   dominates the check's time and would take 40% longer (12 s instead of 8.6 s of CPU per 512 px slice).
3. Two sets: ``noise``, doses 1, 1/2, 1/4, 1/8, 1/16 with every view; ``views``, V, V/2, ..., V/16 views
   at full dose per view (every k-th view of the noise set's full-dose scan, so both sets share their
   first image), which adds streaks as well as noise.
4. Every degraded slice is scored by the model through the bundle's real scoring path (written as
   DICOM, ``scripts.clinical.score.score_inputs``) and by the no-learning noise baseline
   (``scripts.tools.baseline.baseline_score``), side by side.
5. Per slice and set: Spearman (level, score) and the fraction of (higher, lower) level pairs ranked
   correctly (strictly higher score; ties count as wrong); means over the slices are reported.
6. Across slices, as LDCTIQA puts every slice on one scale: Spearman (score, -error) over every distinct
   image of every slice and both sets pooled, where the error is the SD (HU) of the image minus its noiseless
   reconstruction in soft tissue (noise and streaks together). A model whose scores mean the same on every
   slice ranks a noisy head below a clean abdomen, not only a slice's doses among themselves. The error counts
   what the simulation adds, not the noise the real slice had to begin with (unknown without a reference), so
   this ranking's truth is rougher than a slice's own doses.

With ``inputs`` the same check runs on the user's own CT instead (DICOM series, NIfTI, NRRD or MetaImage volumes): up to
``per_series`` slices of each series, evenly spaced, padded to a square with air; the pixel size comes from the
header (``DEFAULT_PIXEL_MM`` with a warning when it gives none), and inputs that cannot be used are listed.

``python -m scripts realcheck [PATH ...] [--ckpt FILE] [--output_dir DIR] [--size N] [--seed S] [--device D]``
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage, stats
from scripts.ct_inputs import MIN_SCAN_SIDE, InputError, index_inputs, is_thumbnail, pixel_size_mm, read_ct_slice
from scripts.ct_io import frames_hu, window_hu, write_dicom_slice
from scripts.engines import usable_device
from scripts.options import whole_number
from scripts.output_dir import write_json_atomic
from scripts.synthetic.ct import CHECK_FILES, hu_to_mu, mu_to_hu
from scripts.tools.baseline import baseline_score

logger = logging.getLogger(__name__)


HU_CLIP = (-1000.0, 3000.0)
DOSES = (1.0, 1 / 2, 1 / 4, 1 / 8, 1 / 16)
VIEW_DIVISORS = (1, 2, 4, 8, 16)
VIEWS_PER_PIXEL = 1.0  # 1.4 would sample angles better, but costs 40% more time (see the module's docstring)
# Photons per mm of detector per view at full dose (I0 = PHOTONS_PER_MM * bin width). Measured at 512 px and
# 512 views: 10.5 HU of noise in the soft tissue of the abdomen slice (0.86 mm pixels; noise ~ pixel^-1.5, so
# about 14 HU at 0.7 mm), 11.8 HU in the head (0.431 mm), 15.1 HU in the neck (0.287 mm); quarter dose doubles it.
PHOTONS_PER_MM = 9.1e5
ELECTRONIC_NOISE = 5.0  # counts per detector bin, standard deviation
SOFT_TISSUE_HU = (-100.0, 150.0)
SETS = ("noise", "views")
SCORERS = ("model", "baseline")
RESULT_FILE = "realcheck.json"
PER_SERIES = 3  # slices of each series or volume of the user's inputs
LISTED_NOT_USED = 5  # inputs not used, printed; realcheck.json lists them all
PART_WIDTH = len("model  Spearman 1.00  pairs 100.0%")  # a scorer's part of a printed line, kept in its column
DEFAULT_PIXEL_MM = 0.7  # assumed when a header gives no pixel size: a 358 mm field of view at 512 px


class RealCheckError(RuntimeError):
    """The check cannot run (no real slices installed, or the scoring path failed)."""


# --- real slices ---------------------------------------------------------------------------------


def find_check_files(names: Sequence[str] = CHECK_FILES) -> list[Path]:
    """The real slices installed (offline, no download); a warning for each missing one."""
    from pydicom.data import get_testdata_file

    found = []
    for name in names:
        path = get_testdata_file(name, download=False)
        if path is None:
            logger.warning("real-data check: %s is not installed; skipped (pip install pydicom-data)", name)
        else:
            found.append(Path(path))
    if not found:
        raise RealCheckError(
            f"none of the real CT slices {', '.join(names)} is installed; install them with `pip install pydicom-data`"
        )
    return found


def read_real_slice(path: str | Path, size: int | None = None) -> tuple[np.ndarray, float]:
    """(HU clipped to [-1000, 3000], pixel size in mm) of a real slice, resampled to ``size`` px when given."""
    import pydicom

    ds = pydicom.dcmread(path)
    hu = np.clip(frames_hu(ds)[0].astype(np.float64), *HU_CLIP)
    pixel_mm = pixel_size_mm(path) or DEFAULT_PIXEL_MM
    return _resized(hu, pixel_mm, size)


def _resized(hu: np.ndarray, pixel_mm: float, size: int | None) -> tuple[np.ndarray, float]:
    """(HU resampled to ``size`` x ``size`` px when given, its mean pixel size in mm: the field of view is kept)."""
    rows, cols = hu.shape
    if size is None or (rows, cols) == (size, size):
        return hu, pixel_mm
    from skimage.transform import resize

    resized = resize(hu, (size, size), order=1, anti_aliasing=True, preserve_range=True)
    return resized, pixel_mm * (rows + cols) / (2 * size)


def _square(hu: np.ndarray) -> np.ndarray:
    """The slice centred in a square of air: the projector reconstructs square images."""
    rows, cols = hu.shape
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    return np.pad(hu, ((top, side - rows - top), (left, side - cols - left)), constant_values=HU_CLIP[0])


def input_slices(
    paths: Sequence[str | Path], size: int | None = None, per_series: int = PER_SERIES
) -> tuple[list[tuple[str, np.ndarray, float]], list[dict]]:
    """(name, HU clipped to [-1000, 3000], pixel size in mm) of up to ``per_series`` slices of each CT series or
    volume under ``paths``, evenly spaced and away from the ends; and ``{path, reason}`` for every input not used."""
    per_series = whole_number(per_series, "per_series", 1)
    items, errors = index_inputs(paths)
    errors = list(errors)
    by_series: dict[str, list[dict]] = {}
    for item in items:
        by_series.setdefault(item["series"], []).append(item)
    slices = []
    for series, members in by_series.items():
        picks = sorted({len(members) * (k + 1) // (per_series + 1) for k in range(per_series)})
        for index in picks:
            item = members[index]
            try:
                hu, in_hu = read_ct_slice(item["image"], item["frame"])
                pixel_mm = pixel_size_mm(item["image"], item["frame"]) if in_hu else None
            except InputError as error:
                errors.append({"path": item["image"], "reason": str(error)})
                continue
            if not in_hu:
                errors.append({"path": item["image"], "reason": "a rendered slice (TIFF/PNG) has no HU to project"})
                break
            rows, cols = hu.shape[-2:]
            if is_thumbnail(rows, cols):
                reason = f"{rows} x {cols} px is too small to simulate a scan of (at least {MIN_SCAN_SIDE} px across)"
                errors.append({"path": item["image"], "reason": reason})
                break
            if pixel_mm is None:
                logger.warning("%s: no pixel size in its header; %g mm assumed", item["image"], DEFAULT_PIXEL_MM)
                pixel_mm = DEFAULT_PIXEL_MM
            hu = _square(np.clip(hu[0].astype(np.float64), *HU_CLIP))
            slices.append((f"{series} [{index}]", *_resized(hu, pixel_mm, size)))
    return slices, errors


def soft_tissue_mask(hu: np.ndarray) -> np.ndarray:
    """Soft tissue (-100..150 HU) away from edges, where noise is measured."""
    mask = (hu > SOFT_TISSUE_HU[0]) & (hu < SOFT_TISSUE_HU[1])
    eroded: np.ndarray = ndimage.binary_erosion(mask, iterations=max(1, hu.shape[0] // 128))
    return eroded


# --- dose reduction in the projection domain -----------------------------------------------------


def view_count(size: int) -> int:
    """Views of the full scan: about size x VIEWS_PER_PIXEL, a multiple of 16 so that every sparse level is whole."""
    return max(16, int(round(VIEWS_PER_PIXEL * size / 16)) * 16)


def forward_project(hu: np.ndarray, pixel_mm: float, views: int) -> tuple[np.ndarray, np.ndarray]:
    """(line integrals of attenuation in detector bins x views, angles in degrees) of a full scan over [0, 180)."""
    from skimage.transform import radon

    mu = hu_to_mu(hu)
    theta = np.arange(views) * (180.0 / views)
    return radon(mu, theta, circle=False) * pixel_mm, theta


def noisy_projections(p: np.ndarray, i0: float, dose: float, rng: np.random.Generator) -> np.ndarray:
    """Line integrals measured with Poisson photon counts (and electronic noise) at ``dose`` x full dose."""
    expected = i0 * dose
    counts = rng.poisson(expected * np.exp(-p)) + rng.normal(0.0, ELECTRONIC_NOISE, p.shape)
    measured: np.ndarray = -np.log(np.maximum(counts, 1.0) / expected)
    return measured


def reconstruct(p: np.ndarray, theta: np.ndarray, size: int, pixel_mm: float) -> np.ndarray:
    """Filtered back-projection (Hann filter) of line integrals, in HU."""
    from skimage.transform import iradon

    return mu_to_hu(iradon(p, theta, output_size=size, filter_name="hann", circle=False) / pixel_mm)


def degrade(hu: np.ndarray, pixel_mm: float, rng: np.random.Generator, views: int | None = None) -> dict[str, Any]:
    """The noise set, the sparse-view set and the noiseless reconstruction of one slice (HU arrays).

    ``{"noise": [...], "views": [...], "clean": array, "levels": {"noise": doses, "views": view counts},
    "i0": photons per bin at full dose}``.
    """
    size = hu.shape[0]
    views = views or view_count(size)
    p, theta = forward_project(hu, pixel_mm, views)
    i0 = PHOTONS_PER_MM * pixel_mm
    measured = [noisy_projections(p, i0, dose, rng) for dose in DOSES]
    noise = [reconstruct(projections, theta, size, pixel_mm) for projections in measured]
    # every k-th view of the full-dose scan; the full scan itself is the noise set's first image
    sparse = [noise[0]] + [reconstruct(measured[0][:, ::k], theta[::k], size, pixel_mm) for k in VIEW_DIVISORS[1:]]
    return {
        "noise": noise,
        "views": sparse,
        "clean": reconstruct(p, theta, size, pixel_mm),
        "levels": {"noise": list(DOSES), "views": [views // k for k in VIEW_DIVISORS]},
        "i0": i0,
    }


# --- metrics ---------------------------------------------------------------------------------------


def spearman(levels: Sequence[float], scores: Sequence[float]) -> float:
    """Spearman's rho of (level, score); 0 when the scores are all equal (they rank nothing)."""
    if np.ptp(np.asarray(scores, dtype=float)) == 0:
        return 0.0
    return float(stats.spearmanr(levels, scores).statistic)


def pooled_spearman(per_slice: Sequence[dict[str, Any]], scorer: str) -> float | None:
    """Spearman (score, -measured error) over every distinct image of every slice (both sets; the sparse set's
    first image is the noise set's full dose, counted once); None when no slice has soft tissue to measure."""
    errors: list[float] = []
    scores: list[float] = []
    for entry in per_slice:
        for name, first in zip(SETS, (0, 1), strict=True):
            for error, score in zip(entry[name]["noise_hu"][first:], entry[name][scorer][first:], strict=True):
                if error is not None:
                    errors.append(-error)
                    scores.append(score)
    return spearman(errors, scores) if len(errors) > 2 else None


def pairs_correct(levels: Sequence[float], scores: Sequence[float]) -> float:
    """Fraction of (higher level, lower level) pairs whose higher level scores strictly higher."""
    pairs = [(a, b) if levels[a] > levels[b] else (b, a) for a, b in itertools.combinations(range(len(levels)), 2)]
    pairs = [(high, low) for high, low in pairs if levels[high] != levels[low]]
    return float(np.mean([scores[high] > scores[low] for high, low in pairs]))


# --- scoring ----------------------------------------------------------------------------------------


def _series_uid(slice_index: int, name: str) -> str:
    """A valid DICOM UID (pydicom's prefix), the same for the same (real slice, set)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["realcheck", str(slice_index), name]))


def model_scores(
    images: dict[tuple[int, str], list[np.ndarray]],
    ckpt: str | Path,
    device: str | None = None,
    batch_size: int = 16,
) -> dict[tuple[int, str], list[float]]:
    """Scores of every degraded image through the bundle's scoring path (DICOM series in a temporary folder).

    One series per (real slice, set), slice position = level index; scores come back per series in
    slice order. Only the mean score of each slice is used.
    """
    from scripts.clinical.score import SliceScorer, score_inputs

    scorer = SliceScorer.from_checkpoint(ckpt, device, batch_size, num_workers=0)
    with tempfile.TemporaryDirectory(prefix="realcheck_") as folder:
        keys = {}
        for (slice_index, name), levels in images.items():
            uid = _series_uid(slice_index, name)
            keys[uid] = (slice_index, name)
            for level, hu in enumerate(levels):
                write_dicom_slice(Path(folder) / f"slice{slice_index}_{name}" / f"{level:02d}.dcm", hu, uid, level)
        series, errors = score_inputs([folder], scorer)
    scores: dict[tuple[int, str], list[float]] = {}
    for entry in series:
        key = keys[entry.name]
        positions = [int(round(item["position"])) for item in entry.items]
        if positions != list(range(len(images[key]))):
            raise RealCheckError(f"scoring returned slices {positions} of series {entry.name}")
        scores[key] = [float(value) for value in entry.scores]
    missing = [key for key in images if key not in scores]
    if missing or errors:
        raise RealCheckError(f"the scoring path failed on the degraded slices: {errors or missing}")
    return scores


# --- the check ------------------------------------------------------------------------------------


def _measured_noise(images: list[np.ndarray], clean: np.ndarray, mask: np.ndarray) -> list[float | None]:
    """Standard deviation (HU) of each image minus the noiseless reconstruction, in soft tissue (None: none)."""
    if not mask.any():
        return [None] * len(images)
    return [float(np.std((image - clean)[mask])) for image in images]


def run_realcheck(
    ckpt: str | Path,
    output_dir: str | Path | None = None,
    size: int | None = None,
    seed: int = 0,
    device: str | None = None,
    batch_size: int = 16,
    inputs: Sequence[str | Path] | None = None,
    per_series: int = PER_SERIES,
) -> dict[str, Any]:
    """The real-data check (see the module's docstring); writes ``realcheck.json`` in ``output_dir`` when given.

    Returns ``{"noise": {"model": {"spearman", "pairs"}, "baseline": {...}}, "views": {...}, "pooled": {"model":
    {"spearman"}, "baseline": {...}}, "slices": names,
    "per_slice": [...], "not_used": [{path, reason}], "size": size, "seed": seed, "seconds": ..}``.
    """
    start = time.perf_counter()
    device = str(usable_device(device))  # a device this machine lacks fails before the simulation
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs or [])
    if inputs:
        real, not_used = input_slices(inputs, size, per_series)
        if not real:
            reasons = "; ".join(f"{error['path']}: {error['reason']}" for error in not_used[:3]) or "nothing found"
            raise RealCheckError(f"no CT slice in HU among the inputs ({reasons})")
        streams = list(range(len(real)))
    else:
        real = [(path.name, *read_real_slice(path, size)) for path in find_check_files()]
        not_used = []
        # one random stream per shipped slice: the same images whichever other slices are installed
        streams = [CHECK_FILES.index(name) for name, _, _ in real]
    images: dict[tuple[int, str], list[np.ndarray]] = {}
    per_slice: list[dict[str, Any]] = []
    for index, ((label, hu, pixel_mm), stream) in enumerate(zip(real, streams, strict=True)):
        degraded = degrade(hu, pixel_mm, np.random.default_rng([seed, stream]))
        mask = soft_tissue_mask(hu)
        entry: dict[str, Any] = {"name": label, "size": hu.shape[0], "pixel_mm": pixel_mm, "i0": degraded["i0"]}
        for name in SETS:
            images[index, name] = degraded[name]
            entry[name] = {
                "levels": degraded["levels"][name],
                "noise_hu": _measured_noise(degraded[name], degraded["clean"], mask),
                "baseline": [baseline_score(window_hu(image)) for image in degraded[name]],
            }
        per_slice.append(entry)
    simulated = time.perf_counter()
    scores = model_scores(images, ckpt, device, batch_size)
    result: dict[str, Any] = {"slices": [entry["name"] for entry in per_slice]}
    for name in SETS:
        result[name] = {}
        for index, entry in enumerate(per_slice):
            entry[name]["model"] = scores[index, name]
        for scorer in SCORERS:
            for entry in per_slice:
                levels, values = entry[name]["levels"], entry[name][scorer]
                entry[name][f"{scorer}_spearman"] = spearman(levels, values)
                entry[name][f"{scorer}_pairs"] = pairs_correct(levels, values)
            result[name][scorer] = {
                metric: float(np.mean([entry[name][f"{scorer}_{metric}"] for entry in per_slice]))
                for metric in ("spearman", "pairs")
            }
    result["pooled"] = {scorer: {"spearman": pooled_spearman(per_slice, scorer)} for scorer in SCORERS}
    end = time.perf_counter()
    result.update(
        per_slice=per_slice,
        not_used=not_used,
        inputs=[str(path) for path in inputs],
        size=size,
        seed=seed,
        seconds=end - start,
        simulation_seconds=simulated - start,
        scoring_seconds=end - simulated,
    )
    if output_dir is not None:
        write_json_atomic(Path(output_dir) / RESULT_FILE, result)
    return result


def _scorers_line(label: str, parts: list[str]) -> str:
    """One printed line: its label, then each scorer's part in its own column."""
    return f"  {label:<18}" + "   |  ".join(part.ljust(PART_WIDTH) for part in parts).rstrip()


def realcheck_lines(result: dict[str, Any]) -> list[str]:
    """The check's report as printed lines: one header, one line per set with both scorers side by side, and one
    across slices."""
    n = len(result["slices"])
    which = "of the inputs" if result.get("inputs") else "never used in training"
    lines = [
        f"real-data check ({n} real CT slice{'s' if n != 1 else ''} {which}, dose reduced in the projection domain)"
    ]
    labels = {"noise": f"noise ({len(DOSES)} doses)", "views": f"sparse ({len(VIEW_DIVISORS)} views)"}
    for name in SETS:
        parts = []
        for scorer in SCORERS:
            figures = result[name][scorer]
            parts.append(f"{scorer}  Spearman {figures['spearman']:.2f}  pairs {100 * figures['pairs']:.1f}%")
        lines.append(_scorers_line(labels[name], parts))
    if result.get("pooled"):  # absent from a realcheck.json written before it was measured
        parts = []
        for scorer in SCORERS:
            value = result["pooled"][scorer]["spearman"]
            parts.append(f"{scorer}  Spearman {'n/a' if value is None else f'{value:.2f}'}")
        lines.append(_scorers_line("across slices", parts) + "   (score against measured error, pooled)")
    not_used = result.get("not_used", [])
    lines += [f"  not used: {error['path']}: {error['reason']}" for error in not_used[:LISTED_NOT_USED]]
    if len(not_used) > LISTED_NOT_USED:
        lines.append(f"  ... and {len(not_used) - LISTED_NOT_USED} more inputs not used ({RESULT_FILE} lists them)")
    return lines
