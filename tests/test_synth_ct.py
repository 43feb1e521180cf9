"""The synthetic low-dose CT generator: LDCTIQA layouts, a scanner's noise and streaks, reproducible scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F
from scripts.ct_io import window_hu
from scripts.data import ldct_labelled_items
from scripts.synthetic import ct as synth_ct
from scripts.synthetic.ct import (
    CHECK_FILES,
    KERNELS,
    SOURCE_FILES,
    fbp,
    full_views,
    hu_to_mu,
    latent_quality,
    load_sources,
    make_anatomy,
    mu_to_hu,
    pixel_mm,
    project,
    rate,
    scanner_noise,
    synthesize_slices,
    write_ct_dataset,
)

SIZE = 64
# a typical adult abdomen at routine settings: 330 mm wide in a 358 mm field of view, analytic phantoms
TYPICAL = {"fov_range": (358.4, 358.4), "body_width_range": (330.0, 330.0), "phantom_fraction": 1.0}
FULL_VIEWS_ONLY = {"view_steps": (1,), "view_weights": None}
STANDARD = {"kernels": ("standard",), "kernel_weights": None}


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 slices of 64 px in the training layout, seed 0."""
    return write_ct_dataset(tmp_path_factory.mktemp("synth_ct"), n=24, size=SIZE, seed=0)


def _is_multiple_of_fifth(values: np.ndarray) -> bool:
    return bool(np.allclose(np.asarray(values) * 5, np.rint(np.asarray(values) * 5), atol=1e-9))


def test_train_layout_passes_the_dataset_checks(train_dir: Path) -> None:
    items = ldct_labelled_items(train_dir)
    assert [Path(it["image"]).name for it in items] == [f"{i:04d}.tif" for i in range(24)]
    labels = np.array([it["label"] for it in items])
    assert ((labels >= 0) & (labels <= 4)).all() and _is_multiple_of_fifth(labels)
    assert labels.max() - labels.min() >= 2.0, "scores should spread over most of 0..4"
    for item in items:
        pixels = tifffile.imread(item["image"])
        assert pixels.dtype == np.float32 and pixels.shape == (SIZE, SIZE)
        assert pixels.min() >= 0.0 and pixels.max() <= 1.0


def test_test_layout(tmp_path: Path) -> None:
    root = write_ct_dataset(tmp_path, n=4, size=SIZE, seed=1, layout="test")
    assert root == tmp_path
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"test{i:03d}.tiff" for i in range(4)]
    assert sorted(json.loads((root / "test.json").read_text())) == [f"test{i:03d}.tiff" for i in range(4)]
    assert not (root / "train.json").exists()
    assert len(ldct_labelled_items(root)) == 4
    with pytest.raises(ValueError, match="layout"):
        write_ct_dataset(tmp_path / "bad", n=1, size=SIZE, layout="validation")


def test_same_seed_same_files_other_seed_differs(train_dir: Path, tmp_path: Path) -> None:
    again = write_ct_dataset(tmp_path / "again", n=24, size=SIZE, seed=0)
    assert (again / "train.json").read_text() == (train_dir / "train.json").read_text()
    for name in ("0000.tif", "0013.tif", "0023.tif"):
        assert (again / "image" / name).read_bytes() == (train_dir / "image" / name).read_bytes()
    other = synthesize_slices(24, SIZE, seed=1)
    first = np.stack([tifffile.imread(train_dir / "image" / f"{i:04d}.tif") for i in range(24)])
    assert not np.array_equal(other["image"], first)
    labels = json.loads((train_dir / "train.json").read_text())
    assert list(other["score"]) != list(labels.values())


def test_records_hold_kernel_and_pixel_size() -> None:
    out = synthesize_slices(16, SIZE, seed=5)
    assert set(out["kernel"]) <= set(KERNELS) and len(set(out["kernel"])) >= 2
    assert ((out["pixel_mm"] * SIZE >= 300 - 1e-6) & (out["pixel_mm"] * SIZE <= 480 + 1e-6)).all()
    assert out["pixel_mm"].std() > 0, "every slice draws its own field of view"
    assert pixel_mm(512) == pytest.approx(0.7) and pixel_mm(512, 480.0) == pytest.approx(0.9375)


