"""The real-data check: real CT slices with their dose lowered in the projection domain, scored by dose."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pytest
import scipy.stats
import scripts
import tifffile
import torch
from pydicom.data import get_testdata_file
from scripts import __main__ as cli
from scripts.clinical.score import SliceScorer
from scripts.ct_inputs import pixel_size_mm
from scripts.ct_io import write_dicom_slice
from scripts.options import OptionError
from scripts.tools import realcheck
from scripts.tools.realcheck import (
    CHECK_FILES,
    DEFAULT_PIXEL_MM,
    DOSES,
    SCORERS,
    SETS,
    VIEW_DIVISORS,
    VIEWS_PER_PIXEL,
    RealCheckError,
    degrade,
    find_check_files,
    model_scores,
    pairs_correct,
    pooled_spearman,
    read_real_slice,
    realcheck_lines,
    run_realcheck,
    soft_tissue_mask,
    spearman,
    view_count,
)

from tests.conftest import REPO_ROOT

SIZE = 96


@pytest.fixture(scope="module")
def abdomen() -> tuple[np.ndarray, float]:
    """The abdomen slice at 128 px (HU, pixel size in mm)."""
    return read_real_slice(find_check_files(CHECK_FILES[:1])[0], size=128)


@pytest.fixture(scope="module")
def abdomen_degraded(abdomen: tuple[np.ndarray, float]) -> dict:
    return degrade(*abdomen, np.random.default_rng(0))


def test_real_slices_are_read_in_hu_with_their_spacing() -> None:
    paths = find_check_files()
    assert [path.name for path in paths] == list(CHECK_FILES)
    spacings = []
    for path in paths:
        hu, pixel_mm = read_real_slice(path)
        assert hu.shape == (512, 512)
        assert hu.min() >= -1000.0 and hu.max() <= 3000.0  # padding outside the field of view clipped
        spacings.append(pixel_mm)
        small, small_mm = read_real_slice(path, size=SIZE)
        assert small.shape == (SIZE, SIZE)
        assert small_mm == pytest.approx(pixel_mm * 512 / SIZE)  # the field of view is kept
    assert spacings == pytest.approx([0.859375, 0.431, 0.287109375])


def test_missing_real_slices_are_skipped_with_a_warning_and_none_is_an_error(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="scripts.tools.realcheck"):
        found = find_check_files(["not_a_test_file.dcm", CHECK_FILES[0]])
    assert [path.name for path in found] == [CHECK_FILES[0]]
    assert "not_a_test_file.dcm" in caplog.text
    with pytest.raises(RealCheckError, match="pydicom-data"):
        find_check_files(["not_a_test_file.dcm"])


def test_noise_grows_as_dose_falls(abdomen, abdomen_degraded) -> None:
    hu, _ = abdomen
    mask = soft_tissue_mask(hu)
    assert mask.sum() > 100
    noise = [float(np.std((image - abdomen_degraded["clean"])[mask])) for image in abdomen_degraded["noise"]]
    assert abdomen_degraded["levels"]["noise"] == list(DOSES)
    assert all(low < high for low, high in zip(noise, noise[1:], strict=False))
    assert noise[2] / noise[0] == pytest.approx(2.0, abs=0.4)  # quantum noise: SD ~ 1 / sqrt(dose)
    assert noise[4] / noise[0] == pytest.approx(4.0, abs=1.0)


def test_fewer_views_give_more_streak_and_noise_energy(abdomen, abdomen_degraded) -> None:
    hu, _ = abdomen
    body = hu > -500
    energy = [
        float(np.sqrt(np.mean((image - abdomen_degraded["clean"])[body] ** 2))) for image in abdomen_degraded["views"]
    ]
    assert abdomen_degraded["levels"]["views"] == [view_count(128) // k for k in VIEW_DIVISORS]
    assert all(low < high for low, high in zip(energy, energy[1:], strict=False))
    assert energy[-1] > 4 * energy[0]  # streaks, not only the noise of fewer photons (which would be 4x)
    np.testing.assert_array_equal(abdomen_degraded["views"][0], abdomen_degraded["noise"][0])  # the shared scan


def test_degradation_is_seeded(abdomen) -> None:
    first, again = (degrade(*abdomen, np.random.default_rng(3))["noise"][2] for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, degrade(*abdomen, np.random.default_rng(4))["noise"][2])


def test_view_count_follows_the_size_and_divides_into_the_sparse_levels() -> None:
    assert view_count(512) == 512
    for size in (64, 96, 128, 200, 256, 512):
        assert view_count(size) % VIEW_DIVISORS[-1] == 0
        assert view_count(size) == pytest.approx(VIEWS_PER_PIXEL * size, rel=0.15)


def test_ranking_metrics() -> None:
    levels = [1.0, 0.5, 0.25]
    assert pairs_correct(levels, [3.0, 2.0, 1.0]) == 1.0
    assert pairs_correct(levels, [3.0, 3.0, 1.0]) == pytest.approx(2 / 3)  # a tie counts as wrong
    assert pairs_correct(levels, [1.0, 2.0, 3.0]) == 0.0
    assert spearman(levels, [3.0, 2.0, 1.0]) == pytest.approx(1.0)
    assert spearman(levels, [2.0, 2.0, 2.0]) == 0.0  # constant scores rank nothing


def test_pooled_spearman_ranks_every_distinct_image_of_every_slice_by_its_error() -> None:
    """Pooled across slices: each distinct image once (the sparse set's first image is the noise set's full
    dose), images without a measured error left out; equal to scipy's Spearman on the same pairs."""
    abdomen = {
        "noise": {"noise_hu": [10.0, 20.0, 40.0], "model": [3.5, 3.0, 1.0]},
        "views": {"noise_hu": [10.0, 30.0, 80.0], "model": [3.5, 2.0, 2.5]},
    }
    neck = {
        "noise": {"noise_hu": [15.0, 25.0, None], "model": [3.8, 2.9, 0.2]},
        "views": {"noise_hu": [15.0, 35.0, 60.0], "model": [3.8, 1.5, 1.2]},
    }
    errors = [10.0, 20.0, 40.0, 30.0, 80.0, 15.0, 25.0, 35.0, 60.0]
    scores = [3.5, 3.0, 1.0, 2.0, 2.5, 3.8, 2.9, 1.5, 1.2]
    expected = scipy.stats.spearmanr(np.negative(errors), scores).statistic
    assert pooled_spearman([abdomen, neck], "model") == pytest.approx(expected)
    assert 0.5 < expected < 1.0  # the neck's clean 3.8 above the abdomen's, the abdomen's 80 HU above 60: not 1
    no_soft_tissue = {name: {"noise_hu": [None] * 3, "model": [3.0, 2.0, 1.0]} for name in SETS}
    assert pooled_spearman([no_soft_tissue], "model") is None


