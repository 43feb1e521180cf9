"""The synthetic low-dose CT generator: LDCTIQA layouts, real scanner physics, learnable and reproducible scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
import torch.nn.functional as F

from scripts.ct_io import window_hu
from scripts.data import ldct_labelled_items
from scripts.synth_ct import (
    fbp,
    full_views,
    hu_to_mu,
    latent_quality,
    load_sources,
    make_anatomy,
    mu_to_hu,
    project,
    rate,
    synthesize_slices,
    write_ct_dataset,
)

SIZE = 64


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


def test_anatomy_differs_slice_to_slice() -> None:
    source = np.array([-1, -1, -1, 0, 0, 0])
    hu = make_anatomy(np.random.default_rng(0), source, SIZE)
    assert hu.shape == (6, SIZE, SIZE) and hu.min() >= -1000 and hu.max() <= 3000
    flat = hu.reshape(6, -1)
    distances = torch.cdist(flat, flat) / SIZE
    assert (distances + torch.eye(6) * 1e9).min() > 5.0, "every slice has its own anatomy"


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
    # the Hann window softens edges but keeps the levels
    assert (mu_to_hu(fbp(sinogram, hann=True)) - hu)[flat].abs().mean() < 3.0


def test_lower_dose_means_more_noise_and_lower_scores() -> None:
    fixed = {"view_steps": (1,), "view_weights": None}
    high = synthesize_slices(16, SIZE, seed=2, dose_range=(1.0, 1.0), **fixed)
    low = synthesize_slices(16, SIZE, seed=2, dose_range=(0.03, 0.03), **fixed)
    assert (low["noise_hu"] > 2 * high["noise_hu"]).all()
    assert (high["streak_hu"] == 0).all() and (high["views"] == full_views(SIZE)).all()
    # the noise is in the pixels: same anatomy (same seed), compared with a practically noise-free scan
    clean = synthesize_slices(16, SIZE, seed=2, dose_range=(1e6, 1e6), **fixed)["image"]
    pixel_noise = {name: (scan["image"] - clean).std(axis=(1, 2)) for name, scan in (("high", high), ("low", low))}
    assert (pixel_noise["low"] > 2 * pixel_noise["high"]).all()
    assert low["score"].mean() < high["score"].mean() - 1.0


def test_fewer_views_mean_streaks_and_lower_scores() -> None:
    dose = {"dose_range": (0.5, 0.5), "view_weights": None}
    full = synthesize_slices(16, SIZE, seed=4, view_steps=(1,), **dose)
    sparse = synthesize_slices(16, SIZE, seed=4, view_steps=(8,), **dose)
    assert (sparse["views"] == full_views(SIZE) // 8).all()
    assert (sparse["streak_hu"] > 5.0).all()
    assert (sparse["quality"] < full["quality"]).all()
    assert sparse["score"].mean() < full["score"].mean() - 1.0


def test_quality_falls_with_noise_and_streaks_and_raters_disagree() -> None:
    noise = np.array([5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0])
    np.testing.assert_allclose(latent_quality(noise, np.zeros(7)), [4, 4, 3, 2, 1, 0, 0], atol=0.35)
    assert (np.diff(latent_quality(np.full(5, 20.0), np.array([0.0, 5, 10, 20, 40]))) < 0).all()
    scores = rate(np.full(2000, 2.0), np.random.default_rng(0))
    assert _is_multiple_of_fifth(scores) and ((scores >= 0) & (scores <= 4)).all()
    assert abs(scores.mean() - 2.0) < 0.2 and 0.1 < scores.std() < 0.4, "five raters: mean near q, some spread"
    np.testing.assert_array_equal(scores, rate(np.full(2000, 2.0), np.random.default_rng(0)))
