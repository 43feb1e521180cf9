"""Scoring real-world CT inputs: DICOM series and odd files, NIfTI volumes, rendered slices."""

from __future__ import annotations

import csv
import gzip
import json
import shutil
import subprocess
import sys
import tarfile
import warnings
import zipfile
from pathlib import Path

import nibabel
import nrrd
import numpy as np
import pydicom
import pytest
import tifffile
from pydicom.data import get_testdata_file
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)
from scripts.checkpoints import save_checkpoint
from scripts.clinical.score import SliceScorer, score_paths
from scripts.ct_inputs import (
    PARALLEL_INDEX_FILES,
    ErrorList,
    InputError,
    acquisition,
    find_files,
    index_inputs,
    read_ct_slice,
    read_dicom_ct,
    read_scored_slice,
)
from scripts.ct_io import compress_dicom, write_dicom_slice
from scripts.options import check_windows

from tests.conftest import NOT_DICOM, REPO_ROOT, inference_workflow, scoring_tiny_network

WINDOW = (-1000.0, 400.0)


def write_dicom(
    path: Path, modality: str, series: str, z: float, pixels: np.ndarray | None = None, floats: bool = False
) -> Path:
    return write_dicom_slice(path, pixels, series, z, modality, floats)


def write_rgb_ct(path: Path) -> Path:
    """A CT-labelled file whose pixels are RGB: three samples per pixel, not a CT slice."""
    ds = pydicom.dcmread(write_dicom(path, "CT", "8.8", 0.0, np.zeros((16, 16))))
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = np.zeros((16, 16, 3), dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_compressed_ct(path: Path, transfer_syntax: str) -> Path:
    """pydicom's CT_small.dcm re-encoded with a compressed transfer syntax."""
    return compress_dicom(get_testdata_file("CT_small.dcm"), transfer_syntax, path)


def write_jpeg_lossless_ct(path: Path) -> Path:
    """pydicom-data's JPEG Lossless (process 14, SV1) image, labelled CT with a rescale to HU."""
    ds = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
    ds.Modality, ds.SOPClassUID = "CT", CTImageStorage
    ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory: pytest.TempPathFactory, ldct_test_dir: Path) -> Path:
    """Every kind of file a PACS export or a research folder holds, good and bad."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for z in (30.0, 10.0, 20.0):  # file names not in slice order
        write_dicom(root / f"ct_{int(z)}.dcm", "CT", "1.2.3.4", z, rng.normal(40, 20, (48, 48)))
    truncated = write_dicom(root / "ct_truncated.dcm", "CT", "1.2.3.4", 40.0, rng.normal(40, 20, (48, 48))).read_bytes()
    (root / "ct_truncated.dcm").write_bytes(truncated[: len(truncated) - 2000])
    (root / "enhanced.dcm").write_bytes(Path(get_testdata_file("eCT_Supplemental.dcm")).read_bytes())
    write_compressed_ct(root / "ct_rle.dcm", RLELossless)
    write_jpeg_lossless_ct(root / "ct_jpeg_lossless.dcm")
    write_dicom(root / "mr.dcm", "MR", "1.2.3.5", 0.0, rng.normal(500, 50, (48, 48)))
    write_dicom(root / "rtstruct.dcm", "RTSTRUCT", "1.2.3.6", 0.0)
    write_rgb_ct(root / "rgb_ct.dcm")
    scout = pydicom.dcmread(write_dicom(root / "scout.dcm", "CT", "1.2.3.8", 0.0, rng.normal(40, 20, (48, 96))))
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]  # a topogram: CT, but not a cross-section
    scout.save_as(root / "scout.dcm", enforce_file_format=True)
    write_dicom(root / "float_inf.dcm", "CT", "1.2.3.7", 0.0, np.where(np.eye(16) > 0, np.inf, 40.0), floats=True)
    (root / "corrupt.dcm").write_bytes(b"\x00" * 50 + b"garbage")
    volume = rng.normal(0, 30, (40, 40, 5)).astype(np.float32)
    volume[:, :4] = -1000.0  # air in front of the body: CT in HU
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), root / "vol.nii.gz")
    nrrd.write(str(root / "vol.nrrd"), volume[:, :, :3].round().astype(np.int16), {"space": "left-posterior-superior"})
    volume[3, 3, 2] = np.nan
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), root / "vol_nan.nii")
    nibabel.save(nibabel.Nifti1Image(np.stack([volume, volume], axis=3), np.eye(4)), root / "series_4d.nii")
    packed = write_dicom(root / "packed" / "ct.dcm", "CT", "1.2.3.11", 0.0, rng.normal(40, 20, (48, 48)))
    (root / "ct_packed.dcm.gz").write_bytes(gzip.compress(packed.read_bytes()))
    shutil.rmtree(root / "packed")
    source = sorted((ldct_test_dir / "images").glob("*.tiff"))[0]
    tifffile.imwrite(root / "slice.tif", tifffile.imread(source))
    return root


def test_mixed_folder_scores_ct_and_reports_the_rest(tiny_checkpoint: Path, mixed_folder: Path, tmp_path: Path) -> None:
    summary = score_paths([mixed_folder], tmp_path, ckpt=tiny_checkpoint, device="cpu")
    names = ("enhanced.dcm", "ct_rle.dcm", "ct_jpeg_lossless.dcm")
    series_uid = {name: str(pydicom.dcmread(mixed_folder / name).SeriesInstanceUID) for name in names}
    assert {name: entry["n_slices"] for name, entry in summary["series"].items()} == {
        "1.2.3.4": 3,  # the truncated fourth slice is reported, the other three scored
        series_uid["enhanced.dcm"]: 2,  # enhanced CT: two frames
        series_uid["ct_rle.dcm"]: 1,
        series_uid["ct_jpeg_lossless.dcm"]: 1,
        str(mixed_folder): 1,  # its slice images (slice.tif), a series named by the folder
        str(mixed_folder / "vol.nii.gz"): 5,
        str(mixed_folder / "vol_nan.nii"): 4,  # its slice 2 is reported
        str(mixed_folder / "vol.nrrd"): 3,
        "1.2.3.11": 1,  # ct_packed.dcm.gz, read unpacked
    }
    reasons = {Path(error["path"]).name: error["reason"] for error in summary["errors"]}
    assert len(summary["errors"]) == len(reasons)  # one entry per file, even for a volume's many slices
    assert reasons == {
        "mr.dcm": "modality MR is not CT; only CT is scored",
        "rtstruct.dcm": "no pixel data (a RTSTRUCT object, not an image)",
        "rgb_ct.dcm": "3 samples per pixel: a colour image, not a CT slice (wrong dimensionality)",
        "scout.dcm": "a localizer (scout) image, not a cross-sectional slice (ImageType LOCALIZER)",
        "float_inf.dcm": "pixel data contains NaN or Inf",
        "corrupt.dcm": NOT_DICOM,
        "vol_nan.nii": "slice 2: pixel data contains NaN or Inf",
        "series_4d.nii": "expected a 3-D volume, got shape (40, 40, 5, 2) (wrong dimensionality)",
        "ct_truncated.dcm": reasons["ct_truncated.dcm"],
    }
    assert reasons["ct_truncated.dcm"].startswith("declares 1 frame of 48 x 48 pixels at 16 bits")  # from the header
    with open(tmp_path / "scores.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    ct_rows = [row for row in rows if row["series"] == "1.2.3.4"]
    assert [Path(row["source"]).name for row in ct_rows] == ["ct_10.dcm", "ct_20.dcm", "ct_30.dcm"]  # by position
    nan_rows = [row for row in rows if row["source"] == str(mixed_folder / "vol_nan.nii")]
    assert [int(row["slice_index"]) for row in nan_rows] == [0, 1, 3, 4]  # slice 2 is reported; the rest keep theirs
    nan_scores = {int(row["slice_index"]): float(row["score"]) for row in nan_rows}
    for worst in summary["series"][str(mixed_folder / "vol_nan.nii")]["worst"]:
        assert nan_scores[worst["slice_index"]] == pytest.approx(worst["score"], abs=1e-4)
    assert len(rows) == 21 and all(0.0 <= float(row["score"]) <= 4.0 for row in rows)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    series = summary["series"]["1.2.3.4"]
    assert series["min"] <= series["mean"] <= series["max"] and len(series["worst"]) == 3
    plots = [entry["plot"] for entry in summary["series"].values()]
    assert len(set(plots)) == 9 and all((tmp_path / plot).read_bytes()[:4] == b"\x89PNG" for plot in plots)
    assert summary["series"][series_uid["enhanced.dcm"]]["acquisition"] == {  # its spacing: in functional groups
        "Manufacturer": "Acme Medical Devices",
        "ManufacturerModelName": "Super Dooper Scanner",
        "pixel_mm": 0.388672,
    }
    assert summary["series"][str(mixed_folder / "vol.nii.gz")]["acquisition"] == {"pixel_mm": 1.0}
    assert series["acquisition"] == summary["series"][str(mixed_folder)]["acquisition"] == {}


def test_acquisition_is_what_the_header_says_and_never_fails(tmp_path: Path) -> None:
    assert acquisition(get_testdata_file("CT_small.dcm")) == {
        "Manufacturer": "GE MEDICAL SYSTEMS",
        "ManufacturerModelName": "RHAPSODE",
        "ConvolutionKernel": "STANDARD",
        "KVP": 120.0,
        "XRayTubeCurrent": 170,
        "Exposure": 170,
        "SliceThickness": 5.0,
        "ReconstructionDiameter": 338.6716,
        "pixel_mm": 0.661468,
    }
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.ConvolutionKernel, ds.CTDIvol, ds.SeriesDescription = ["Br38f", "3"], 18.54, "  CT  Body\t3.0 "
    ds.save_as(tmp_path / "siemens.dcm")
    found = acquisition(tmp_path / "siemens.dcm")
    assert found["ConvolutionKernel"] == ["Br38f", "3"] and found["CTDIvol"] == 18.54
    assert found["SeriesDescription"] == "CT Body 3.0"
    assert json.loads(json.dumps(found)) == found
    assert acquisition(tmp_path / "gone.dcm") == acquisition(get_testdata_file("MR_small.dcm")) == {}


def test_scores_do_not_depend_on_reading_workers(tiny_checkpoint: Path, mixed_folder: Path, tmp_path: Path) -> None:
    in_process = score_paths([mixed_folder], tmp_path / "a", ckpt=tiny_checkpoint, device="cpu", num_workers=0)
    workers = score_paths(
        [mixed_folder], tmp_path / "b", ckpt=tiny_checkpoint, device="cpu", num_workers=2, batch_size=3
    )
    rows = {}
    for name in ("a", "b"):
        with open(tmp_path / name / "scores.csv", newline="") as stream:
            rows[name] = list(csv.DictReader(stream))
    assert [row["source"] for row in rows["a"]] == [row["source"] for row in rows["b"]]
    # batches of 16 and of 3 round differently in the last float bits; scores.csv keeps 4 decimals
    assert np.allclose([float(r["score"]) for r in rows["a"]], [float(r["score"]) for r in rows["b"]], atol=2e-4)
    assert in_process["errors"] == workers["errors"]


def test_a_long_run_scores_each_file_as_its_header_is_read_with_the_results_of_indexing_first(
    tiny_checkpoint: Path, mixed_folder: Path, tmp_path: Path
) -> None:
    """With reader processes, a run of ``PARALLEL_INDEX_FILES`` files or more is scored while its headers are read,
    in file order: the same rows in slice order, scores, series and reasons as indexing every header first, a
    duplicate copy dropped. Batches of 5 are read in parts of 3 by 2 readers and joined on the device."""
    shutil.copytree(mixed_folder, tmp_path / "in")
    rng = np.random.default_rng(2)
    for index in range(PARALLEL_INDEX_FILES):  # file names against the slice order
        write_dicom(tmp_path / "in" / "long" / f"{index:04d}.dcm", "CT", "7.7", -index, rng.normal(0, 300, (16, 16)))
    shutil.copy(tmp_path / "in" / "long" / "0007.dcm", tmp_path / "in" / "long" / "copy.dcm")
    assert len(find_files([tmp_path / "in"])[0]) >= PARALLEL_INDEX_FILES
    runs, rows = {}, {}
    for name, options in {"first": {"num_workers": 0}, "streamed": {"num_workers": 2, "batch_size": 5}}.items():
        runs[name] = score_paths([tmp_path / "in"], tmp_path / name, tiny_checkpoint, device="cpu", **options)
        with open(tmp_path / name / "scores.csv", newline="") as stream:
            rows[name] = list(csv.DictReader(stream))
    assert len(rows["first"]) == 21 + PARALLEL_INDEX_FILES
    places = {name: [(row["source"], row["series"], row["slice_index"]) for row in rows[name]] for name in rows}
    assert places["streamed"] == places["first"]
    long_rows = [row for row in rows["first"] if row["series"] == "7.7"]
    assert Path(long_rows[0]["source"]).name == f"{PARALLEL_INDEX_FILES - 1:04d}.dcm"  # lowest position first
    scores = {name: [float(row["score"]) for row in rows[name]] for name in rows}
    assert np.allclose(scores["streamed"], scores["first"], atol=2e-4) and len(set(scores["first"])) > 10
    assert runs["streamed"]["errors"] == runs["first"]["errors"]
    copy, original = tmp_path / "in" / "long" / "copy.dcm", tmp_path / "in" / "long" / "0007.dcm"
    assert {"path": str(copy), "reason": f"duplicate of {original} (same SOPInstanceUID)"} in runs["first"]["errors"]
    counts = {name: {series: entry["n_slices"] for series, entry in runs[name]["series"].items()} for name in runs}
    assert counts["streamed"] == counts["first"]


def test_bundle_inference_config_scores_the_same_files(
    tiny_checkpoint: Path, mixed_folder: Path, tmp_path: Path
) -> None:
    summary = score_paths([mixed_folder], tmp_path / "score", ckpt=tiny_checkpoint, device="cpu")
    inference_workflow(tiny_checkpoint, mixed_folder, tmp_path / "bundle", batch_size=4).run()
    with open(tmp_path / "score" / "scores.csv", newline="") as stream:
        expected = sorted((Path(row["source"]).name, float(row["score"])) for row in csv.DictReader(stream))
    with open(tmp_path / "bundle" / "predictions.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    scored = sorted((Path(row["file"]).name, float(row["prediction"])) for row in rows)
    assert [name for name, _ in scored] == [name for name, _ in expected]
    assert np.allclose([score for _, score in scored], [score for _, score in expected], atol=1e-4, rtol=0)
    assert len({score for _, score in scored}) > 1  # scores differ between slices: a real comparison
    assert sorted(row["slice"] for row in rows if row["file"] == "enhanced.dcm") == ["0", "1"]
    errors = json.loads((tmp_path / "bundle" / "errors.json").read_text())
    assert sorted(map(json.dumps, errors)) == sorted(
        json.dumps({"path": Path(error["path"]).name, "reason": error["reason"]}) for error in summary["errors"]
    )


@pytest.mark.parametrize("modality", ["MR", "US", "CR", "DX", "PT", "MG", "XA"])
def test_other_modalities_are_reported_not_scored(modality: str, tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_dicom(tmp_path / "image.dcm", "CT", "5.5", 0.0, np.zeros((16, 16))))
    ds.Modality = modality
    ds.save_as(tmp_path / "image.dcm", enforce_file_format=True)
    items, errors = index_inputs([tmp_path])
    assert items == [] and errors == [
        {"path": str(tmp_path / "image.dcm"), "reason": f"modality {modality} is not CT; only CT is scored"}
    ]


def test_a_missing_modality_is_ct_by_its_sop_class_only(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A CT slice whose Modality was removed (a de-identification tool, say) is scored, with a warning; another
    image without one is reported by its SOP class."""
    ds = pydicom.dcmread(write_dicom(tmp_path / "in" / "ct.dcm", "CT", "5.5", 0.0, np.zeros((64, 64))))
    del ds.Modality
    ds.save_as(tmp_path / "in" / "ct.dcm", enforce_file_format=True)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.save_as(tmp_path / "in" / "capture.dcm", enforce_file_format=True)
    summary = score_paths([tmp_path / "in"], tmp_path / "out", tiny_checkpoint, device="cpu")
    assert summary["errors"] == [
        {
            "path": str(tmp_path / "in" / "capture.dcm"),
            "reason": "no Modality in the header (a Secondary Capture Image Storage object); only CT is scored",
        }
    ]
    with open(tmp_path / "out" / "scores.csv", newline="") as stream:
        (row,) = csv.DictReader(stream)
    assert Path(row["source"]).name == "ct.dcm" and row["warning"] == "no Modality: read as CT by its SOP class"


