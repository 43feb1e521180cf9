"""TIFF/PNG slices that hold CT numbers as stored (DeepLesion's 16-bit PNGs: HU + 32768; exports of HU + 1024; float
HU): refused as rendered slices, with the reason and the option, and scored as CT with ``slice_intercept``, exactly
as the same HU in DICOM."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scripts.clinical.compare import compare_paths
from scripts.clinical.score import score_paths
from scripts.ct_inputs import InputError, LoadCTSliced, index_inputs, read_scored_slice
from scripts.ct_io import write_dicom_slice
from scripts.data import scored_ct_items

WINDOW = (-1000.0, 400.0)


def ct_hu(side: int = 64) -> np.ndarray:
    """Whole HU of a small CT slice: air around a soft-tissue body with noise, a bone, a lung."""
    y, x = np.mgrid[:side, :side] - side / 2
    hu = np.where(x**2 + y**2 < (0.45 * side) ** 2, 40.0, -1000.0)
    hu += np.where(hu > 0, np.random.default_rng(3).normal(0.0, 15.0, hu.shape), 0.0)
    hu[(x - 6) ** 2 + (y - 4) ** 2 < 16] = 700.0
    hu[(x + 8) ** 2 + (y + 6) ** 2 < 25] = -850.0
    return np.rint(hu)


@pytest.fixture(scope="module")
def stored_slices(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One slice's HU as DICOM and as three files of stored CT numbers, each under the intercept that reads it."""
    folder = tmp_path_factory.mktemp("stored")
    hu = ct_hu()
    files = {"dicom": write_dicom_slice(folder / "ct.dcm", hu, "1.2.3", 0.0)}
    files["png_-32768"] = folder / "deeplesion.png"  # DeepLesion's form: uint16 HU + 32768
    Image.fromarray((hu + 32768).astype(np.uint16)).save(files["png_-32768"])
    files["tif_-1024"] = folder / "offset.tif"
    tifffile.imwrite(files["tif_-1024"], (hu + 1024).astype(np.uint16))
    files["tif_0"] = folder / "hu.tif"
    tifffile.imwrite(files["tif_0"], hu.astype(np.float32))
    return files


def test_stored_ct_numbers_are_refused_as_rendered_slices_with_the_option_named(stored_slices: dict) -> None:
    for name, reason in [
        ("png_-32768", r"uint16 pixels span \[31768, 33468\], 2.6% of their type's range: CT numbers as stored"),
        ("tif_-1024", r"uint16 pixels span \[24, 1724\], 2.6% of their type's range: CT numbers as stored"),
        ("tif_0", r"float pixels span \[-1000, 700\], not \[0, 1\]: not windowed"),
    ]:
        with pytest.raises(InputError, match=reason) as refused:
            read_scored_slice(stored_slices[name], 0, WINDOW)
        if name != "tif_0":
            assert "--slice_intercept (HU = value + intercept: -1024 for HU + 1024, -32768 for DeepLesion" in str(
                refused.value
            )


def test_with_their_intercept_they_read_as_the_same_hu_in_dicom(stored_slices: dict) -> None:
    expected = read_scored_slice(stored_slices["dicom"], 0, WINDOW)
    assert expected.std() > 0.1
    for name in ("png_-32768", "tif_-1024", "tif_0"):
        intercept = float(name.split("_")[1])
        assert np.array_equal(read_scored_slice(stored_slices[name], 0, WINDOW, 1, intercept), expected), name
        item = {"image": str(stored_slices[name]), "frame": 0, "error": ""}
        loaded = LoadCTSliced("image", slice_intercept=str(intercept))(item)  # as a config or the command line gives it
        assert loaded["hu"] is True and loaded["error"] == ""
        assert np.array_equal(loaded["image"].numpy()[0], ct_hu())  # HU, windowed next as DICOM's are