class MeanIntensity(torch.nn.Module):
    """A stand-in network whose score is 4 x the mean of its (min-max scaled) input: known scores for known images."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return 4.0 * images.mean(dim=(1, 2, 3))[:, None]


def coded_image(code: int) -> np.ndarray:
    """Air with ``code`` of 32 rows bright: scored 4 * code / 32 by ``MeanIntensity``."""
    image = np.full((32, 32), -1000.0)
    image[:code] = 400.0
    return image


def test_model_scores_map_back_to_slice_set_and_level(tiny_checkpoint, monkeypatch) -> None:
    real = SliceScorer.from_checkpoint.__func__

    def mean_scorer(cls, *args, **kwargs) -> SliceScorer:
        scorer = real(cls, *args, **kwargs)
        scorer.network = MeanIntensity()
        return scorer

    monkeypatch.setattr(SliceScorer, "from_checkpoint", classmethod(mean_scorer))
    # a different image for every (slice, set, level), levels out of score order
    codes = {
        (index, name): [1 + 10 * index + 5 * SETS.index(name) + (3 * level) % 5 for level in range(5)]
        for index in range(3)
        for name in SETS
    }
    images = {key: [coded_image(code) for code in levels] for key, levels in codes.items()}
    scores = model_scores(images, tiny_checkpoint, device="cpu", batch_size=4)
    assert set(scores) == set(images)
    for key, levels in codes.items():
        assert scores[key] == pytest.approx([4.0 * code / 32 for code in levels], abs=0.04)


def test_run_realcheck_with_a_checkpoint(tiny_checkpoint, tmp_path) -> None:
    result = run_realcheck(tiny_checkpoint, tmp_path, size=SIZE, seed=0, device="cpu", batch_size=8)
    assert result["slices"] == list(CHECK_FILES)
    for name in SETS:
        for scorer in SCORERS:
            assert -1.0 <= result[name][scorer]["spearman"] <= 1.0
            assert 0.0 <= result[name][scorer]["pairs"] <= 1.0
    assert result["noise"]["baseline"]["spearman"] >= 0.9  # the noise estimator sees the dose even at 96 px
    for scorer in SCORERS:
        assert result["pooled"][scorer]["spearman"] == pytest.approx(pooled_spearman(result["per_slice"], scorer))
    assert result["pooled"]["baseline"]["spearman"] >= 0.7  # noise is comparable across slices for it, too
    assert len(result["per_slice"]) == len(CHECK_FILES)
    for entry in result["per_slice"]:
        assert entry["size"] == SIZE
        assert entry["noise"]["levels"] == list(DOSES)
        assert entry["views"]["levels"] == [view_count(SIZE) // k for k in VIEW_DIVISORS]
        for name in SETS:
            assert len(entry[name]["model"]) == len(entry[name]["baseline"]) == 5
            assert all(0.0 <= value <= 4.0 for value in entry[name]["model"])
    assert result["seconds"] > 0
    assert json.loads((tmp_path / "realcheck.json").read_text()) == json.loads(json.dumps(result))

    lines = realcheck_lines(result)
    assert lines[0].startswith("real-data check (3 real CT slices never used in training")
    assert [line.split()[0] for line in lines[1:]] == ["noise", "sparse", "across"]
    for line in lines[1:3]:
        assert "model" in line and "baseline" in line and "Spearman" in line and "pairs" in line
    model, baseline = (result["pooled"][scorer]["spearman"] for scorer in SCORERS)
    assert f"model  Spearman {model:.2f}" in lines[3] and f"baseline  Spearman {baseline:.2f}" in lines[3]
    assert lines[1].index("|") == lines[2].index("|") == lines[3].index("|")  # each scorer in its own column
    result["pooled"]["model"]["spearman"] = None  # no slice with soft tissue to measure the error in
    assert "model  Spearman n/a " in realcheck_lines(result)[3]
    del result["pooled"]  # a realcheck.json written before the pooled figure: its lines as before
    assert realcheck_lines(result) == lines[:3]


def test_cli_without_a_model_says_how_to_get_one(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(scripts, "bundle_root", lambda: tmp_path / "bundle")
    monkeypatch.setattr(scripts, "demo_output", lambda: tmp_path / "demo_outputs")
    monkeypatch.setattr(realcheck, "run_realcheck", lambda *args: pytest.fail("ran without a model"))
    with pytest.raises(SystemExit) as exit_info:
        cli.realcheck()
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "python -m scripts demo" in error


def test_cli_with_a_missing_checkpoint_exits_1_in_one_line(tmp_path) -> None:
    missing = tmp_path / "missing.pt"
    command = [sys.executable, "-m", "scripts", "realcheck", "--ckpt", str(missing), "--size", str(SIZE)]
    process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert process.returncode == 1
    assert "Traceback" not in process.stderr
    assert len(process.stderr.strip().splitlines()) == 1 and str(missing) in process.stderr
    assert not Path(tmp_path / "realcheck.json").exists()


def _wide_volume(path: Path) -> Path:
    """A NIfTI volume of 4 axial slices of 64 x 48 px at 1.0 x 0.8 mm: a noisy water ellipse in air, CT in HU."""
    x, y = np.meshgrid(np.linspace(-1, 1, 64), np.linspace(-1, 1, 48), indexing="ij")
    slice_hu = np.where((x / 0.9) ** 2 + (y / 0.8) ** 2 < 1, 0.0, -1000.0)
    noise = np.random.default_rng(0).normal(0.0, 5.0, (64, 48, 4))
    volume = (slice_hu[..., None] + noise).astype(np.float32)
    nibabel.save(nibabel.Nifti1Image(volume, np.diag([1.0, 0.8, 2.5, 1.0])), path)
    return path


def test_pixel_size_comes_from_the_header(tmp_path) -> None:
    assert pixel_size_mm(get_testdata_file("CT_small.dcm")) == pytest.approx(0.661468)
    enhanced = get_testdata_file("eCT_Supplemental.dcm", download=False)  # only in its shared functional groups
    assert pixel_size_mm(enhanced, 1) == pytest.approx(0.388672)
    assert pixel_size_mm(_wide_volume(tmp_path / "wide.nii.gz")) == pytest.approx(0.9)
    assert pixel_size_mm(write_dicom_slice(tmp_path / "bare.dcm", np.zeros((16, 16)), "1.2.3.4")) is None


def test_realcheck_on_the_users_inputs(tiny_checkpoint, scored_ct_labels, tmp_path, caplog) -> None:
    """Two slices of each series or volume given, whatever their size; what is not CT in HU is listed, not used."""
    root = scored_ct_labels.parent  # p00/: a DICOM series without PixelSpacing; p01.nii.gz: 0.7 mm; 6 slices each
    wide = _wide_volume(tmp_path / "wide.nii.gz")
    mr, rendered = get_testdata_file("MR_small.dcm"), tmp_path / "rendered.tif"
    tifffile.imwrite(rendered, np.full((32, 32), 0.5, np.float32))
    thumbnail = write_dicom_slice(tmp_path / "thumbnail.dcm", np.full((16, 16), 40.0), "1.2.3.16")  # as in corpora
    inputs = [root / "p00", root / "p01.nii.gz", wide, mr, rendered, thumbnail]
    with caplog.at_level(logging.WARNING, logger="scripts.tools.realcheck"):
        result = run_realcheck(
            tiny_checkpoint, tmp_path / "out", device="cpu", batch_size=8, inputs=inputs, per_series=2
        )
    assert [name.rsplit(" ", 1)[1] for name in result["slices"]] == ["[2]", "[4]", "[2]", "[4]", "[1]", "[2]"]
    assert result["slices"][2] == f"{root / 'p01.nii.gz'} [2]" and result["slices"][4] == f"{wide} [1]"
    assert [entry["size"] for entry in result["per_slice"]] == [64] * 6  # the 64 x 48 slices padded with air
    pixel_mm = [entry["pixel_mm"] for entry in result["per_slice"]]
    assert pixel_mm == pytest.approx([DEFAULT_PIXEL_MM] * 2 + [0.7] * 2 + [0.9] * 2)
    assert "no pixel size in its header" in caplog.text
    for entry in result["per_slice"]:
        noise = entry["noise"]["noise_hu"]
        assert all(low < high for low, high in zip(noise, noise[1:], strict=False)), noise  # less dose, more noise
        assert len(entry["noise"]["model"]) == len(entry["views"]["model"]) == 5
    reasons = {error["path"]: error["reason"] for error in result["not_used"]}
    assert reasons == {
        mr: "modality MR is not CT; only CT is scored",
        str(rendered): "a rendered slice (TIFF/PNG) has no HU to project",
        str(thumbnail): "16 x 16 px is too small to simulate a scan of (at least 64 px across)",
    }
    assert json.loads((tmp_path / "out" / "realcheck.json").read_text())["inputs"] == [str(path) for path in inputs]
    lines = realcheck_lines(result)
    assert lines[0].startswith("real-data check (6 real CT slices of the inputs")
    assert [line.split(":")[0].strip() for line in lines[4:]] == ["not used"] * 3


def test_realcheck_without_ct_among_the_inputs_exits_1_in_one_line(tiny_checkpoint, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.realcheck(get_testdata_file("MR_small.dcm"), ckpt=str(tiny_checkpoint), device="cpu")
    assert exit_info.value.code == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and error.startswith("real-data check failed: no CT slice in HU among the inputs (")
    assert "modality MR is not CT" in error
    with pytest.raises(OptionError, match=r"^per_series must be a whole number of at least 1, got 0$"):
        cli.realcheck(get_testdata_file("CT_small.dcm"), ckpt=str(tiny_checkpoint), per_series=0)  # main: exit 2
    with pytest.raises(OptionError, match=r"^per_series must be a whole number of at least 1, got 0$"):
        run_realcheck(str(tiny_checkpoint), inputs=[get_testdata_file("CT_small.dcm")], per_series=0)