@pytest.mark.parametrize(
    ("image_type", "bits", "samples", "reason"),
    [
        (["DERIVED", "SECONDARY", "SCREEN SAVE"], 16, 1, "a saved screen (ImageType SCREEN SAVE: a dose report or "),
        (["DERIVED", "SECONDARY", "DOSE_INFO"], 16, 1, "a saved screen (ImageType DOSE_INFO: a dose report or "),
        (["DERIVED", "SECONDARY", "OTHER"], 8, 1, "a Secondary Capture of 8-bit grey levels (a saved screen, "),
        (["DERIVED", "SECONDARY", "OTHER"], 8, 3, "a Secondary Capture of 8-bit colour (3 samples per pixel) (a "),
        (["DERIVED", "SECONDARY"], 16, 1, None),  # a volume converted to DICOM: CT numbers, scored
    ],
)
def test_saved_screens_labelled_ct_are_reported(
    image_type: list, bits: int, samples: int, reason: str | None, tmp_path: Path
) -> None:
    """The dose report or protocol page a scanner saves beside a series (a Secondary Capture labelled CT, with a
    rescale) is reported by what it is; a 16-bit Secondary Capture without such an ImageType is read as CT."""
    ds = pydicom.dcmread(write_dicom(tmp_path / "page.dcm", "CT", "9.9", 0.0, np.full((16, 16), 40.0)))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.ImageType = image_type
    if bits == 8:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.full((16, 16, samples), 200, dtype=np.uint8).tobytes()
    if samples == 3:  # an RGB page
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.save_as(tmp_path / "page.dcm", enforce_file_format=True)
    items, errors = index_inputs([tmp_path])
    if reason is None:
        assert errors == [] and len(items) == 1
        np.testing.assert_array_equal(read_ct_slice(tmp_path / "page.dcm")[0], np.full((1, 16, 16), 40.0))
    else:
        assert items == [] and len(errors) == 1 and errors[0]["reason"].startswith(reason)