def test_window_hu() -> None:
    hu = np.array([-2000.0, -1000.0, -300.0, 400.0, 1500.0])
    np.testing.assert_allclose(window_hu(hu), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(window_hu(torch.from_numpy(hu)).numpy(), [0.0, 0.0, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(window_hu(hu, low=-160.0, high=240.0), [0.0, 0.0, 0.0, 1.0, 1.0])


def test_real_sources_are_ct_in_hu() -> None:
    sources = load_sources()
    assert len(sources) >= 1  # CT_small.dcm ships with pydicom; pydicom-data adds three more
    for hu in sources:
        assert hu.ndim == 2 and hu.shape[0] == hu.shape[1] and hu.dtype == np.float32
        assert hu.min() >= -1000 and hu.max() <= 3000
        assert np.mean(np.abs(hu) < 100) > 0.1, "a CT slice holds soft tissue near 0-100 HU"


def test_sources_exclude_the_real_data_check_files(monkeypatch: pytest.MonkeyPatch) -> None:
    assert set(CHECK_FILES) == {"explicit_VR-UN.dcm", "J2K_pixelrep_mismatch.dcm", "bad_sequence.dcm"}
    assert not set(SOURCE_FILES) & set(CHECK_FILES)
    import pydicom.data

    asked: list[str] = []
    original = pydicom.data.get_testdata_file

    def recording(name: str, *args: object, **kwargs: object) -> object:
        asked.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(pydicom.data, "get_testdata_file", recording)
    paths = synth_ct.source_paths()
    assert asked == list(SOURCE_FILES)
    assert {p.name for p in paths} <= set(SOURCE_FILES) and not {p.name for p in paths} & set(CHECK_FILES)
    # and the files the generator reads are those
    read: list[str] = []
    dcmread = pydicom.dcmread

    def reading(path: object, *args: object, **kwargs: object) -> object:
        read.append(Path(str(path)).name)
        return dcmread(path, *args, **kwargs)

    monkeypatch.setattr(pydicom, "dcmread", reading)
    assert len(load_sources.__wrapped__()) >= 1
    assert read and set(read) <= set(SOURCE_FILES)


def test_anatomy_differs_slice_to_slice() -> None:
    source = np.array([-1, -1, -1, 0, 0, 0])
    hu = make_anatomy(np.random.default_rng(0), source, SIZE)
    assert hu.shape == (6, SIZE, SIZE) and hu.min() >= -1000 and hu.max() <= 3000
    flat = hu.reshape(6, -1)
    distances = torch.cdist(flat, flat) / SIZE
    assert (distances + torch.eye(6) * 1e9).min() > 5.0, "every slice has its own anatomy"


def test_anatomy_has_the_drawn_body_width() -> None:
    size, fov = 128, np.array([400.0, 400.0, 480.0, 300.0])
    width = np.array([300.0, 400.0, 250.0, 270.0])
    hu = make_anatomy(np.random.default_rng(1), np.array([-1, -1, -1, 0]), size, fov, width)
    columns = (hu > -500).any(1).float()  # (B, size): columns holding tissue
    measured = columns.sum(1).numpy() * fov / size
    np.testing.assert_allclose(measured, width, rtol=0.08)


def _disc_phantom(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Water body with a fat ring, a lung, a bone and a contrast vessel, band-limited by a one-pixel
    Gaussian as a scanned object is: (1, size, size) HU, and the pixels at least 4 px from any edge."""
    centre = (torch.arange(size) * 2 + 1) / size - 1
    y, x = centre[:, None], centre[None, :]
    hu = torch.full((size, size), -1000.0)
    for cx, cy, radius, value in [(0, 0, 0.8, -100), (0, 0, 0.7, 40), (-0.3, 0, 0.25, -850), (0.3, 0.2, 0.15, 700)]:
        hu[(x - cx) ** 2 + (y - cy) ** 2 < radius**2] = value
    hu[(x - 0.25) ** 2 + (y + 0.35) ** 2 < 0.1**2] = 200.0
    spread = F.max_pool2d(hu[None, None], 9, 1, 4) + F.max_pool2d(-hu[None, None], 9, 1, 4)
    flat = (spread[0] == 0) & (hu > -900)
    kernel = torch.exp(-(torch.arange(-3.0, 4.0) ** 2) / 2)
    kernel = kernel / kernel.sum()
    blurred = F.conv2d(hu[None, None] + 1000, kernel.view(1, 1, 1, 7), padding=(0, 3))
    blurred = F.conv2d(blurred, kernel.view(1, 1, 7, 1), padding=(3, 0))
    return blurred[0] - 1000, flat


def test_fbp_of_a_noise_free_full_scan_reconstructs_the_phantom() -> None:
    hu, flat = _disc_phantom(128)
    assert flat.float().mean() > 0.15
    sinogram = project(hu_to_mu(hu))
    assert sinogram.shape == (1, full_views(128), 128)
    recon = mu_to_hu(fbp(sinogram, hann=False))
    assert (recon - hu)[flat].abs().mean() < 3.0, "HU levels within a few HU away from edges"
    body = hu > -900
    error = torch.linalg.norm(hu_to_mu(recon)[body] - hu_to_mu(hu)[body]) / torch.linalg.norm(hu_to_mu(hu)[body])
    assert error < 0.03, f"relative error {error:.3f} in the body"
    # the soft-tissue kernels keep the levels; the sharper the kernel, the steeper the edges
    recons = {kernel: mu_to_hu(fbp(sinogram, kernel=kernel)) for kernel in KERNELS}
    assert all((recons[kernel] - hu)[flat].abs().mean() < 3.0 for kernel in ("smooth", "standard"))
    steepest = [float((recons[kernel][..., 1:] - recons[kernel][..., :-1]).abs().max()) for kernel in KERNELS]
    assert steepest[0] < steepest[1] < steepest[2], f"largest steps between pixels {steepest} HU"


def _cylinder(size: int, ax: float, ay: float, batch: int) -> torch.Tensor:
    """Water ellipses (B, size, size) HU with half axes ``ax``, ``ay`` in field-of-view units."""
    centre = torch.from_numpy(synth_ct._pixel_centres(size)).float()
    inside = (centre[None, :] / ax) ** 2 + (centre[:, None] / ay) ** 2 < 1
    return torch.where(inside, 0.0, -1000.0).expand(batch, size, size).clone()


def _noise_only(hu: torch.Tensor, kernel: str, dose: float = 1.0) -> torch.Tensor:
    batch = len(hu)
    generator = torch.Generator().manual_seed(0)
    noise, _ = scanner_noise(
        hu, np.full(batch, dose), np.ones(batch, int), [kernel] * batch, np.full(batch, 358.4), generator
    )
    return noise


def test_noise_power_spectrum_peaks_higher_for_sharper_kernels() -> None:
    size = 256
    water = _cylinder(size, 0.7, 0.7, 4)
    frequency = torch.fft.fftfreq(size)
    radius = torch.sqrt(frequency[None, :] ** 2 + frequency[:, None] ** 2)
    ring = (radius * size).round().long().clamp(max=size // 2).flatten()
    peaks, sds = [], []
    for kernel in ("smooth", "standard", "sharp"):
        noise = _noise_only(water, kernel)
        power = (torch.fft.fft2(noise).abs() ** 2).mean(0).flatten()
        radial = torch.zeros(size // 2 + 1).index_add_(0, ring, power) / torch.bincount(ring, minlength=size // 2 + 1)
        radial = np.convolve(radial.numpy(), np.ones(5) / 5, mode="same")[: size // 2]
        peaks.append(np.argmax(radial) / size)
        sds.append(float(noise[water > -300].std()))
    assert peaks[0] < peaks[1] < peaks[2], f"NPS peaks {peaks} cycles/pixel"
    assert 0.08 < peaks[0] < 0.13 and 0.13 < peaks[1] < 0.18 and 0.25 < peaks[2] < 0.33
    assert sds[0] < sds[1] < sds[2] and 2.0 < sds[2] / sds[1] < 3.2, "a sharp kernel 2-3 times the noise"


def test_noise_runs_along_the_long_axis_of_an_elliptical_body() -> None:
    size = 128
    wide = _cylinder(size, 0.85, 0.55, 4)  # long axis left-right
    batch = len(wide)
    generator = torch.Generator().manual_seed(0)
    noise, per_view = scanner_noise(
        wide, np.ones(batch), np.ones(batch, int), ["standard"] * batch, np.full(batch, 358.4), generator
    )
    views = per_view.shape[-1]
    # the view whose rays run left-right (angle pi/2) crosses the most tissue: the noisiest
    assert per_view[:, views // 2].min() > 3 * per_view[:, 0].max()
    assert torch.allclose(per_view.mean(-1), torch.ones(batch))
    frequency = torch.fft.fftfreq(size)
    fx, fy = frequency[None, :].expand(size, size), frequency[:, None].expand(size, size)
    direction = torch.remainder(torch.atan2(fy, fx), math.pi)
    ring = (torch.sqrt(fx**2 + fy**2) > 0.05) & (torch.sqrt(fx**2 + fy**2) < 0.45)
    power = (torch.fft.fft2(noise).abs() ** 2).mean(0)
    across = power[ring & ((direction - math.pi / 2).abs() < math.pi / 6)].mean()  # varies top-bottom
    along = power[ring & ((direction < math.pi / 6) | (direction > 5 * math.pi / 6))].mean()
    assert across > 2.5 * along, "grains elongated left-right, as on real scanners"


def test_routine_dose_noise_and_its_growth_as_dose_falls() -> None:
    fixed = {**TYPICAL, **FULL_VIEWS_ONLY, **STANDARD}
    scans = {dose: synthesize_slices(8, SIZE, seed=2, dose_range=(dose, dose), **fixed) for dose in (1.0, 0.25, 1 / 40)}
    routine, quarter, lowest = scans[1.0], scans[0.25], scans[1 / 40]
    assert 9.0 < routine["noise_hu"].mean() < 15.0, "routine abdominal CT: 10-15 HU"
    ratio = quarter["noise_hu"] / routine["noise_hu"]
    assert ((ratio > 1.8) & (ratio < 2.2)).all(), f"quarter/full noise {ratio}"
    assert (lowest["noise_hu"] > math.sqrt(40) * routine["noise_hu"]).all(), "electronic noise adds at ultra-low dose"
    assert (lowest["noise_hu"] < 1.3 * math.sqrt(40) * routine["noise_hu"]).all()
    assert (routine["streak_hu"] == 0).all() and (routine["views"] == full_views(SIZE)).all()
    # the noise is in the pixels: same anatomy and noise draws (same seed), against a practically noise-free scan
    clean = synthesize_slices(8, SIZE, seed=2, dose_range=(1e6, 1e6), **fixed)["image"]
    pixel_noise = [(scan["image"] - clean).std(axis=(1, 2)) for scan in (routine, quarter, lowest)]
    assert (pixel_noise[0] < pixel_noise[1]).all() and (pixel_noise[1] < pixel_noise[2]).all()
    # routine dose scores at the top, and lower dose scores lower
    assert routine["quality"].min() > 3.8 and routine["score"].mean() > 3.4
    assert quarter["score"].mean() < routine["score"].mean() - 0.5
    assert lowest["score"].mean() < quarter["score"].mean() - 1.5


def test_fewer_views_mean_streaks_and_lower_scores() -> None:
    dose = {"dose_range": (0.5, 0.5), "view_weights": None}
    full = synthesize_slices(16, SIZE, seed=4, view_steps=(1,), **dose)
    sparse = synthesize_slices(16, SIZE, seed=4, view_steps=(8,), **dose)
    halved = synthesize_slices(16, SIZE, seed=4, view_steps=(2,), **dose)
    assert (sparse["views"] == full_views(SIZE) // 8).all()
    assert (full["streak_hu"] == 0).all() and (halved["streak_hu"] > 0).all()
    assert (sparse["streak_hu"] > 5.0).all() and (sparse["streak_hu"] > halved["streak_hu"]).all()
    assert (halved["noise_hu"] > full["noise_hu"]).all(), "fewer views, fewer photons"
    assert (sparse["quality"] < halved["quality"]).all() and (halved["quality"] <= full["quality"]).all()
    assert halved["quality"].mean() < full["quality"].mean() - 0.3
    assert sparse["score"].mean() < full["score"].mean() - 1.0


def test_quality_falls_with_noise_and_streaks_and_raters_disagree() -> None:
    noise = np.array([5.0, 12.3, 24.6, 49.2, 98.5, 197.0, 400.0])
    np.testing.assert_allclose(latent_quality(noise, np.zeros(7)), [4, 4, 3, 2, 1, 0, 0], atol=0.05)
    assert (np.diff(latent_quality(np.full(5, 20.0), np.array([0.0, 5, 10, 20, 40]))) < 0).all()
    scores = rate(np.full(2000, 2.0), np.random.default_rng(0))
    assert _is_multiple_of_fifth(scores) and ((scores >= 0) & (scores <= 4)).all()
    assert abs(scores.mean() - 2.0) < 0.2 and 0.1 < scores.std() < 0.4, "five raters: mean near q, some spread"
    np.testing.assert_array_equal(scores, rate(np.full(2000, 2.0), np.random.default_rng(0)))


def test_the_command_writes_each_layout_and_names_an_unknown_one(tmp_path: Path, capsys) -> None:
    """``synth_ct --layout scored_ct`` writes a reader study that check_data accepts (n slices, 4 a patient)."""
    from scripts.__main__ import synth_ct as synth_ct_command
    from scripts.data import check_dataset

    synth_ct_command(str(tmp_path / "study"), n=10, size=32, layout="scored_ct")
    summary = check_dataset(layout="scored_ct", labels=str(tmp_path / "study" / "labels.csv"))
    assert (summary["images"], summary["patients"]) == (12, 3)
    with pytest.raises(SystemExit) as stopped:
        synth_ct_command(str(tmp_path / "other"), layout="scored")
    assert stopped.value.code == 1
    assert "layout must be train, test or scored_ct, got 'scored'" in capsys.readouterr().err