def test_score_with_an_intercept_gives_the_dicoms_score_and_records_it(
    tiny_checkpoint: Path, stored_slices: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def scored(path: Path, intercept: float | None) -> tuple[float, dict]:
        out = tmp_path / f"{path.stem}_{intercept}"
        summary = score_paths([path], out, tiny_checkpoint, device="cpu", num_workers=0, slice_intercept=intercept)
        assert summary["errors"] == [] and json.loads((out / "summary.json").read_text()) == summary
        (entry,) = summary["series"].values()
        assert (out / entry["plot"]).is_file()
        return entry["mean"], summary

    reference, summary = scored(stored_slices["dicom"], None)
    assert summary["slice_intercept"] is None
    with caplog.at_level(logging.WARNING):
        for name in ("png_-32768", "tif_-1024", "tif_0"):
            intercept = float(name.split("_")[1])
            score, summary = scored(stored_slices[name], intercept)
            assert score == pytest.approx(reference, abs=1e-5) and summary["slice_intercept"] == intercept
    assert "thumbnail" not in caplog.text  # the plots read the slices as they were scored


def test_compare_reads_both_sides_with_the_intercept(
    tiny_checkpoint: Path, stored_slices: dict, tmp_path: Path
) -> None:
    """A DeepLesion PNG against the same HU in DICOM (which the intercept leaves alone): the same score."""
    result = compare_paths(
        str(stored_slices["png_-32768"]), str(stored_slices["dicom"]), tmp_path / "out", tiny_checkpoint,
        device="cpu", num_workers=0, slice_intercept=-32768.0,
    )  # fmt: skip
    assert result["paired"]["n_pairs"] == 1 and result["paired"]["mean_difference"] == pytest.approx(0.0, abs=1e-5)
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["slice_intercept"] == -32768.0


def test_rendered_slices_are_read_as_before(tmp_path: Path) -> None:
    """A slice rendered to 16 bits spans their range; an 8-bit rendering kept in 16 bits spans 0..255, rescued by the
    per-slice min-max normalisation as before; neither is CT numbers."""
    rendered = np.clip((ct_hu() + 1000) / 1400, 0, 1)
    tifffile.imwrite(tmp_path / "16bit.tif", np.rint(rendered * 65535).astype(np.uint16))
    assert np.allclose(read_scored_slice(tmp_path / "16bit.tif")[0], rendered, atol=1e-5)
    Image.fromarray(np.rint(rendered * 255).astype(np.uint16)).save(tmp_path / "8bit_in_16.png")
    assert read_scored_slice(tmp_path / "8bit_in_16.png").max() == pytest.approx(255 / 65535)


def test_rendered_slices_cannot_hold_ct_numbers(tmp_path: Path) -> None:
    """Colour, 8-bit grey levels and floats within [0, 1] (LDCTIQA's) read with an intercept would be air or flat."""
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(InputError, match="a colour slice, said to hold CT numbers \\(slice_intercept\\): it cannot"):
        read_scored_slice(tmp_path / "colour.png", 0, WINDOW, 1, -1024.0)
    Image.fromarray(np.arange(32 * 32).reshape(32, 32).astype(np.uint8)).save(tmp_path / "grey.png")
    tifffile.imwrite(tmp_path / "ldctiqa.tif", np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32))
    for name, span in [
        ("grey.png", "uint8 pixels span \\[0, 255\\]"),
        ("ldctiqa.tif", "float32 pixels span \\[0, 1\\]"),
    ]:
        with pytest.raises(InputError, match=f"{span}: a rendered slice, not CT numbers as slice_intercept says"):
            read_scored_slice(tmp_path / name, 0, WINDOW, 1, 0.0)


def test_a_reader_study_of_stored_slices_is_checked_with_the_intercept(stored_slices: dict, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,score\n{stored_slices['png_-32768']},3.0\n")
    with pytest.raises(ValueError, match="CT numbers as stored"):
        scored_ct_items(labels)
    (item,) = scored_ct_items(labels, slice_intercept=-32768.0)
    assert item["label"] == 3.0 and index_inputs([stored_slices["png_-32768"]])[1] == []