@pytest.mark.parametrize("modality", ["RTSTRUCT", "SR", "KO", "PR"])
def test_objects_without_pixel_data_are_reported(modality: str, tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_dicom(tmp_path / "object.dcm", "RTSTRUCT", "6.6", 0.0))
    ds.Modality = modality
    ds.save_as(tmp_path / "object.dcm", enforce_file_format=True)
    assert index_inputs([tmp_path])[1][0]["reason"] == f"no pixel data (a {modality} object, not an image)"


def test_a_ct_header_without_its_image_says_so(tmp_path: Path) -> None:
    write_dicom(tmp_path / "header.dcm", "CT", "6.6", 0.0)  # no pixels: as some test corpora keep CT files
    reason = "no pixel data: a CT header without its image (the pixel data were left out of the file)"
    assert index_inputs([tmp_path])[1] == [{"path": str(tmp_path / "header.dcm"), "reason": reason}]


def test_a_dicomdir_is_reported_by_its_sop_class(tmp_path: Path) -> None:
    shutil.copyfile(get_testdata_file("DICOMDIR"), tmp_path / "DICOMDIR")
    assert index_inputs([tmp_path])[1] == [
        {
            "path": str(tmp_path / "DICOMDIR"),
            "reason": "no pixel data (a Media Storage Directory Storage object, not an image)",
        }
    ]


def test_a_malformed_header_is_reported_and_the_rest_indexed(tmp_path: Path) -> None:
    write_dicom(tmp_path / "good.dcm", "CT", "4.4", 0.0, np.zeros((16, 16)))
    ds = pydicom.dcmread(write_dicom(tmp_path / "odd.dcm", "CT", "4.4", 1.0, np.zeros((16, 16))))
    ds.ImagePositionPatient = [0.0, 0.0]  # two coordinates instead of three
    ds.save_as(tmp_path / "odd.dcm", enforce_file_format=True)
    items, errors = index_inputs([tmp_path])
    assert [Path(item["image"]).name for item in items] == ["good.dcm"]
    assert [Path(error["path"]).name for error in errors] == ["odd.dcm"]
    assert errors[0]["reason"].startswith("unreadable (IndexError")


@pytest.mark.parametrize(
    "transfer_syntax",
    [RLELossless, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless],
    ids=["rle", "jpeg2000", "jpeg_lossless", "jpeg_ls"],
)
def test_compressed_ct_decodes_to_the_same_hu(transfer_syntax: str, tmp_path: Path) -> None:
    path = write_compressed_ct(tmp_path / "compressed.dcm", transfer_syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == transfer_syntax
    expected = read_scored_slice(get_testdata_file("CT_small.dcm"), 0, WINDOW)
    assert np.array_equal(read_scored_slice(path, 0, WINDOW), expected)


def test_jpeg_lossless_ct_decodes(tmp_path: Path) -> None:
    path = write_jpeg_lossless_ct(tmp_path / "jpeg_ll.dcm")
    original = pydicom.dcmread(get_testdata_file("JPEG-LL.dcm"))
    pixels = read_scored_slice(path, 0, WINDOW)[0]
    assert pixels.shape == (original.Rows, original.Columns)
    hu = original.pixel_array.astype(np.float32) - 1024
    assert np.allclose(pixels, np.clip((hu - WINDOW[0]) / (WINDOW[1] - WINDOW[0]), 0, 1))


def test_jpeg_ls_ct_decodes_to_the_same_hu_as_its_uncompressed_original(tmp_path: Path) -> None:
    """JPEG-LS (lossless) decodes with the libjpeg plugin that is already a dependency: same slice, same HU."""
    for name in ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"):  # one image, uncompressed and JPEG-LS
        ds = pydicom.dcmread(get_testdata_file(name))
        ds.Modality, ds.SOPClassUID = "CT", CTImageStorage
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.save_as(tmp_path / name, enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "MR_small_jpeg_ls_lossless.dcm").file_meta.TransferSyntaxUID == JPEGLSLossless
    expected = read_scored_slice(tmp_path / "MR_small.dcm", 0, WINDOW)
    assert np.array_equal(read_scored_slice(tmp_path / "MR_small_jpeg_ls_lossless.dcm", 0, WINDOW), expected)
    assert expected.std() > 0.1  # the image itself, not a blank


def test_dicom_goes_to_hu_then_through_the_window(tiny_checkpoint: Path, tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "flat.dcm", "CT", "9.9", 0.0, np.full((32, 32), 40.0))  # 40 HU everywhere
    items, errors = index_inputs([path])
    assert errors == [] and [(item["series"], item["position"]) for item in items] == [("9.9", 0.0)]
    assert np.allclose(read_scored_slice(path, 0, WINDOW), 1040.0 / 1400.0)
    assert np.allclose(read_scored_slice(path, 0, (0.0, 80.0)), 0.5)
    with pytest.raises(ValueError, match="window must be two HU values"):
        score_paths([path], tmp_path, ckpt=tiny_checkpoint, window=(400, -1000))


def test_scoring_windows_slices_as_the_model_was_trained_unless_told_otherwise(tmp_path: Path) -> None:
    """A three-window model (``multi_window.json``) records its windows in model.json; ``score`` uses them, not the
    single default window repeated, and ``--window`` still overrides them."""
    windows = [[-1000.0, 400.0], [-160.0, 240.0], [-1350.0, 150.0]]
    checkpoint = save_checkpoint(tmp_path / "model.pt", scoring_tiny_network(in_channels=3), 64, windows)
    assert SliceScorer.from_checkpoint(checkpoint, "cpu").window == [tuple(pair) for pair in windows]
    slices = tmp_path / "ct"
    for z in range(2):
        hu = np.random.default_rng(z).normal(0.0, 300.0, (48, 48))
        write_dicom(slices / f"{z}.dcm", "CT", "1.2.3", float(z), hu)

    def scores(window: object) -> list[float]:
        out = tmp_path / f"out_{len(list(tmp_path.iterdir()))}"
        summary = score_paths([slices], out, checkpoint, window, device="cpu", plots=False)
        assert summary["window"] == (windows if window is None else [list(pair) for pair in check_windows(window)])
        return [entry["score"] for entry in summary["series"]["1.2.3"]["worst"]]

    recorded = scores(None)
    assert recorded == scores(windows)
    assert recorded != scores(WINDOW)  # one window on all three channels reads the slices otherwise


def test_a_sheared_volume_lies_along_the_normal_of_its_planes(tmp_path: Path) -> None:
    """A volume made from a gantry-tilted series steps aslant (2 mm up, 0.73 mm back per slice); its positions are
    along the normal of its planes, as the series' own along its ImageOrientationPatient: 2 mm apart."""
    sheared = np.diag([-0.7, -0.7, 2.0, 1.0])
    sheared[1, 2], sheared[2, 3] = -2.0 * np.tan(np.radians(20.0)), -780.0
    volume = np.full((16, 16, 4), -1000.0, np.float32)
    volume[4:12, 4:12] = 40.0
    nibabel.save(nibabel.Nifti1Image(volume, sheared), tmp_path / "tilted.nii.gz")
    items, _ = index_inputs([tmp_path / "tilted.nii.gz"])
    assert [item["position"] for item in items] == pytest.approx([-780.0, -778.0, -776.0, -774.0])


def test_nifti_slices_are_axial_in_ras_order(tmp_path: Path) -> None:
    volume = (np.arange(9 * 10 * 8, dtype=np.float32).reshape(9, 10, 8) - 360) / 4  # within the window
    volume[0] = -1000.0  # a side of air: CT in HU
    flipped = np.diag([-1.0, 1.0, -1.0, 1.0])  # stored left-to-right and top-down: reoriented to RAS
    nibabel.save(nibabel.Nifti1Image(volume, flipped), tmp_path / "vol.nii")
    items, _ = index_inputs([tmp_path / "vol.nii"])
    assert [item["frame"] for item in items] == list(range(8))
    first = read_scored_slice(tmp_path / "vol.nii", 0, (-100.0, 100.0))[0]
    ras = volume[::-1, :, ::-1]
    assert np.allclose(first, np.clip((ras[:, :, 0].T[::-1, ::-1] + 100.0) / 200.0, 0.0, 1.0))
    permuted = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)  # voxel axis 0 is S
    nibabel.save(nibabel.Nifti1Image(volume, permuted), tmp_path / "permuted.nii")
    items, _ = index_inputs([tmp_path / "permuted.nii"])
    assert len(items) == 9  # the header's axis 0 is axial: 9 slices of 8 x 10
    assert read_scored_slice(tmp_path / "permuted.nii", 3, (-100.0, 100.0)).shape == (1, 10, 8)
    nibabel.save(nibabel.Nifti1Image(np.zeros((9, 10, 8, 2), np.float32), np.eye(4)), tmp_path / "4d.nii")
    assert index_inputs([tmp_path / "4d.nii"])[1][0]["reason"].endswith("(wrong dimensionality)")


def test_empty_truncated_and_archived_files_say_what_they_are(tmp_path: Path) -> None:
    whole = write_compressed_ct(tmp_path / "whole.dcm", JPEG2000Lossless).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(whole[: len(whole) // 2])  # its header whole, its pixel fragments cut
    (tmp_path / "empty.dcm").write_bytes(b"")
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as archive:
        archive.writestr("0.dcm", whole)
    with tarfile.open(tmp_path / "series.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "whole.dcm", arcname="0.dcm")
    items, errors = index_inputs([tmp_path])
    assert [Path(item["image"]).name for item in items] == ["whole.dcm"]
    assert {Path(error["path"]).name: error["reason"] for error in errors} == {
        "cut.dcm": f"truncated or damaged DICOM file ({len(whole) // 2:,} bytes): it has a file meta header, but its "
        "data set cannot be read to the end",
        "empty.dcm": "empty file (0 bytes)",
        "series.zip": "a ZIP archive: unpack it and score the folder it gives",
        "series.tar.gz": "a tar archive: unpack it and score the folder it gives",
    }


def test_a_slice_saved_2d_or_with_unit_axes_reads_as_the_3d_volume_and_cifti_is_named(tmp_path: Path) -> None:
    pixels = np.arange(12 * 10, dtype=np.float32).reshape(12, 10) - 60
    pixels[0] = -1000.0  # a row of air: CT in HU
    for shape in [(12, 10, 1), (12, 10), (12, 10, 1, 1, 1)]:
        nibabel.save(nibabel.Nifti1Image(pixels.reshape(shape), np.eye(4)), tmp_path / f"{len(shape)}d.nii.gz")
    items, errors = index_inputs(sorted(tmp_path.glob("*.nii.gz")))
    assert errors == [] and [Path(item["image"]).name for item in items] == ["2d.nii.gz", "3d.nii.gz", "5d.nii.gz"]
    expected = read_scored_slice(tmp_path / "3d.nii.gz", 0, (-100.0, 100.0))
    assert np.allclose(expected[0], np.clip((pixels.T[::-1, ::-1] + 100.0) / 200.0, 0.0, 1.0))
    for name in ("2d.nii.gz", "5d.nii.gz"):
        assert np.array_equal(read_scored_slice(tmp_path / name, 0, (-100.0, 100.0)), expected)
    cifti = nibabel.cifti2.Cifti2Image(
        np.zeros((1, 8), np.float32),
        header=(nibabel.cifti2.ScalarAxis(["map"]), nibabel.cifti2.BrainModelAxis.from_mask(np.ones((2, 2, 2)))),
    )
    cifti.to_filename(tmp_path / "maps.dscalar.nii")
    assert index_inputs([tmp_path / "maps.dscalar.nii"])[1] == [
        {
            "path": str(tmp_path / "maps.dscalar.nii"),
            "reason": "a CIFTI-2 file (surface or connectivity data), not an image volume",
        }
    ]


def test_a_volume_that_is_not_ct_in_hu_is_listed_with_its_reason_once(
    tiny_checkpoint: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A NIfTI volume has no Modality: segmentations, MR and normalised data are told from CT by their values
    (CT in HU has air near -1000 HU) or header, and each refused volume is read and logged once, not per slice."""
    rng = np.random.default_rng(5)
    ct = rng.normal(40.0, 20.0, (24, 24, 3)).astype(np.float32)
    ct[:, :4] = -1000.0  # air in front of the body
    labels = np.zeros((24, 24, 6), np.uint8)
    labels[4:12, 4:12], labels[14:20, 6:18, 2:] = 1, 3  # two organs
    mr = rng.normal(300.0, 100.0, (24, 24, 4)).clip(-40.0, None).astype(np.float32)
    ripples = mr.copy()
    ripples[0, :3] = -600.0  # an interpolation's ringing: 12 of 2304 voxels, not a CT volume's air
    wide_ct = rng.normal(40.0, 20.0, (64, 64, 2)).astype(np.float32)  # 64 px and more: every 16th voxel is checked
    wide_ct[:, -3:] = -1000.0  # 4.7 % air, in rows the sample skips: the whole volume then decides
    volumes = {
        "ct.nii.gz": ct,
        "wide_ct.nii.gz": wide_ct,
        "wide_mr.nii.gz": np.abs(wide_ct),
        "organs.nii.gz": labels,
        "mr.nii.gz": mr,
        "mr_ripples.nii.gz": ripples,
        "normalised.nii.gz": rng.random((24, 24, 4), dtype=np.float32),
        "empty.nii.gz": np.zeros((24, 24, 4), np.int16),
        "grey8.nii.gz": (np.arange(24 * 24 * 2) % 256).astype(np.uint8).reshape(24, 24, 2),  # 8-bit MR: 256 values
    }
    for name, volume in volumes.items():
        nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / name)
    tagged = nibabel.Nifti1Image(ct, np.eye(4))
    tagged.header.set_intent("label")  # CT values, but the header says segmentation
    tagged.to_filename(tmp_path / "tagged.nii.gz")
    rgb = np.zeros((24, 24, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nibabel.save(nibabel.Nifti1Image(rgb, np.eye(4)), tmp_path / "colour.nii.gz")
    inputs = sorted(tmp_path.glob("*.nii.gz"))

    _, index_errors = index_inputs(inputs)  # the header alone tells these two
    assert {Path(error["path"]).name: error["reason"] for error in index_errors} == {
        "colour.nii.gz": "NIfTI data of type RGB is not a grey-level volume; only CT in HU is scored",
        "tagged.nii.gz": "a label map (NIfTI intent 'label': a segmentation), not CT; only CT in HU is scored",
    }
    with caplog.at_level("WARNING", logger="scripts.ct_inputs"):
        summary = score_paths(inputs, tmp_path / "out", ckpt=tiny_checkpoint, plots=False, num_workers=0)
    assert {Path(name).name: entry["n_slices"] for name, entry in summary["series"].items()} == {
        "ct.nii.gz": 3,
        "wide_ct.nii.gz": 2,
    }
    reasons = {Path(error["path"]).name: error["reason"] for error in summary["errors"]}
    assert reasons["organs.nii.gz"] == (
        "a label map (a segmentation: 3 whole values from 0 to 3), not CT; only CT in HU is scored"
    )
    assert reasons["mr.nii.gz"].startswith("no voxel at or below -500 HU (lowest -40): not CT in HU")
    assert reasons["mr_ripples.nii.gz"].startswith("0.52% of the voxels at or below -500 HU (lowest -600)")
    assert reasons["normalised.nii.gz"].startswith("values within [0, 1]: already windowed or normalised, not HU")
    assert reasons["empty.nii.gz"] == "every voxel is 0: an empty volume; only CT in HU is scored"
    assert reasons["wide_mr.nii.gz"].startswith("no voxel at or below -500 HU (lowest ")
    assert reasons["grey8.nii.gz"] == (
        "256 whole values from 0 to 255: an 8-bit grey-level image (MR, or CT already windowed to grey levels), "
        "not HU; only CT in HU is scored"
    )
    assert len(reasons) == 9 and len(summary["errors"]) == 9  # one entry per file, not per slice
    logged = [record.getMessage() for record in caplog.records if "organs.nii.gz" in record.getMessage()]
    assert len(logged) == 1, logged  # six slices, one line


def test_the_error_list_holds_each_path_and_reason_once_in_the_order_met() -> None:
    errors = ErrorList()
    added = [("b.nii", "slice 2: NaN"), ("a.dcm", "modality MR"), ("b.nii", "slice 2: NaN"), ("b.nii", "x")]
    for path, reason in added:
        errors.add(Path(path), reason)
    expected = [
        {"path": "b.nii", "reason": "slice 2: NaN"},
        {"path": "a.dcm", "reason": "modality MR"},
        {"path": "b.nii", "reason": "x"},
    ]
    assert errors == expected and json.loads(json.dumps(errors)) == expected


def test_nrrd_volumes_read_like_the_same_grid_saved_as_nifti(tiny_checkpoint: Path, tmp_path: Path) -> None:
    hu = np.random.default_rng(4).normal(0, 80, (20, 16, 3)).round().astype(np.int16)
    hu[:4, :2] = 300  # a corner that shows which way each axis runs
    hu[-2:] = -1000  # air along one side: CT in HU
    lps = np.array([[0.7, 0.0, 0.0], [0.0, 0.8, 0.0], [0.0, 0.0, 5.0]])  # DICOM's frame: x to the left, y back
    header = {"space": "left-posterior-superior", "space directions": lps, "space origin": [10.0, 20.0, 30.0]}
    nrrd.write(str(tmp_path / "ct.nrrd"), hu, header)  # gzip-encoded, as 3D Slicer writes by default
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.block([[lps.T, np.array([[10.0], [20.0], [30.0]])], [0, 0, 0, 1]])
    nibabel.save(nibabel.Nifti1Image(hu, ras), tmp_path / "ct.nii.gz")
    items, errors = index_inputs([tmp_path / "ct.nrrd", tmp_path / "ct.nii.gz"])
    assert errors == [] and [item["frame"] for item in items] == [0, 1, 2, 0, 1, 2]
    for frame in range(3):
        expected = read_scored_slice(tmp_path / "ct.nii.gz", frame, (-200.0, 400.0))
        assert np.array_equal(read_scored_slice(tmp_path / "ct.nrrd", frame, (-200.0, 400.0)), expected)
    summary = score_paths([tmp_path / "ct.nrrd", tmp_path / "ct.nii.gz"], tmp_path / "out", ckpt=tiny_checkpoint)
    by_file = {Path(name).name: entry["mean"] for name, entry in summary["series"].items()}
    assert by_file["ct.nrrd"] == pytest.approx(by_file["ct.nii.gz"], abs=1e-5)  # same slices, other batch rows

    nan_row = np.full(3, np.nan)  # a per-voxel list axis (e.g. a vector image): not one volume
    vectors = {"kinds": ["list", "domain", "domain", "domain"], "space": "RAS"}
    vectors["space directions"] = np.vstack([nan_row, np.eye(3)])
    nrrd.write(str(tmp_path / "vectors.nrrd"), np.zeros((3, 16, 16, 2), np.float32), vectors)
    raw = tmp_path / "truncated.nrrd"
    nrrd.write(str(raw), hu, {"encoding": "raw"})
    raw.write_bytes(raw.read_bytes()[:-100])
    (tmp_path / "broken.nrrd").write_text("NRRD0004\ntype: short\n")
    _, errors = index_inputs([tmp_path / "vectors.nrrd", tmp_path / "broken.nrrd"])
    assert errors[0]["reason"] == "expected a 3-D volume, got shape (3, 16, 16, 2) (wrong dimensionality)"
    assert errors[1]["reason"].startswith("not a readable NRRD volume (")
    with pytest.raises(InputError, match="^volume pixel data cannot be read|^not a readable NRRD volume"):
        read_scored_slice(raw, 0)


def test_metaimage_volumes_read_like_the_same_grid_saved_as_nifti(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """MetaImage (ITK's LPS world) in one compressed .mha file, or a .mhd header and the .raw file it names; the
    .raw is read with its header, not listed on its own. Vectors, truncated data and a lone .raw are errors."""
    import SimpleITK as sitk

    hu = np.random.default_rng(5).normal(0, 80, (20, 16, 3)).round().astype(np.int16)  # x, y, z
    hu[:4, :2] = 300  # a corner that shows which way each axis runs
    hu[-2:] = -1000  # air along one side: CT in HU
    directions = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # a column per axis, rotated in-plane
    spacing, origin = (0.7, 0.8, 5.0), (10.0, 20.0, 30.0)
    image = sitk.GetImageFromArray(hu.transpose())  # SimpleITK's arrays are (z, y, x)
    image.SetDirection(directions.ravel().tolist())
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    folder = tmp_path / "in"
    folder.mkdir()
    sitk.WriteImage(image, str(folder / "ct.mha"), useCompression=True)
    sitk.WriteImage(image, str(folder / "ct.mhd"))  # and ct.raw beside it
    lps = np.block([[directions * spacing, np.array(origin)[:, None]], [np.zeros((1, 3)), np.ones((1, 1))]])
    nibabel.save(nibabel.Nifti1Image(hu, np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps), tmp_path / "ct.nii.gz")
    items, errors = index_inputs([folder, tmp_path / "ct.nii.gz"])
    assert errors == [] and sorted(Path(item["image"]).name for item in items) == sorted(
        ["ct.mha", "ct.mhd", "ct.nii.gz"] * 3
    )
    for frame in range(3):
        expected = read_scored_slice(tmp_path / "ct.nii.gz", frame, (-200.0, 400.0))
        for name in ("ct.mha", "ct.mhd"):
            assert np.array_equal(read_scored_slice(folder / name, frame, (-200.0, 400.0)), expected), name
    summary = score_paths([folder / "ct.mha", tmp_path / "ct.nii.gz"], tmp_path / "out", ckpt=tiny_checkpoint)
    by_file = {Path(name).name: entry["mean"] for name, entry in summary["series"].items()}
    assert by_file["ct.mha"] == pytest.approx(by_file["ct.nii.gz"], abs=1e-5)

    sitk.WriteImage(
        sitk.GetImageFromArray(np.zeros((3, 16, 16, 2), np.float32), isVector=True), str(tmp_path / "v.mha")
    )
    truncated = tmp_path / "truncated.mha"
    sitk.WriteImage(image, str(truncated))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    _, errors = index_inputs([tmp_path / "v.mha", folder / "ct.raw"])
    assert errors[0]["reason"].startswith("MetaImage data of 2 components a voxel (colour or vectors)")
    assert errors[1]["reason"].endswith(
        "voxels without their header; give the MetaImage header (.mhd) that names this file"
    )
    with pytest.raises(
        InputError, match=r"^truncated.mha holds 1,820 bytes of voxels, the header declares 20 x 16 x 3 of"
    ):
        read_scored_slice(truncated, 0)


def test_gzipped_dicom_scores_as_the_file_itself_and_other_files_say_what_is_read(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    plain = write_dicom(tmp_path / "in" / "ct.dcm", "CT", "5.5", 0.0, np.random.default_rng(3).normal(40, 20, (48, 48)))
    packed = tmp_path / "packed" / "ct.dcm.gz"
    packed.parent.mkdir()
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "packed" / "truncated.dcm.gz").write_bytes(packed.read_bytes()[:300])
    (tmp_path / "packed" / "notes.txt").write_text("not an image")
    (tmp_path / "packed" / "brain.hdr").write_bytes(b"\x00" * 348)
    items, errors = index_inputs([tmp_path / "packed"])
    assert [(item["image"], item["series"]) for item in items] == [(str(packed), "5.5")]
    assert np.array_equal(read_scored_slice(packed, 0), read_scored_slice(plain, 0))
    reasons = {Path(error["path"]).name: error["reason"] for error in errors}
    assert reasons["truncated.dcm.gz"].startswith("gzip-compressed, but it cannot be unpacked (EOFError")
    assert reasons["notes.txt"] == NOT_DICOM
    assert reasons["brain.hdr"].endswith("an Analyze or NIfTI pair (.hdr/.img) is not read; save it as .nii or .nii.gz")
    summary = score_paths([plain, packed], tmp_path / "out", ckpt=tiny_checkpoint, device="cpu")
    assert summary["errors"] == [{"path": str(packed), "reason": f"duplicate of {plain} (same SOPInstanceUID)"}]


def test_command_exits_non_zero_when_nothing_is_scored(
    tiny_checkpoint: Path, mixed_folder: Path, tmp_path: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "scripts",
        "score",
        str(mixed_folder / "mr.dcm"),
        str(mixed_folder / "corrupt.dcm"),
    ]
    result = subprocess.run(
        [*command, "--output_dir", str(tmp_path), "--ckpt", str(tiny_checkpoint), "--device", "cpu"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert "scored 0 slices in 0 series; 2 inputs not scored" in result.stdout
    assert len(json.loads((tmp_path / "summary.json").read_text())["errors"]) == 2


def test_command_exits_zero_when_something_is_scored(tiny_checkpoint: Path, mixed_folder: Path, tmp_path: Path) -> None:
    # lung (-700 HU) beside soft tissue: the window (-160, 240) clips the lung, the default one does not
    hu = np.where(np.arange(48)[None, :] < 24, -700.0, 60.0) + np.random.default_rng(1).normal(0, 20, (48, 48))
    ct = write_dicom(tmp_path / "lung_tissue.dcm", "CT", "3.3", 0.0, hu)
    command = [sys.executable, "-m", "scripts", "score", str(ct), str(mixed_folder / "mr.dcm")]
    command += ["--output_dir", str(tmp_path / "out"), "--ckpt", str(tiny_checkpoint), "--device", "cpu"]
    result = subprocess.run([*command, "--window=-160,240"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scored 1 slices in 1 series; 1 inputs not scored" in result.stdout
    assert "1 of the 1 slices scored with a warning: see the warning column of scores.csv" in result.stdout  # 48 px
    written = json.loads((tmp_path / "out" / "summary.json").read_text())["series"]["3.3"]["mean"]
    windowed, default = (
        score_paths([ct], tmp_path / str(window), tiny_checkpoint, window, "cpu")["series"]["3.3"]["mean"]
        for window in ((-160, 240), (-1000, 400))
    )
    assert written == pytest.approx(windowed, abs=1e-6) and abs(written - default) > 1e-4  # the flag reached scoring


def test_real_and_enhanced_ct_from_pydicom(tiny_checkpoint: Path, tmp_path: Path) -> None:
    from pydicom.data import get_testdata_file

    folder = tmp_path / "real"
    folder.mkdir()
    for name in ("CT_small.dcm", "eCT_Supplemental.dcm"):
        (folder / name).write_bytes(Path(get_testdata_file(name)).read_bytes())
    summary = score_paths([folder], tmp_path / "out", ckpt=tiny_checkpoint, device="cpu")
    assert sorted(entry["n_slices"] for entry in summary["series"].values()) == [1, 2]  # the enhanced CT's two frames
    assert summary["errors"] == []


def test_dicom_without_preamble_or_file_meta(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_dicom(tmp_path / "full.dcm", "CT", "7.7", 0.0, np.full((32, 32), 40.0)))
    del ds.file_meta
    ds.preamble = None
    pydicom.dcmwrite(tmp_path / "raw.dcm", ds, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert (tmp_path / "raw.dcm").read_bytes()[128:132] != b"DICM"
    items, errors = index_inputs([tmp_path / "raw.dcm"])
    assert errors == [] and items[0]["series"] == "7.7"
    assert np.allclose(read_scored_slice(tmp_path / "raw.dcm", 0, WINDOW), 1040.0 / 1400.0)


def test_another_format_read_as_dicom_gives_its_reason_without_pydicoms_guesses(tmp_path: Path) -> None:
    """nibabel's ECAT file (tinypet.v) read as DICOM made pydicom warn about the VR it guessed, which told the user
    nothing; the file's reason is all that is said. A DICOM file whose file meta names the wrong encoding (implicit VR
    for explicit data) is read, and pydicom's warning about it is kept."""
    ecat = Path(nibabel.__file__).parent / "tests" / "data" / "tinypet.v"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InputError, match=r"^not a DICOM file \(no DICOM elements found\)"):
            read_dicom_ct(ecat)
    assert [str(warning.message) for warning in caught] == []

    ds = pydicom.dcmread(write_dicom(tmp_path / "ct.dcm", "CT", "7.7", 0.0, np.full((32, 32), 40.0)))
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    stream = DicomBytesIO()
    stream.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(stream, ds.file_meta)
    stream.is_implicit_VR, stream.is_little_endian = False, True
    write_dataset(stream, ds)
    (tmp_path / "mislabelled.dcm").write_bytes(stream.getvalue())
    with pytest.warns(UserWarning, match="explicit VR"):
        assert read_dicom_ct(tmp_path / "mislabelled.dcm").Modality == "CT"


def _flat_ct(path: Path, hu: float = 40.0, size: int = 16) -> pydicom.Dataset:
    return pydicom.dcmread(write_dicom(path, "CT", "7.7", 0.0, np.full((size, size), hu)))


def test_a_modality_lut_sequence_gives_the_hu(tmp_path: Path) -> None:
    """Stored 1063 -> LUT -> 39 HU (pydicom's modality LUT), not 1063 - 1024 or the raw value."""
    from pydicom.dataset import Dataset

    ds = _flat_ct(tmp_path / "lut.dcm")
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.PixelData = np.full((16, 16), 1063, dtype=np.uint16).tobytes()
    lut = Dataset()
    lut.LUTDescriptor, lut.ModalityLUTType = [2048, 0, 16], "HU"
    lut.add_new("LUTData", "US", [max(value - 1024, 0) for value in range(2048)])
    ds.ModalityLUTSequence = [lut]
    ds.save_as(tmp_path / "lut.dcm", enforce_file_format=True)
    assert np.allclose(read_scored_slice(tmp_path / "lut.dcm", 0, (0.0, 78.0)), 0.5)


@pytest.mark.parametrize(
    ("stored", "slope", "intercept"),
    [
        ("uint16", 1, -1024),
        ("int16", 1, 0),
        ("int16", 2, -1000),
        ("uint16", 0.5, -1024.5),
        ("uint8", 1, -1024),
        ("uint16", 1000, -32768),
    ],  # fmt: skip
)
def test_rescaled_hu_equal_pydicoms(stored: str, slope: float, intercept: float, tmp_path: Path) -> None:
    """Integer rescales are done in float32 (exact there), others by pydicom in float64: the same HU either way."""
    from pydicom.pixels import apply_modality_lut

    ds = _flat_ct(tmp_path / "rescaled.dcm")
    info = np.iinfo(stored)
    values = np.random.default_rng(0).integers(info.min, info.max, (16, 16), endpoint=True).astype(stored)
    ds.BitsAllocated = ds.BitsStored = 8 * values.itemsize
    ds.HighBit, ds.PixelRepresentation = 8 * values.itemsize - 1, int(info.min < 0)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.PixelData = values.tobytes()
    ds.save_as(tmp_path / "rescaled.dcm", enforce_file_format=True)
    reread = pydicom.dcmread(tmp_path / "rescaled.dcm")
    expected = apply_modality_lut(reread.pixel_array, reread).astype(np.float32)
    hu, in_hu = read_ct_slice(tmp_path / "rescaled.dcm")
    assert in_hu and hu.dtype == np.float32 and np.array_equal(hu[0], expected)
    compact, _ = read_ct_slice(tmp_path / "rescaled.dcm", compact=True)  # int16 only where every value fits
    fits = float(slope).is_integer() and slope <= 128 and -(2**15) <= expected.min() and expected.max() < 2**15
    assert compact.dtype == (np.int16 if fits else np.float32) and np.array_equal(compact[0], expected)


def test_unsigned_or_half_rescaled_ct_is_refused_and_signed_ct_without_rescale_is_read_as_hu(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    hu = np.random.default_rng(6).integers(-1000, 400, (64, 64)).astype(np.int16)
    for name, signed, keep in [("unsigned", False, ()), ("no_intercept", False, ("RescaleSlope",)),
                               ("signed_no_intercept", True, ("RescaleSlope",)), ("signed", True, ())]:  # fmt: skip
        ds = _flat_ct(tmp_path / f"{name}.dcm", size=64)
        for keyword in {"RescaleSlope", "RescaleIntercept"} - set(keep):
            delattr(ds, keyword)
        if signed:
            ds.PixelRepresentation, ds.PixelData = 1, hu.tobytes()
        ds.save_as(tmp_path / f"{name}.dcm", enforce_file_format=True)
    items, errors = index_inputs(sorted(tmp_path.glob("*.dcm")))
    assert {Path(error["path"]).name: error["reason"] for error in errors} == {
        f"{name}.dcm": f"no RescaleIntercept/RescaleSlope or Modality LUT for its {kind} values: "
        "the HU of this CT cannot be known"
        for name, kind in [("no_intercept", "unsigned"), ("signed_no_intercept", "signed"), ("unsigned", "unsigned")]
    }
    assert [(Path(item["image"]).name, item["warning"]) for item in items] == [
        ("signed.dcm", "no RescaleSlope/RescaleIntercept: its signed stored values read as HU")
    ]
    assert np.array_equal(read_ct_slice(tmp_path / "signed.dcm")[0][0], hu)
    score_paths([tmp_path / "signed.dcm"], tmp_path / "out", ckpt=tiny_checkpoint, device="cpu")
    with open(tmp_path / "out" / "scores.csv", newline="") as stream:
        (row,) = csv.DictReader(stream)
    assert row["warning"] == "no RescaleSlope/RescaleIntercept: its signed stored values read as HU"


def test_missing_photometric_interpretation_is_read_as_monochrome2_with_a_warning(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    ds = _flat_ct(tmp_path / "in" / "old.dcm", size=64)
    del ds.PhotometricInterpretation
    ds.save_as(tmp_path / "in" / "old.dcm", enforce_file_format=True)
    summary = score_paths([tmp_path / "in"], tmp_path / "out", tiny_checkpoint, device="cpu", num_workers=0)
    assert summary["errors"] == []
    with open(tmp_path / "out" / "scores.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert rows[0]["warning"] == "no PhotometricInterpretation: read as MONOCHROME2"


def test_tiny_slices_and_non_finite_windows_are_refused(tiny_checkpoint: Path, tmp_path: Path) -> None:
    _flat_ct(tmp_path / "one_pixel.dcm", size=1)
    items, errors = index_inputs([tmp_path / "one_pixel.dcm"])
    assert items == [] and "too small" in errors[0]["reason"]
    for window in ((float("nan"), 400.0), (-1000.0, float("inf"))):
        with pytest.raises(ValueError, match="both finite"):
            score_paths([tmp_path], tmp_path / "out", ckpt=tiny_checkpoint, window=window)


def test_thumbnails_are_scored_with_a_warning_that_names_their_size(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A slice under 64 px across (a test corpus's 16 x 16 stand-in, an icon) is scored, but its row in
    ``scores.csv`` says that its score means little; the size comes from the header of each kind of input."""
    from PIL import Image

    inputs = tmp_path / "in"
    _flat_ct(inputs / "thumbnail.dcm", size=16)
    write_dicom(inputs / "wide.dcm", "CT", "8.8", 0.0, np.full((48, 64), 40.0))  # 64 px across: a scan
    volume = np.full((20, 24, 3), -1000.0, dtype=np.float32)
    volume[5:15, 5:15] = 40.0
    nibabel.Nifti1Image(volume, np.eye(4)).to_filename(inputs / "small.nii.gz")
    Image.fromarray(np.full((32, 40), 128, dtype=np.uint8)).save(inputs / "icon.png")
    tifffile.imwrite(inputs / "slice.tif", np.full((64, 64), 0.5, dtype=np.float32))
    summary = score_paths([inputs], tmp_path / "out", tiny_checkpoint, device="cpu", num_workers=0)
    assert summary["errors"] == []
    assert sorted(entry["n_warned"] for entry in summary["series"].values()) == [0, 0, 1, 1, 3]  # the volume's 3 slices
    with open(tmp_path / "out" / "scores.csv", newline="") as stream:
        warnings_by_file = {(Path(row["source"]).name, row["warning"]) for row in csv.DictReader(stream)}
    thumbnail = "px: a thumbnail, not a scan (under 64 px across), its score means little"
    assert warnings_by_file == {
        ("thumbnail.dcm", f"16 x 16 {thumbnail}"),
        ("wide.dcm", ""),
        ("small.nii.gz", f"20 x 24 {thumbnail}"),
        ("icon.png", f"32 x 40 {thumbnail}"),
        ("slice.tif", ""),
    }


def test_the_slice_images_of_a_folder_are_one_series_in_their_numbers_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As DICOM slices of one series are: a plot and a summary for the folder (DeepLesion's series folders,
    LDCTIQA's image folder), not for each file; split by size, as a DICOM series is."""
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    (tmp_path / "pngs" / "sub").mkdir(parents=True)
    for name in ("10.png", "9.png", "1.png", "2.png", "sub/a.png"):
        Image.fromarray(pixels).save(tmp_path / "pngs" / name)
    Image.fromarray(np.zeros((80, 64), np.uint8)).save(tmp_path / "pngs" / "3.png")
    items, errors = index_inputs([tmp_path / "pngs"])
    folder = str(tmp_path / "pngs")
    assert errors == [] and [(item["series"], Path(item["image"]).name, item["position"]) for item in items] == [
        (f"{folder} (64x64)", "1.png", 0.0),
        (f"{folder} (64x64)", "2.png", 1.0),
        (f"{folder} (64x64)", "9.png", 2.0),
        (f"{folder} (64x64)", "10.png", 3.0),
        (f"{folder} (80x64)", "3.png", 0.0),
        (f"{folder}/sub", "a.png", 0.0),
    ]
    monkeypatch.chdir(tmp_path / "pngs" / "sub")  # a file named from its own folder: the series has the folder's name
    assert [(item["series"], item["image"]) for item in index_inputs(["a.png"])[0]] == [(f"{folder}/sub", "a.png")]


def test_float_tiff_outside_the_unit_range_is_not_windowed(tmp_path: Path) -> None:
    import tifffile

    tifffile.imwrite(tmp_path / "hu.tif", np.full((32, 32), 40.0, dtype=np.float32))
    items, _ = index_inputs([tmp_path / "hu.tif"])
    with pytest.raises(InputError, match="not windowed"):
        read_scored_slice(items[0]["image"])
    hu = np.where(np.eye(32) > 0, -1000, 40).astype(np.int16)  # whole HU, as some converters save them
    tifffile.imwrite(tmp_path / "hu_int16.tif", hu)
    with pytest.raises(InputError, match=r"int16 pixels span \[-1000, 40\]: CT numbers \(HU\), not a rendered slice"):
        read_scored_slice(tmp_path / "hu_int16.tif")
    tifffile.imwrite(tmp_path / "grey_int16.tif", np.abs(hu) * 30)  # signed, yet none below 0, over half the range
    assert read_scored_slice(tmp_path / "grey_int16.tif").max() == pytest.approx(30000 / 65535 + 0.5, abs=1e-4)
    tifffile.imwrite(tmp_path / "narrow_int16.tif", np.abs(hu))  # 40 to 1000 of 65536 values: CT numbers again
    with pytest.raises(InputError, match=r"int16 pixels span \[40, 1000\], 1.5% of their type's range: CT numbers"):
        read_scored_slice(tmp_path / "narrow_int16.tif")


def test_nifti_with_tiny_axial_slices_is_refused(tmp_path: Path) -> None:
    nibabel.save(nibabel.Nifti1Image(np.zeros((32, 1, 6), dtype=np.float32), np.eye(4)), tmp_path / "thin.nii.gz")
    items, errors = index_inputs([tmp_path / "thin.nii.gz"])
    assert items == [] and "axial slices of 32 x 1 pixels are too small" in errors[0]["reason"]
